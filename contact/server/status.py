"""The server's HTTP side (`--metrics-port`): Prometheus metrics at /metrics,
a status page a person can watch at /, and what that page shows as JSON
at /status.json. docs/operations.md says what each metric means.

It runs in a thread of its own (prometheus-client's threading WSGI server),
so a slow scraper never holds up the event loop; each request asks the loop
for one consistent snapshot of the counts, and waits for it a bounded time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer

from contact.server.stats import DURATION_BUCKETS, ClientView, Failure, Stats

log = logging.getLogger("contact.server")

# How long a request waits for the event loop's snapshot: a loop stuck this
# long answers 503, rather than tying up the request's thread.
SNAPSHOT_SECONDS = 5.0
# Requests served at once (each in a thread); more get 503 at once: a
# flood of requests cannot start a thread each.
MAX_REQUESTS = 8
# How often the HTTP thread looks up from waiting for a request to see if it
# should stop: what stopping it adds to the server's shutdown, at most.
STOP_POLL_SECONDS = 0.1


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything the page and the metrics show, taken at one moment."""

    stats: Stats
    clients: list[ClientView]
    failures: list[Failure]
    rate: list[tuple[float, float]]  # (slot start, answers per second)
    at: float  # time.time()


class Metrics:
    """A prometheus-client collector: each scrape turns a snapshot into metrics."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot().stats
        yield gauge("contact_clients_connected", "Clients connected to this server.", stats.clients)
        yield gauge(
            "contact_tasks_queued",
            "Tasks waiting for a client (with --queue: the fleet's, as last counted).",
            stats.queued,
        )
        yield gauge(
            "contact_tasks_in_flight", "Tasks sent to this server's clients, unanswered.",
            stats.in_flight,
        )  # fmt: skip
        yield counter("contact_tasks_submitted", "Tasks queued on this server.", stats.submitted)
        outcomes = CounterMetricFamily(
            "contact_tasks", "Tasks submitted here that ended, by outcome.", labels=["outcome"]
        )
        for outcome in ("answered", "failed", "cancelled"):
            outcomes.add_metric([outcome], getattr(stats, outcome))
        yield outcomes
        requeues = CounterMetricFamily(
            "contact_requeues", "Tasks taken back from a client, by why.", labels=["reason"]
        )
        for reason, count in sorted(stats.requeued.items()):
            requeues.add_metric([reason], count)
        yield requeues
        refusals = CounterMetricFamily(
            "contact_calls_refused", "Calls ended with an error status, by code.", labels=["code"]
        )
        for code, count in sorted(stats.refused.items()):
            refusals.add_metric([code], count)
        yield refusals
        yield histogram(stats)


def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


def histogram(stats: Stats) -> HistogramMetricFamily:
    """The time from submit to answer, as Prometheus's cumulative buckets."""
    buckets, total = [], 0
    for bound, count in zip(DURATION_BUCKETS, stats.durations, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return HistogramMetricFamily(
        "contact_task_answer_seconds",
        "Seconds from a task's submit to its answer, for tasks submitted here.",
        buckets=buckets,
        sum_value=stats.duration_sum,
    )


class StatusServer:
    """The HTTP server, on host:port, in a daemon thread until `stop`."""

    def __init__(
        self, host: str, port: int, loop: asyncio.AbstractEventLoop, take: Callable[[], Snapshot]
    ) -> None:
        self._loop, self._take = loop, take
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Metrics(self._snapshot))
        self._metrics = make_wsgi_app(registry)
        self._page = resources.files("contact.server").joinpath("status.html").read_bytes()
        try:
            self._http = make_server(
                host, port, self._app, server_class=ThreadingWSGIServer, handler_class=QuietHandler
            )
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from err
        self._http.daemon_threads = True  # (a request cut short never holds up the exit)
        self.port = self._http.server_port
        serve = functools.partial(self._http.serve_forever, poll_interval=STOP_POLL_SECONDS)
        self._thread = threading.Thread(target=serve, name="status", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop serving (it waits for the thread's next poll)."""
        await asyncio.to_thread(self._http.shutdown)
        self._http.server_close()

    def _snapshot(self) -> Snapshot:
        """The counts, taken on the event loop (its state is the loop's alone)."""
        future = asyncio.run_coroutine_threadsafe(taken(self._take), self._loop)
        try:
            return future.result(SNAPSHOT_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _app(self, environ: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        if not self._slots.acquire(blocking=False):
            return reply(respond, "503 Service Unavailable", b"busy: try again\n", "text/plain")
        try:
            return self._route(environ, respond)
        except (concurrent.futures.TimeoutError, RuntimeError) as err:  # (or its loop closed)
            log.warning("status page: no snapshot from the server: %r", err)
            body = b"no answer from the server\n"
            return reply(respond, "503 Service Unavailable", body, "text/plain")
        finally:
            self._slots.release()

    def _route(self, environ: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return list(self._metrics(environ, respond))  # (read while holding a slot)
        if path == "/status.json":
            body = json.dumps(dataclasses.asdict(self._snapshot())).encode()
            return reply(respond, "200 OK", body, "application/json")
        if path in ("/", "/index.html"):
            return reply(respond, "200 OK", self._page, "text/html; charset=utf-8")
        return reply(respond, "404 Not Found", b"not found: try / or /metrics\n", "text/plain")


async def taken(take: Callable[[], Snapshot]) -> Snapshot:
    return take()


def reply(respond: Callable[..., Any], status: str, body: bytes, kind: str) -> list[bytes]:
    respond(status, [("Content-Type", kind), ("Content-Length", str(len(body))),
                     ("Cache-Control", "no-store")])  # fmt: skip
    return [body]


class QuietHandler(WSGIRequestHandler):
    """Requests logged at DEBUG, through logging (wsgiref prints each to stderr)."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: " + format, *args)
