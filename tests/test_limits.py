"""One connection that opens calls by the thousand, one client that floods
status lines, and shutdowns with clients that keep their streams open:
the server stays small, quiet and clean."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from contact import CLIENT_ID_KEY, contact_pb2, contact_pb2_grpc
from tests.measure import rss_mb
from tests.processes import Process, logged_at, start_server

STREAMS = 20_000
# How many times the shutdown tests run in the suite; CONTACT_REPEAT=30 for
# the thirty-in-a-row check.
REPEAT = int(os.environ.get("CONTACT_REPEAT", "2"))


@pytest.mark.alone
def test_twenty_thousand_status_streams_on_one_connection_keep_the_server_small(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    srv, port = server
    client("bystander", port)
    before = rss_mb(srv.pid)

    async def attack() -> tuple[float, grpc.StatusCode]:
        metadata = ((CLIENT_ID_KEY, "greedy"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contact_pb2_grpc.ContactStub(channel)
            registration = stub.getTask(contact_pb2.Empty(), metadata=metadata)
            await registration.initial_metadata()
            calls = [stub.sendStatus(metadata=metadata) for _ in range(STREAMS)]
            srv.type("served meanwhile")
            await asyncio.to_thread(srv.wait_for, r"result from bystander: 'SERVED MEANWHILE'$")
            peak = rss_mb(srv.pid)
            for call in calls:
                call.cancel()
            unregistered = stub.sendStatus(metadata=((CLIENT_ID_KEY, "nobody"),))
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await unregistered.done_writing()
            code = await asyncio.wait_for(unregistered.code(), 10)
            registration.cancel()
            return peak, code

    peak, unregistered = asyncio.run(attack())
    print(f"server RSS before {before:.1f} MB, with {STREAMS} streams tried: {peak:.1f} MB")
    assert peak - before < 50
    assert unregistered is grpc.StatusCode.FAILED_PRECONDITION
    srv.wait_for(r"refused a call .*nobody is not registered: call getTask first")


@pytest.mark.alone
def test_a_flood_of_status_lines_writes_little_to_the_log(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    srv, port = start_server("--log-level", "DEBUG")  # status lines are logged at DEBUG
    processes.append(srv)
    lines = 20_000

    async def flood() -> None:
        metadata = ((CLIENT_ID_KEY, "chatty"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contact_pb2_grpc.ContactStub(channel)
            registration = stub.getTask(contact_pb2.Empty(), metadata=metadata)
            await registration.initial_metadata()
            status = stub.sendStatus(metadata=metadata)
            started = time.monotonic()
            for number in range(lines):
                await status.write(contact_pb2.ClientMsg(msg=f"status line {number}"))
                await status.read()
            took = time.monotonic() - started
            print(f"{lines} status lines sent (each answered) in {took:.1f} s")
            assert took < 30
            await status.done_writing()
            registration.cancel()

    asyncio.run(flood())
    srv.wait_for(r"\.\.\. and \d+ more status lines from chatty")
    client("after", port)
    srv.type("after the flood")
    srv.wait_for(r"result from after: 'AFTER THE FLOOD'$")
    logged = len(srv.output.encode())
    print(f"{lines} status lines: {srv.count('status from chatty')} logged, {logged} bytes of log")
    assert logged < 1_000_000


def open_streams_and_stay(port: int, name: str) -> Callable[[], None]:
    """A client that registers, opens tellResult and sendStatus, sends one
    status line, and then keeps both streams open whatever happens. Returns
    what ends it."""
    loop = asyncio.new_event_loop()
    ready = loop.create_future()

    async def stay() -> None:
        metadata = ((CLIENT_ID_KEY, name),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contact_pb2_grpc.ContactStub(channel)
            registration = stub.getTask(contact_pb2.Empty(), metadata=metadata)
            await registration.initial_metadata()
            results, status = stub.tellResult(metadata=metadata), stub.sendStatus(metadata=metadata)
            await status.write(contact_pb2.ClientMsg(msg="here to stay"))
            await status.read()
            ready.set_result(None)
            with contextlib.suppress(Exception):
                await asyncio.gather(results, status.code())  # whatever the server says

    thread = threading.Thread(target=loop.run_until_complete, args=(stay(),), daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 10), loop).result(15)
    return lambda: thread.join(10)


@pytest.mark.parametrize("run", range(REPEAT))
def test_shutdown_with_clients_that_keep_their_streams_open_is_clean(
    processes: list[Process], run: int
) -> None:
    srv, port = start_server("--grace", "1", "--log-level", "DEBUG")
    processes.append(srv)
    stayers = [open_streams_and_stay(port, f"stayer-{i}") for i in range(2)]
    srv.wait_for(r"status from stayer-1")
    srv.send(signal.SIGTERM)
    assert srv.exit_code(5) == 0, srv.output
    # Timed by the server's own lines: a loaded machine may take a while
    # more to end the process, which exit_code's bound covers.
    began, stopped = (srv.wait_for(line) for line in (r"shutting down", r"stopped;"))
    assert logged_at(stopped.string) - logged_at(began.string) < 1 + 0.5  # the grace, and a little
    assert "Traceback" not in srv.output and "ERROR" not in srv.output, srv.output
    for end in stayers:
        end()
