"""`make bench`: what the pattern costs, measured against the floor grpcio
itself sets on this machine, in the same run.

Two servers, each in a process of its own: `project` is the real server code
(contact_server's Dispatcher and ContactServicer, with its options and logging at
WARNING), and `baseline` is the leanest getTask/tellResult echo written here
(no queue, no routing, no logging). Clients run in other processes and answer
each task at once with its own text. Each figure is the median of --repeats
runs, and each row shows project, baseline and their ratio.

The typed row runs contact_server.py itself, as a user does: tasks typed on
its standard input, its default logging (INFO, read from its pipe as it
comes), two lean clients; the baseline there has two clients too. Rows
marked "server CPU per task" divide the server process's CPU time (all its
threads) by the tasks: on a shared machine it holds steady where throughput
swings.

The shipped client's rows run contact_client.run with its defaults (the
script's handler, a plain def, in a worker thread), and with the same
handler written as an `async def`, which run() runs on the event loop.

The journal rows compare ContactServer as shipped (tasks submitted with
`ask`, answers awaited) with --journal in a temporary folder against the
same server without one: what keeping tasks on disk costs. The metrics row
compares it with --metrics-port, its /metrics and /status.json fetched
every second by another process, against the same server without.

    python -m tests.bench [--repeats 5] [--tasks 20000] [--latency-tasks 2000] [--scale 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psutil

import contact.client.work
import contact_client
from contact import CLIENT_ID_KEY, cli, contact_pb2, contact_pb2_grpc
from contact.options import SERVER_OPTIONS
from contact.queue.base import Outcome
from contact.queue.dispatcher import Dispatcher
from contact.queue.memory import MemoryQueue
from contact_server import ContactServer, ContactServicer
from tests.measure import own_peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
QUEUE_URL = "CONTACT_BENCH_QUEUE"  # the database of a server-queue measurement
CLIENT_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel


# --- the servers under test ---------------------------------------------------


class CountingDispatcher(Dispatcher):
    """The real Dispatcher and in-memory queue, counting finished tasks so the
    bench knows when to stop."""

    def __init__(self) -> None:
        super().__init__(MemoryQueue())
        self.finished = 0
        self.changed = asyncio.Event()

    def complete(self, name: str, task_id: str, text: str, error: str = "") -> Outcome:
        outcome = super().complete(name, task_id, text, error)
        if outcome is Outcome.ACCEPTED:
            self.finished += 1
            self.changed.set()
        return outcome


class Project:
    def __init__(self) -> None:
        self.dispatcher = CountingDispatcher()
        self.servicer = ContactServicer(self.dispatcher)

    def clients(self) -> int:
        return len(self.dispatcher._sessions)

    def submit(self, count: int) -> None:
        assert isinstance(self.dispatcher.queue, MemoryQueue)
        for number in range(count):
            self.dispatcher.queue.add(f"task {number}")

    async def wait_finished(self, total: int) -> None:
        while self.dispatcher.finished < total:
            self.dispatcher.changed.clear()
            await self.dispatcher.changed.wait()


class Baseline(contact_pb2_grpc.ContactServicer):  # type: ignore[misc]
    """The same two streams with nothing in between: each client gets a
    queue, tasks go round-robin, results are only counted."""

    def __init__(self) -> None:
        self.servicer = self
        self.queues: list[asyncio.Queue[contact_pb2.ServerMsg]] = []
        self.finished = 0
        self.changed = asyncio.Event()
        self.next_id = 0

    def clients(self) -> int:
        return len(self.queues)

    def submit(self, count: int) -> None:
        for number in range(count):
            self.next_id += 1
            queue = self.queues[self.next_id % len(self.queues)]
            queue.put_nowait(contact_pb2.ServerMsg(task=f"task {number}", id=str(self.next_id)))

    async def wait_finished(self, total: int) -> None:
        while self.finished < total:
            self.changed.clear()
            await self.changed.wait()

    async def getTask(self, request: Any, context: Any) -> AsyncIterator[contact_pb2.ServerMsg]:
        queue: asyncio.Queue[contact_pb2.ServerMsg] = asyncio.Queue()
        self.queues.append(queue)
        while True:
            yield await queue.get()

    async def tellResult(self, request_iterator: Any, context: Any) -> contact_pb2.Empty:
        async for _ in request_iterator:
            self.finished += 1
            self.changed.set()
        return contact_pb2.Empty()


class Served:
    """ContactServer as your code uses it: `ask` per task, with --journal
    FILE (`sync` its --journal-sync) or, with `sync` None, without one."""

    def __init__(
        self, sync: str | None, folder: str, queue: str | None = None, metrics: bool = False
    ) -> None:
        journal = None if sync is None else Path(folder, "bench.journal")
        self.server = ContactServer(
            port=0,
            journal=journal,
            journal_sync=sync or "full",
            queue=queue,
            metrics_port=0 if metrics else None,
        )
        self.answers: list[asyncio.Future[str]] = []
        self.awaited = 0  # answers already awaited: latency rounds wait for the new one only

    def clients(self) -> int:
        return len(self.server._dispatcher._sessions)

    def submit(self, count: int) -> None:
        self.answers += [asyncio.ensure_future(self.server.ask(f"task {n}")) for n in range(count)]

    async def wait_finished(self, total: int) -> None:
        await asyncio.gather(*self.answers[self.awaited : total])
        self.awaited = total


async def serve_one_measurement(
    impl: str, mode: str, clients: int, tasks: int, folder: str
) -> None:
    """Run one server, wait for `clients`, measure, print the figures as JSON."""
    # "project-info" logs as the scripts do (contact/cli.py): a line per
    # event at INFO (sent, result; queued only when no client may take it),
    # through their batched handler.
    if impl == "project-info":
        cli.start_logging(argparse.Namespace(log_level="INFO"))
    else:
        logging.basicConfig(level=logging.WARNING)
    target: Project | Baseline | Served
    if impl.startswith("server"):  # "server", "server-journal-full", "server-journal-normal"
        # "server-queue": with --queue, the database in QUEUE_URL (tests/bench_fleet.py)
        queue = os.environ[QUEUE_URL] if impl.startswith("server-queue") else None
        sync = impl.rpartition("-")[2] if "journal" in impl else None
        target = Served(sync, folder, queue, metrics=impl == "server-metrics")
        await target.server.__aenter__()
        port = target.server.port
        if target.server.metrics_port is not None:
            # From a process of its own, as Prometheus would: its fetching is
            # not the server's CPU time, nor does it hold the server's GIL.
            scraped = f"http://127.0.0.1:{target.server.metrics_port}"
            subprocess.Popen([sys.executable, "-m", "tests.bench", "scrape", scraped], cwd=ROOT)
    else:
        target = Baseline() if impl == "baseline" else Project()
        server = grpc.aio.server(options=None if impl == "baseline" else SERVER_OPTIONS)
        contact_pb2_grpc.add_ContactServicer_to_server(target.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    print(json.dumps({"port": port}), flush=True)
    while target.clients() < clients:
        await asyncio.sleep(0.01)
    if impl == "server-queue-peer":  # another server of the fleet: it serves its clients only
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.Event().wait()
    figures: dict[str, float] = {}
    if mode == "latency":
        rounds = []
        for done in range(1, tasks + 1):
            started = time.perf_counter()
            target.submit(1)
            await target.wait_finished(done)
            rounds.append(time.perf_counter() - started)
        quantiles = statistics.quantiles(rounds, n=100)
        figures = {"p50_ms": 1000 * quantiles[49], "p99_ms": 1000 * quantiles[98]}
    else:
        started, cpu = time.perf_counter(), time.process_time()  # (all of its threads)
        target.submit(tasks)
        await target.wait_finished(tasks)
        elapsed = time.perf_counter() - started
        cpu_us = 1e6 * (time.process_time() - cpu) / tasks
        figures = {"ms": 1000 * elapsed, "tasks_per_s": tasks / elapsed, "cpu_us": cpu_us}
    figures["peak_rss_mb"] = own_peak_rss_mb()
    print(json.dumps(figures), flush=True)
    # Stay up until the driver has stopped the clients and then this process:
    # stopping a server under open streams only adds grpc's cancellation noise.
    await asyncio.Event().wait()


def scrape_every_second(url: str) -> None:
    """As Prometheus and an open status page would, but more often: the
    metrics and the page's JSON, every second, until the server is gone."""
    while True:
        for path in ("/metrics", "/status.json"):
            try:
                with urllib.request.urlopen(url + path, timeout=10) as response:
                    response.read()
            except OSError:  # (URLError too: the server was stopped)
                return
        time.sleep(1)


# --- the clients --------------------------------------------------------------


async def one_client(port: int, name: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS) as channel:
        stub = contact_pb2_grpc.ContactStub(channel)
        metadata = ((CLIENT_ID_KEY, name),)
        tasks = stub.getTask(contact_pb2.Empty(), metadata=metadata)
        await tasks.initial_metadata()  # registered: only now are results accepted
        results = stub.tellResult(metadata=metadata)
        async for task in tasks:
            await results.write(contact_pb2.Result(id=task.id, ret=task.task))


async def run_clients(port: int, count: int, prefix: str) -> None:
    await asyncio.gather(*(one_client(port, f"{prefix}-{i}") for i in range(count)))


async def upper_on_the_loop(task: contact_pb2.ServerMsg) -> str:
    """The script's handle_task as an `async def`: run() runs it on the loop."""
    return task.task.upper()


async def run_shipped_client(port: int, name: str, prefetch: int, on_loop: bool) -> None:
    """contact_client.run as shipped (its handler in a worker thread), or
    with the same handler as an `async def` (`on_loop`): its defaults but
    for `prefetch`."""
    logging.basicConfig(level=logging.WARNING)
    server = f"127.0.0.1:{port}"
    handler = upper_on_the_loop if on_loop else contact_client.handle_task
    await contact_client.run(handler, server, name, prefetch=prefetch)


# --- the driver ---------------------------------------------------------------


def measure_typed(clients: int, tasks: int) -> dict[str, float]:
    """contact_server.py as a user runs it, at its default logging: `tasks`
    lines typed on its standard input, answered by `clients` lean clients;
    timed from the first line typed to the last result it logged."""
    server = subprocess.Popen(
        [sys.executable, "contact_server.py", "--port", "0"],
        cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stdin is not None and server.stderr is not None
    helpers: list[subprocess.Popen[Any]] = []
    try:
        lines = iter(server.stderr)  # read as it comes: a full pipe would stop the server
        port = next(int(line.rsplit(":", 1)[1]) for line in lines if "listening on" in line)
        command = [sys.executable, "-m", "tests.bench", "clients", str(port), str(clients), "c"]
        helpers.append(subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL))
        connected = 0
        while connected < clients:
            connected += " connected from " in next(lines)
        cpu = psutil.Process(server.pid)
        cpu_before, started = sum(cpu.cpu_times()[:2]), time.perf_counter()
        typing = "".join(f"task {number}\n" for number in range(tasks))
        threading.Thread(target=server.stdin.write, args=[typing], daemon=True).start()
        answered = 0
        while answered < tasks:
            answered += " result from " in next(lines)
        elapsed = time.perf_counter() - started
        cpu_us = 1e6 * (sum(cpu.cpu_times()[:2]) - cpu_before) / tasks
        return {"ms": 1000 * elapsed, "tasks_per_s": tasks / elapsed, "cpu_us": cpu_us}
    finally:
        for process in [*helpers, server]:
            process.kill()
            process.wait(10)


def measure(impl: str, mode: str, clients: int, tasks: int) -> dict[str, float]:
    """One measurement: a server process, client processes, the figures."""
    if impl == "typed":
        return measure_typed(clients, tasks)
    command = [sys.executable, "-m", "tests.bench"]
    folder = tempfile.TemporaryDirectory(prefix="contact-bench-")  # on this machine's disk
    server = subprocess.Popen(
        [*command, "serve", impl, mode, str(clients), str(tasks), folder.name],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert server.stdout is not None
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        port = json.loads(server.stdout.readline())["port"]
        processes = min(clients, 4)  # a few client processes; up to 250 clients each
        for index in range(processes):
            share = clients // processes + (index < clients % processes)
            arguments = [*command, "clients", str(port), str(share), f"c{index}"]
            if impl.startswith("project-shipped"):  # its prefetch follows the last "-p"
                prefetch = impl.partition("-p")[2] or str(contact.client.work.PREFETCH)
                arguments = [*command, "shipped", str(port), prefetch, f"c{index}"]
                arguments += ["async"] if impl == "project-shipped-async" else []
            helpers.append(subprocess.Popen(arguments, cwd=ROOT, stderr=subprocess.DEVNULL))
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"{impl} {mode}: the server gave no figures")
        figures: dict[str, float] = json.loads(line)
        return figures
    finally:
        everyone: list[subprocess.Popen[Any]] = [*helpers, server]
        for process in everyone:  # clients first, so no stream is cut
            if process.poll() is None:
                process.kill()
            process.wait(10)
        folder.cleanup()


ROWS = [
    # label, mode, clients, figure, higher is better, target ratio
    (
        "tasks typed into contact_server.py, 2 clients (tasks/s)",
        "typed",
        2,
        "tasks_per_s",
        True,
        0.8,
    ),
    ("  server CPU per task (µs)", "typed", 2, "cpu_us", False, 1.5),
    ("throughput, 1 client (tasks/s)", "throughput", 1, "tasks_per_s", True, 0.8),
    ("  server CPU per task (µs)", "throughput", 1, "cpu_us", False, None),
    ("  the same, logging as the scripts do", "throughput-info", 1, "tasks_per_s", True, None),
    (
        "  the same, 1 contact_client.run as shipped",
        "throughput-shipped",
        1,
        "tasks_per_s",
        True,
        0.8,
    ),
    (
        "    its handler an async def (on the event loop)",
        "throughput-async",
        1,
        "tasks_per_s",
        True,
        None,
    ),
    ("throughput, 4 clients (tasks/s)", "throughput", 4, "tasks_per_s", True, 0.8),
    ("latency p50, 1 task in flight (ms)", "latency", 1, "p50_ms", False, 1.25),
    ("latency p99, 1 task in flight (ms)", "latency", 1, "p99_ms", False, None),
    ("{scale} clients, 1 task each (ms)", "scale", 0, "ms", False, 1.5),
    ("{scale} clients: server peak RSS (MB)", "scale", 0, "peak_rss_mb", False, None),
    # The "project" is ContactServer as shipped; the "baseline" is the same
    # server without a journal, except in the first of these rows.
    ("ContactServer, ask per task, 1 client (tasks/s)", "served", 1, "tasks_per_s", True, None),
    # --metrics-port, scraped every second, against the same server without.
    ("  with --metrics-port, scraped each second", "metrics", 1, "tasks_per_s", True, 0.95),
    ("  server CPU per task (µs)", "metrics", 1, "cpu_us", False, None),
    ("  with --journal, 1 client (tasks/s)", "journal-full", 1, "tasks_per_s", True, 0.67),
    ("  with --journal, 4 clients (tasks/s)", "journal-full", 4, "tasks_per_s", True, 0.67),
    ("  --journal-sync normal, 1 client", "journal-normal", 1, "tasks_per_s", True, 0.67),
    ("  --journal-sync normal, 4 clients", "journal-normal", 4, "tasks_per_s", True, 0.67),
    # A lone task (ask, one at a time): the journal's commit, and nothing to batch.
    (
        "ContactServer, latency p50, 1 task at a time (ms)",
        "served-latency",
        1,
        "p50_ms",
        False,
        None,
    ),
    ("  with --journal (ms)", "journal-latency", 1, "p50_ms", False, None),
]
JOURNAL_IMPLS = ["server", "server-journal-full", "server-journal-normal"]
# Rows whose target is a difference, not a ratio: a lone task's round trip
# with the journal within 1 ms of the same server's without it.
WITHIN = {"journal-latency": 1.0}


def shown(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        impl, mode, clients, tasks = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        asyncio.run(serve_one_measurement(impl, mode, clients, tasks, sys.argv[6]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "clients":
        port, count, prefix = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        asyncio.run(run_clients(port, count, prefix))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "scrape":
        scrape_every_second(sys.argv[2])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "shipped":
        on_loop = sys.argv[5:] == ["async"]
        asyncio.run(run_shipped_client(int(sys.argv[2]), sys.argv[4], int(sys.argv[3]), on_loop))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per throughput run")
    parser.add_argument("--latency-tasks", type=int, default=2_000)
    parser.add_argument("--scale", type=int, default=1_000, help="clients in the scale row")
    parser.add_argument(
        "--prefetch",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[],
        help="also the shipped client with these prefetches (e.g. 0,1,7): the default's reason",
    )
    args = parser.parse_args()

    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    sweep = [f"project-shipped-p{prefetch}" for prefetch in args.prefetch]
    plan = [("typed", 2, args.tasks), ("throughput", 1, args.tasks), ("throughput", 4, args.tasks),
            ("latency", 1, args.latency_tasks), ("scale", args.scale, args.scale)]  # fmt: skip
    for repeat in range(args.repeats):
        for mode, clients, tasks in plan:
            impls = ["baseline", "typed" if mode == "typed" else "project"] + (
                ["project-info", "project-shipped", "project-shipped-async", *sweep]
                if mode == "throughput" and clients == 1
                else []
            )
            impls += JOURNAL_IMPLS if mode == "throughput" else []
            if mode == "throughput" and clients == 1:  # next to the server it is compared with
                impls.insert(impls.index("server") + 1, "server-metrics")
            impls += ["server", "server-journal-full"] if mode == "latency" else []
            for impl in impls:  # interleaved, so drift hits both alike
                print(f"repeat {repeat + 1}/{args.repeats}: {impl} {mode} x{clients}", flush=True)
                runs.setdefault((impl, mode, clients), []).append(
                    measure(impl, "throughput" if mode == "typed" else mode, clients, tasks)
                )
    runs[("project", "typed", 2)] = runs[("typed", "typed", 2)]
    runs[("project", "throughput-info", 1)] = runs[("project-info", "throughput", 1)]
    runs[("baseline", "throughput-info", 1)] = runs[("baseline", "throughput", 1)]
    runs[("project", "throughput-shipped", 1)] = runs[("project-shipped", "throughput", 1)]
    runs[("baseline", "throughput-shipped", 1)] = runs[("baseline", "throughput", 1)]
    runs[("project", "throughput-async", 1)] = runs[("project-shipped-async", "throughput", 1)]
    runs[("baseline", "throughput-async", 1)] = runs[("baseline", "throughput", 1)]
    runs[("project", "served", 1)] = runs[("server", "throughput", 1)]
    runs[("project", "served-latency", 1)] = runs[("server", "latency", 1)]
    runs[("baseline", "served-latency", 1)] = runs[("baseline", "latency", 1)]
    runs[("project", "journal-latency", 1)] = runs[("server-journal-full", "latency", 1)]
    runs[("baseline", "journal-latency", 1)] = runs[("server", "latency", 1)]
    runs[("baseline", "served", 1)] = runs[("baseline", "throughput", 1)]
    runs[("project", "metrics", 1)] = runs[("server-metrics", "throughput", 1)]
    runs[("baseline", "metrics", 1)] = runs[("server", "throughput", 1)]
    for clients in (1, 4):
        for sync in ("full", "normal"):
            runs[("project", f"journal-{sync}", clients)] = runs[
                (f"server-journal-{sync}", "throughput", clients)
            ]
            runs[("baseline", f"journal-{sync}", clients)] = runs[("server", "throughput", clients)]

    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"grpcio {grpc.__version__}; project logging at WARNING unless said; "
          f"medians of {args.repeats} runs")  # fmt: skip
    print("| measure | project | baseline | ratio | target |\n|---|---:|---:|---:|---|")
    failures = 0
    for label, mode, clients, figure, higher_better, target in ROWS:
        clients = clients or args.scale
        project = statistics.median(r[figure] for r in runs[("project", mode, clients)])
        baseline = statistics.median(r[figure] for r in runs[("baseline", mode, clients)])
        ratio = project / baseline
        verdict = ""
        if mode in WITHIN:
            met = project - baseline <= WITHIN[mode]
            failures += not met
            difference = f"{project - baseline:+.2f}"
            verdict = f"within {WITHIN[mode]:g}: {'met' if met else 'MISSED'} ({difference})"
        if target is not None:
            met = ratio >= target if higher_better else ratio <= target
            failures += not met
            verdict = f"{'>=' if higher_better else '<='} {target}x {'met' if met else 'MISSED'}"
        row = [label.format(scale=args.scale), shown(project), shown(baseline), f"{ratio:.2f}x"]
        print("| " + " | ".join([*row, verdict]) + " |")
    for impl in sweep:
        shipped = [r["tasks_per_s"] for r in runs[(impl, "throughput", 1)]]
        baseline = statistics.median(r["tasks_per_s"] for r in runs[("baseline", "throughput", 1)])
        ratio = statistics.median(shipped) / baseline
        label = f"shipped client, prefetch {impl.partition('-p')[2]} (tasks/s)"
        row = [label, shown(statistics.median(shipped)), shown(baseline), f"{ratio:.2f}x"]
        print("| " + " | ".join(row) + " |  |")
    print("\nevery run (project | baseline; the median of the ratios run by run):")
    for label, mode, clients, figure, _, _ in ROWS:
        clients = clients or args.scale
        sides = runs[("project", mode, clients)], runs[("baseline", mode, clients)]
        each = [", ".join(shown(run[figure]) for run in side) for side in sides]
        paired = statistics.median(p[figure] / b[figure] for p, b in zip(*sides, strict=True))
        print(f"  {label.format(scale=args.scale)}: {each[0]} | {each[1]}; {paired:.2f}x")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
