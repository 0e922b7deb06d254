"""How many tasks a client holds at once: the `max-in-flight` a client asks
for at registration, capped by the server's --max-in-flight, and what the
default client asks for (slow tasks are shared, not hoarded)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest

from contact import CLIENT_ID_KEY, MAX_IN_FLIGHT_KEY, contact_pb2, contact_pb2_grpc
from tests.processes import Process, logged_at, start_server

TASKS = 5


@pytest.mark.parametrize(
    ("server_max", "asked", "held"),
    [(32, "2", 2), (3, "1000", 3), (3, None, 3), (32, "99999999999999999999", 5)],
    ids=["honoured", "capped", "defaulted", "huge-capped"],
)
def test_a_client_is_sent_at_most_what_it_asked_for_and_the_server_allows(
    processes: list[Process],
    client: Callable[..., Process],
    server_max: int,
    asked: str | None,
    held: int,
) -> None:
    """Of TASKS queued tasks, a client that asked for `asked` (None: asked
    nothing) and answers none is sent exactly `held`: a bystander that
    connects later answers exactly the rest, and the server logs every send."""
    srv, port = start_server("--max-in-flight", str(server_max))
    processes.append(srv)
    srv.type(*(f"task {i}" for i in range(TASKS)))
    srv.wait_for(r"queued for any client", count=TASKS)

    async def scenario() -> None:
        metadata = [(CLIENT_ID_KEY, "raw")]
        if asked is not None:
            metadata.append((MAX_IN_FLIGHT_KEY, asked))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = contact_pb2_grpc.ContactStub(channel).getTask(
                contact_pb2.Empty(), metadata=tuple(metadata)
            )
            await call.initial_metadata()  # registered; it answers nothing
            await asyncio.to_thread(srv.wait_for, r"sent to raw", 10.0, held)
            await asyncio.to_thread(client, "bystander", port)
            if held < TASKS:
                await asyncio.to_thread(srv.wait_for, r"result from bystander", 10.0, TASKS - held)
            assert srv.count(r"sent to raw") == held
            assert srv.count(r"result from bystander") == TASKS - held
            call.cancel()  # its tasks go back, and the bystander answers them too

    asyncio.run(scenario())


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", " 2", "9" * 21, "+2", "0x10"])
def test_a_malformed_max_in_flight_is_refused(
    server: tuple[Process, int], client: Callable[..., Process], value: str
) -> None:
    srv, port = server

    async def register() -> grpc.StatusCode:
        metadata = ((CLIENT_ID_KEY, "odd"), (MAX_IN_FLIGHT_KEY, value))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = contact_pb2_grpc.ContactStub(channel).getTask(
                contact_pb2.Empty(), metadata=metadata
            )
            code: grpc.StatusCode = await asyncio.wait_for(call.code(), 5)
            return code

    assert asyncio.run(register()) is grpc.StatusCode.INVALID_ARGUMENT
    srv.wait_for(r"WARNING refused a call from .*'max-in-flight' must be one decimal integer")
    assert srv.count(r"client odd connected") == 0
    client("fine", port)
    srv.type("still served")
    srv.wait_for(r"result from fine: 'STILL SERVED'$")


def test_slow_tasks_are_shared_by_two_default_clients(
    server: tuple[Process, int], processes: list[Process]
) -> None:
    """Eight one-second tasks, two clients with the default settings
    connecting half a second apart: both work, and all are done about four
    seconds after the second connects (their half each), not the seven and
    a half one client would still need. Timed from the second client's
    registration, since starting a process can take a second on a loaded
    machine."""
    srv, port = server
    srv.type(*(f"slow {i}" for i in range(8)))
    srv.wait_for(r"queued for any client", count=8)
    slow = ["tests/odd_client.py", f"127.0.0.1:{port}"]
    processes.append(Process("first", *slow, "first", "--sleep", "1"))
    srv.wait_for(r"client first connected")
    time.sleep(0.5)  # the scenario itself: the second client comes half a second later
    processes.append(Process("second", *slow, "second", "--sleep", "1"))
    last = srv.wait_for(r"result from \S+: 'SLOW \d'$", count=8, timeout=15)
    first, second = (srv.wait_for(rf"client {name} connected") for name in ("first", "second"))
    took, since_first = (logged_at(last.string) - logged_at(hi.string) for hi in (second, first))
    print(
        f"eight one-second tasks, two default clients: done {took:.2f} s after the second "
        f"came, {since_first:.2f} s after the first"
    )
    assert took <= 4.6
    assert srv.count(r"result from first: ") >= 3
    assert srv.count(r"result from second: ") >= 3
