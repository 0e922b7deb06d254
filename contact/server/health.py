"""The standard gRPC health service (grpc.health.v1.Health) that load
balancers and Kubernetes probes ask: SERVING while the server takes
clients, NOT_SERVING from the moment it begins to shut down, so that a
balancer stops sending it new clients while the ones it has finish.

It answers for the whole server (the service name "") and for
contact.Contact by name; any other name gets NOT_FOUND (Check) or
SERVICE_UNKNOWN (Watch), as the standard says. The messages and stubs are
grpcio-health-checking's; the servicer is ours because that package's
`Watch` never ends: at shutdown the server would wait out its whole grace
for each watcher and then cancel it, which grpc logs with a traceback.
Here a Watch says NOT_SERVING and then ends normally.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contact import contact_pb2

log = logging.getLogger("contact.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

CONTACT_SERVICE = contact_pb2.DESCRIPTOR.services_by_name["Contact"].full_name
SERVICES = ("", CONTACT_SERVICE)  # "": the server as a whole


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check and Watch for SERVICES, all of them in one status."""

    def __init__(self) -> None:
        self._status: int = SERVING
        self._stopping = False
        self._changed = asyncio.Event()  # set, and replaced, at each change

    def _status_of(self, service: str) -> int | None:
        return self._status if service in SERVICES else None

    def stop(self) -> None:
        """Say NOT_SERVING for good, and end every Watch once it has said so."""
        self._stopping = True
        self._set(NOT_SERVING)
        log.debug("health: NOT_SERVING (shutting down)")

    def _set(self, status: int) -> None:
        if status != self._status:
            self._status = status
            self._changed.set()
            self._changed = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status_of(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no service {request.service!r} here")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change; ends once NOT_SERVING is said at shutdown."""
        said: int | None = None
        while True:
            changed = self._changed  # before the status is read: no change is missed
            status = self._status_of(request.service)
            if status is None:
                status = SERVICE_UNKNOWN
            if status != said:
                yield health_pb2.HealthCheckResponse(status=status)
                said = status
            if self._stopping:
                return
            await changed.wait()


def add_health(server: grpc.aio.Server) -> Health:
    """Serve the health service on `server`, SERVING."""
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return health
