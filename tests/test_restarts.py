"""A server killed and restarted on the same port, ten times over, under real
client processes: each comes back by itself within its backoff cap, and none
of them grows in threads, file descriptors or asyncio tasks."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.measure import thread_names, threads_and_handles
from tests.processes import Process, start_server

CLIENTS = ["c0", "c1", "c2"]
CYCLES = 10
MAX_BACKOFF = 1.0


def resources(process: Process, settle_to: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """Threads, open file descriptors and asyncio tasks (at its last
    registration) of a running client. Each task is answered in a short-lived
    thread, and grpc closes an old connection's socket a moment after the
    channel, so the least of samples is taken: over half a second, or, with
    `settle_to`, until threads and descriptors are no more than that (at most
    SETTLE_SECONDS). One on its way out is not counted; one that stays is."""
    samples: list[tuple[int, int]] = []
    deadline = time.monotonic() + (0.5 if settle_to is None else SETTLE_SECONDS)
    while time.monotonic() < deadline:
        samples.append(threads_and_handles(process.pid))
        least = (min(t for t, _ in samples), min(f for _, f in samples))
        if settle_to is not None and least[0] <= settle_to[0] and least[1] <= settle_to[1]:
            break
        time.sleep(0.05)
    last = process.wait_for(r"(\d+) asyncio tasks alive", count=process.count("tasks alive"))
    return least[0], least[1], int(last.group(1))


SETTLE_SECONDS = 3.0


@pytest.mark.alone
def test_clients_survive_ten_server_restarts_without_growing(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    srv, port = start_server()
    processes.append(srv)
    workers = [
        client(name, port, "--max-backoff", str(MAX_BACKOFF), "--log-level", "DEBUG")
        for name in CLIENTS
    ]
    usage: list[list[tuple[int, int, int]]] = []
    for cycle in range(1, CYCLES + 1):
        srv.send(signal.SIGTERM if cycle % 2 else signal.SIGKILL)
        srv.exit_code(5)
        srv, _ = start_server(port=port)
        processes.append(srv)
        listening = time.monotonic()
        for worker in workers:
            worker.wait_for(r"registered with", count=cycle + 1, timeout=MAX_BACKOFF + 5)
        # Within the cap, plus a little for connecting and loaded machines.
        assert time.monotonic() - listening < MAX_BACKOFF + 1.5, f"cycle {cycle}"
        srv.type(*(f"@{name} cycle {cycle}" for name in CLIENTS))
        for name in CLIENTS:
            srv.wait_for(rf"result from {name}: 'CYCLE {cycle}'$")
        if cycle == 1:
            usage.append([resources(worker) for worker in workers])
    usage.append([resources(w, usage[0][i][:2]) for i, w in enumerate(workers)])
    for index, worker in enumerate(workers):
        first, last = usage[0][index], usage[-1][index]
        # One thread more than the first sample is allowed: a CI run under
        # load (another suite beside it, 2026-12-03) saw 9 -> 10 once, which
        # did not come back in six runs alone or beside two busy processes.
        # A leak of one per restart would show 10 more.
        grew = f"{worker.label} threads grew: {first} -> {last}"
        assert last[0] <= first[0] + 1, f"{grew} ({', '.join(thread_names(worker.pid))})"
        # grpc may hold a socket or two of replaced connections a while: a
        # client sampled a second after each of 12 restarts held 13 or 14 at
        # random, an idle one sat at 14 for 12 s after its 10th, one CI run
        # saw 15 and one (its suite on 3.10, 2026-12-02) 16. A leak of one
        # per restart would show 10 more.
        assert last[1] <= first[1] + 4, f"{worker.label} file descriptors grew: {first} -> {last}"
        assert last[2] <= first[2], f"{worker.label} asyncio tasks grew: {first} -> {last}"
        assert worker.popen.poll() is None
    print("threads, fds, asyncio tasks per client after cycle 1 and 10:",
          list(zip(usage[0], usage[-1], strict=True)))  # fmt: skip
