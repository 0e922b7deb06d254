"""Fixtures shared by the tests that run real processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Process, start_client, start_server


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Every process a test starts goes here, to be killed if the test fails."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def server(processes: list[Process]) -> tuple[Process, int]:
    server, port = start_server()
    processes.append(server)
    return server, port


@pytest.fixture
def client(processes: list[Process]) -> Callable[..., Process]:
    def start(name: str, port: int, *args: str) -> Process:
        started = start_client(name, port, *args)
        processes.append(started)
        return started

    return start


@pytest.fixture(params=["memory", "journal"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """ContactServer's keyword arguments for each kind of task store, so
    that the same behavioural tests run against both: in memory, and the
    SQLite journal."""
    return {} if request.param == "memory" else {"journal": tmp_path / "tasks.journal"}
