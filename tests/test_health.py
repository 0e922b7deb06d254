"""The standard gRPC health service, asked as a balancer or a Kubernetes
probe asks it, of a real contact_server.py process: SERVING while it takes
clients, NOT_SERVING from the moment SIGTERM begins its shutdown, and while
its queue cannot keep tasks."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contact.server.health import Health
from tests.processes import Process, start_server
from tests.test_end_to_end import assert_clean_exit

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
WAIT_SECONDS = 10.0  # for a status the test expects: generous on a loaded machine


async def ask(port: int, rpc: str, request: Any) -> Any:
    """The reply of the health service's unary `rpc` (Check or List)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return await getattr(stub, rpc)(request, timeout=WAIT_SECONDS)


async def first_watched(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service)
        )
        reply = await asyncio.wait_for(watch.read(), WAIT_SECONDS)
        return int(reply.status)


async def watch_through_shutdown(server: Process, port: int) -> list[int]:
    """What the health service's Watch says before SIGTERM, and next."""
    seen: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        seen.append(int((await asyncio.wait_for(watch.read(), WAIT_SECONDS)).status))
        server.send(signal.SIGTERM)  # counted from here: what the watch says next
        seen.append(int((await asyncio.wait_for(watch.read(), WAIT_SECONDS)).status))
        # Then the server ends the watch itself, normally, as it stops
        # (not cancelled after the grace, which grpc logs with a traceback).
        assert await asyncio.wait_for(watch.read(), WAIT_SECONDS) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
    return seen


def test_a_running_server_is_serving_and_unknown_services_are_not_found(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    _, port = server
    client("worker", port)
    for service in ("", "contact.Contact"):  # "": the server as a whole
        reply = asyncio.run(ask(port, "Check", health_pb2.HealthCheckRequest(service=service)))
        assert reply.status == SERVING
    listed = asyncio.run(ask(port, "List", health_pb2.HealthListRequest()))
    assert {name: entry.status for name, entry in listed.statuses.items()} == {
        "": SERVING,
        "contact.Contact": SERVING,
    }
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(ask(port, "Check", health_pb2.HealthCheckRequest(service="no.Such")))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert asyncio.run(first_watched(port, "no.Such")) == SERVICE_UNKNOWN


def test_sigterm_turns_the_server_not_serving_before_it_stops(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    srv, port = start_server("--grace", "2")
    processes.append(srv)
    worker = client("worker", port, "--max-backoff", "1")

    assert asyncio.run(watch_through_shutdown(srv, port)) == [SERVING, NOT_SERVING]
    assert_clean_exit(srv)
    assert "ERROR" not in srv.output, srv.output
    worker.wait_for(r"server 127\.0\.0\.1:\d+ unavailable")  # its registration ended too


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot delete an open file")
def test_a_server_whose_journal_is_deleted_says_not_serving(
    processes: list[Process], tmp_path: Path
) -> None:
    """Tasks it takes now would be lost at exit: a balancer should send
    clients to another server (this one needs a restart)."""
    journal = tmp_path / "tasks.journal"
    srv, port = start_server("--journal", str(journal))
    processes.append(srv)

    async def watch_the_journal_go() -> list[int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            seen = [int((await asyncio.wait_for(watch.read(), WAIT_SECONDS)).status)]
            journal.unlink()  # counted from here: what the watch says next
            seen.append(int((await asyncio.wait_for(watch.read(), WAIT_SECONDS)).status))
            watch.cancel()
        return seen

    assert asyncio.run(watch_the_journal_go()) == [SERVING, NOT_SERVING]
    srv.wait_for(r"WARNING health: NOT_SERVING: journal \S*tasks\.journal was deleted$")
    request = health_pb2.HealthCheckRequest(service="contact.Contact")
    assert asyncio.run(ask(port, "Check", request)).status == NOT_SERVING
    srv.send(signal.SIGTERM)
    assert_clean_exit(srv)
    assert srv.count(r"health: ") == 1, srv.output  # said once, not at each check


def test_health_follows_the_queue_until_the_shutdown_begins() -> None:
    """A queue's trouble may pass (a database reachable again); a shutdown's
    NOT_SERVING does not."""

    async def statuses() -> list[int]:
        health = Health()

        async def status() -> int:
            return int((await health.Check(health_pb2.HealthCheckRequest(), None)).status)

        health.queue_checked("database unreachable")
        seen = [await status()]
        health.queue_checked(None)
        seen.append(await status())
        health.not_serving()
        health.queue_checked(None)  # too late: the server is stopping
        seen.append(await status())
        return seen

    assert asyncio.run(statuses()) == [NOT_SERVING, SERVING, NOT_SERVING]
