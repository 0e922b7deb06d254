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
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler

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
# Connections served at once (each in a thread); more get 503 at once,
# before a thread is started: a flood of them cannot start a thread each.
MAX_REQUESTS = 8
# A connection that sends nothing for this long is closed: an idle or slow
# one cannot keep its thread (and its place among MAX_REQUESTS) for ever.
REQUEST_SECONDS = 10.0
# The page lists at most this many clients (stats count them all): its
# JSON stays small, and the loop's work per refresh bounded.
PAGE_CLIENTS = 200
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
    """A prometheus-client collector: each scrape turns the counts into metrics."""

    def __init__(self, take_stats: Callable[[], Stats]) -> None:
        self._take_stats = take_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._take_stats()
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
    """The HTTP server, on host:port, in threads of its own until `stop`.
    `take_stats` and `take` are called on `loop`: the counts for /metrics,
    and everything for the page."""

    def __init__(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        take_stats: Callable[[], Stats],
        take: Callable[[], Snapshot],
    ) -> None:
        self._loop, self._host = loop, host
        self._failing = False  # said once while snapshots fail, once when they come again
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Metrics(lambda: self._on_loop(take_stats)))
        self._metrics = make_wsgi_app(registry)
        self._take = take
        self._page = resources.files("contact.server").joinpath("status.html").read_bytes()
        try:
            self._http = BoundedServer((host, port), QuietHandler)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from err
        self._http.set_app(self._app)
        self.port = self._http.server_port
        serve = functools.partial(self._http.serve_forever, poll_interval=STOP_POLL_SECONDS)
        self._thread = threading.Thread(target=serve, name="status", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop serving (it waits for the thread's next poll)."""
        await asyncio.to_thread(self._http.shutdown)
        self._http.server_close()

    def _on_loop(self, take: Callable[[], Taken]) -> Taken:
        """`take()`, called on the event loop (its state is the loop's alone)."""
        future = asyncio.run_coroutine_threadsafe(taken(take), self._loop)
        try:
            result = future.result(SNAPSHOT_SECONDS)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            raise
        if self._failing:
            self._failing = False
            log.info("status page: the server answers again")
        return result

    def _app(self, environ: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return self._route(environ, respond)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError, RuntimeError):
            if not self._failing:  # (RuntimeError: the loop is closed)
                self._failing = True
                log.warning("status page: no answer from the server in %.0f s", SNAPSHOT_SECONDS)
            body = b"no answer from the server\n"
            return reply(respond, "503 Service Unavailable", body, "text/plain")

    def _route(self, environ: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":  # (no names in it: any Host may scrape it)
            return list(self._metrics(environ, respond))
        if path not in ("/", "/index.html", "/status.json"):
            return reply(respond, "404 Not Found", b"not found: try / or /metrics\n", "text/plain")
        if not self._host_allowed(environ.get("HTTP_HOST", "")):
            body = b"this page answers to its address or localhost only\n"
            return reply(respond, "403 Forbidden", body, "text/plain")
        if path == "/status.json":
            body = json.dumps(dataclasses.asdict(self._on_loop(self._take))).encode()
            return reply(respond, "200 OK", body, "application/json")
        return reply(respond, "200 OK", self._page, "text/html; charset=utf-8")

    def _host_allowed(self, host_header: str) -> bool:
        """Whether a request for the page names this server by an address,
        localhost or --metrics-host: a web page whose own name was made to
        resolve to this machine (DNS rebinding) cannot read it."""
        host = urllib.parse.urlsplit(f"//{host_header}").hostname or ""
        if host in ("localhost", self._host.strip("[]").lower()):
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True


Taken = TypeVar("Taken")


async def taken(take: Callable[[], Taken]) -> Taken:
    return take()


def reply(respond: Callable[..., Any], status: str, body: bytes, kind: str) -> list[bytes]:
    headers = [("Content-Type", kind), ("Content-Length", str(len(body)))]
    respond(
        status, [*headers, ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
    )
    return [body]


class BoundedServer(ThreadingWSGIServer):
    """prometheus-client's threading WSGI server, with at most MAX_REQUESTS
    connections served at once (a thread each): one more is answered 503
    and closed before any thread starts. IPv6 too."""

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        super().__init__((address[0].strip("[]"), address[1]), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # (starts its thread)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class QuietHandler(WSGIRequestHandler):
    """Requests logged at DEBUG, through logging (wsgiref prints each to
    stderr); a client that sends nothing for REQUEST_SECONDS is let go."""

    timeout = REQUEST_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: " + format, *args)
