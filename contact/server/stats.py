"""What a server counts about itself, for `Server.stats()`, `Server.clients()`,
the Prometheus metrics and the status page (contact/server/status.py).

Counting costs a few integer additions per task on the event loop's
thread; nothing is computed until someone asks. In a fleet each server
counts what happened at it: the tasks submitted on it and their outcomes,
its own clients; only the queue's counts are the fleet's.
"""

from __future__ import annotations

import bisect
import inspect
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

# The upper bounds (seconds) of the histogram of the time from submit to
# answer: from a lone task's round trip (about a millisecond) to a lease.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0, 600.0, float("inf"))  # fmt: skip
# The last failures kept for the status page: enough to see a pattern.
RECENT_FAILURES = 20
# Answers per second are counted in slots of this many seconds, for this
# many slots: the status page's chart of the last ten minutes.
RATE_SLOT_SECONDS = 5
RATE_SLOTS = 120
# The codes of the calls this server ends with an error (counted from 0,
# so that each has its series from the start; others are counted as met).
REFUSAL_CODES = ("INVALID_ARGUMENT", "PERMISSION_DENIED", "FAILED_PRECONDITION", "ABORTED",
                 "UNAVAILABLE", "UNKNOWN")  # fmt: skip
# The names with the most tasks queued that stats() lists one by one.
STATS_NAMES = 20


@dataclass(frozen=True)
class Failure:
    """A task that ended without an answer."""

    at: float  # when (time.time())
    task_id: str
    client: str | None  # the client that failed it, if one did
    reason: str


@dataclass(frozen=True)
class ClientView:
    """One connected client, as `Server.clients()` shows it."""

    name: str
    address: str  # its peer address, as gRPC gives it ("ipv4:127.0.0.1:51234")
    window: int  # the most tasks it may hold unanswered
    in_flight: int
    answered: int  # answers accepted from it since it registered
    connected_since: float  # time.time()
    last_heard: float  # time.time() of its last answer, start or status line


@dataclass(frozen=True)
class Stats:
    """The server's counts since it started, as `Server.stats()` gives them."""

    clients: int  # connected now
    queued: int  # tasks waiting for a client (a fleet's: fleet-wide, as last counted)
    queued_for_any: int
    queued_for: dict[str, int]  # per name, for the STATS_NAMES names with the most
    in_flight: int  # sent to this server's clients and unanswered
    submitted: int  # tasks queued here (typed, or `submit`)
    answered: int  # outcomes reported here: answers,
    failed: int  # failures (by a client, or no attempts left),
    cancelled: int  # and tasks withdrawn
    requeued: dict[str, int]  # tasks taken back from a client, by why
    lease_expiries: int  # of those, for a lease that ran out
    refused: dict[str, int]  # calls ended with an error status, by its code
    durations: list[int] = field(default_factory=list)  # answers per DURATION_BUCKETS
    duration_sum: float = 0.0  # seconds, of all answers timed


class Tally:
    """The counters a server keeps; each method is called on its loop."""

    def __init__(self) -> None:
        self.submitted = 0
        self.outcomes: Counter[str] = Counter()  # "answered", "failed", "cancelled"
        self.refused: Counter[str] = Counter(dict.fromkeys(REFUSAL_CODES, 0))
        self.durations = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self.failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)
        self._rate: deque[list[int]] = deque(maxlen=RATE_SLOTS)  # [slot, answers]

    def answered(self) -> None:
        """A task's answer was reported."""
        self.outcomes["answered"] += 1
        slot = int(time.time()) // RATE_SLOT_SECONDS
        if self._rate and self._rate[-1][0] == slot:
            self._rate[-1][1] += 1
        else:
            self._rate.append([slot, 1])

    def timed(self, seconds: float) -> None:
        """An answer came `seconds` after its task was submitted."""
        self.durations[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def failed(self, task_id: str, client: str | None, reason: str) -> None:
        self.outcomes["failed"] += 1
        self.failures.append(Failure(time.time(), task_id, client, reason))

    def rate(self) -> list[tuple[float, float]]:
        """Answers per second in each of the last RATE_SLOTS whole slots,
        oldest first, as (the slot's start in time.time(), answers per
        second); slots with no answer count 0."""
        now = int(time.time()) // RATE_SLOT_SECONDS  # (the slot still filling is left out)
        counts = {slot: answers for slot, answers in self._rate}
        slots = range(now - RATE_SLOTS, now)
        return [
            (slot * RATE_SLOT_SECONDS, counts.get(slot, 0) / RATE_SLOT_SECONDS) for slot in slots
        ]


class RefusalCounter(grpc.aio.ServerInterceptor):
    """Counts the calls that end with an error status, by its code: an
    abort (a refusal, a takeover, a shutdown), or UNKNOWN for a handler
    that raised. The calls are not changed: each handler is the same one,
    with a callback added."""

    def __init__(self, refused: Counter[str]) -> None:
        self._refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # (an unknown method: grpc answers UNIMPLEMENTED)
            return handler
        kind = HANDLER_KINDS[handler.request_streaming, handler.response_streaming]
        return kind[1](
            self._counted(getattr(handler, kind[0])),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _counted(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """`behavior`, which tells `_count` how its call ended; of its kind
        (grpc runs a plain function in a thread, with another context)."""
        count = self._count
        if inspect.isasyncgenfunction(behavior):

            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                context.add_done_callback(count)
                replies = behavior(request, context)
                try:
                    async for reply in replies:
                        yield reply
                except Exception:
                    self._crashed(context)
                    raise
                finally:  # (cancelled at our yield: its own cleanup runs now, not at GC)
                    await replies.aclose()

            return streamed
        if inspect.iscoroutinefunction(behavior):

            async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
                context.add_done_callback(count)
                try:
                    return await behavior(request, context)
                except Exception:
                    self._crashed(context)
                    raise

            return awaited
        return behavior  # (run in a thread: not counted; this server has none)

    def _crashed(self, context: grpc.aio.ServicerContext) -> None:
        """The handler raised: grpc ends the call UNKNOWN without setting a
        code (an abort sets one first: `_count` counts that)."""
        if context.code() is None:
            self._refused["UNKNOWN"] += 1

    def _count(self, context: grpc.aio.ServicerContext) -> None:
        code = context.code()
        if code is not None and code != grpc.StatusCode.OK:
            self._refused[getattr(code, "name", str(code))] += 1


# A handler's behavior, and how to make one, by (request streams, response streams).
HANDLER_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}
