"""Fixtures shared by the tests that run real processes, and the hook that
runs a dispatcher test on an event loop when its queue is SQLite."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dispatching import Kind, check_what_the_files_kept
from tests.processes import Process, all_stopped, start_client, start_server


@pytest.fixture(params=["memory", "sqlite"])
def queue_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Which queue `make_dispatcher` makes: the dispatcher's tests run on both."""
    Kind.name, Kind.folder = request.param, tmp_path
    yield request.param
    Kind.name, Kind.folder, Kind.made = "memory", None, []


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A dispatcher test runs on an event loop if it is async, or on SQLite
    queues (their writes need one); on those, it passes only if each file,
    opened again, keeps what its queue had unfinished."""
    kind = pyfuncitem.funcargs.get("queue_kind")
    if kind is None or (kind == "memory" and not inspect.iscoroutinefunction(pyfuncitem.obj)):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def run() -> None:
        if inspect.iscoroutinefunction(pyfuncitem.obj):
            await pyfuncitem.obj(**arguments)
        else:
            pyfuncitem.obj(**arguments)
        await check_what_the_files_kept()

    asyncio.run(run())
    return True


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Every process a test starts goes here, to be killed if the test fails."""
    with all_stopped() as started:
        yield started


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
