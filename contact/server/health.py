"""The standard gRPC health service (grpc.health.v1.Health) that load
balancers and Kubernetes probes ask: SERVING while the server takes
clients, NOT_SERVING from the moment it begins to shut down, so that a
balancer stops sending it new clients while the ones it has finish, and
NOT_SERVING while its queue cannot keep tasks (a journal file deleted
under it), so that a balancer sends them elsewhere.

It answers for the whole server (the service name "") and for
contact.Contact by name; any other name gets NOT_FOUND (Check) or
SERVICE_UNKNOWN (Watch), as the standard says, and List gives both. The
messages and stubs are grpcio-health-checking's; the servicer is ours
because that package's `Watch` never ends: at shutdown the server would
wait out its whole grace for each watcher and then cancel it, which grpc
logs with a traceback. Here a Watch says NOT_SERVING as the shutdown
begins, stays open while the server's calls finish (a watcher whose call
ended normally asks again at once, for as long as the shutdown takes),
and is ended normally just before the gRPC server stops.
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
    """Check, Watch and List for SERVICES, all of them in one status."""

    def __init__(self) -> None:
        self._status: int = SERVING
        self._shutting_down = False  # NOT_SERVING for good
        self._ended = False  # every Watch returns: the server stops now
        self._changed = asyncio.Event()  # set, and replaced, at each change

    def _status_of(self, service: str) -> int | None:
        return self._status if service in SERVICES else None

    def not_serving(self) -> None:
        """Say NOT_SERVING from now on: the server is shutting down."""
        log.debug("health: NOT_SERVING (shutting down)")
        self._shutting_down = True
        self._changed_now(NOT_SERVING)

    def queue_checked(self, trouble: str | None) -> None:
        """Follow the queue: NOT_SERVING while it has `trouble` (see
        TaskQueue.trouble), SERVING again once it has none; each change said."""
        status = SERVING if trouble is None else NOT_SERVING
        if self._shutting_down or status == self._status:
            return
        if trouble is not None:
            log.warning("health: NOT_SERVING: %s", trouble)
        else:
            log.info("health: SERVING again")
        self._changed_now(status)

    def end(self) -> None:
        """End every Watch, normally, and those that begin from now at once:
        the gRPC server stops next, and must not wait for them."""
        self._ended = True
        self._changed_now(self._status)

    def _changed_now(self, status: int) -> None:
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
        """The status now, then each change, until `end`."""
        said: int | None = None
        while True:
            changed = self._changed  # before the status is read: no change is missed
            status = self._status_of(request.service)
            if status is None:
                status = SERVICE_UNKNOWN
            if status != said:
                yield health_pb2.HealthCheckResponse(status=status)
                said = status
            if self._ended:
                return
            await changed.wait()

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        reply = health_pb2.HealthListResponse()
        for service in SERVICES:
            reply.statuses[service].status = self._status
        return reply


def add_health(server: grpc.aio.Server) -> Health:
    """Serve the health service on `server`, SERVING."""
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return health
