"""Fixtures shared by the tests that run real processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
