"""The standard gRPC health service, asked as a balancer or a Kubernetes
probe asks it, of a real contact_server.py process: SERVING while it takes
clients, NOT_SERVING from the moment SIGTERM begins its shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.processes import Process, start_server
from tests.test_end_to_end import assert_clean_exit

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_SECONDS = 10.0  # for a status the test expects: generous on a loaded machine


async def check(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await stub.Check(request, timeout=WAIT_SECONDS)
        return int(reply.status)


def test_a_running_server_is_serving_and_unknown_services_are_not_found(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    _, port = server
    client("worker", port)
    assert asyncio.run(check(port, "")) == SERVING  # the server as a whole
    assert asyncio.run(check(port, "contact.Contact")) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(check(port, "no.Such"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_sigterm_turns_the_server_not_serving_before_it_stops(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    srv, port = start_server("--grace", "2")
    processes.append(srv)
    client("worker", port)

    async def watch_through_shutdown() -> list[int]:
        seen: list[int] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            seen.append(int((await asyncio.wait_for(watch.read(), WAIT_SECONDS)).status))
            srv.send(signal.SIGTERM)  # counted from here: what the watch says next
            seen.append(int((await asyncio.wait_for(watch.read(), WAIT_SECONDS)).status))
            # Then the server ends the watch itself, normally (not cancelled
            # after the grace, which grpc logs with a traceback).
            assert await asyncio.wait_for(watch.read(), WAIT_SECONDS) is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
        return seen

    assert asyncio.run(watch_through_shutdown()) == [SERVING, NOT_SERVING]
    assert_clean_exit(srv)
    srv.wait_for(r"shutting down: ")
    srv.wait_for(r"stopped; tasks never answered: 0")
