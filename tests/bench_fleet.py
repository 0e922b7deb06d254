"""`make bench`'s fleet rows: ContactServer with `--queue` (a throwaway
PostgreSQL, tests/postgres.py) against the same server in memory, in the
same run; each figure the median of --repeats runs, each run on a fresh
database. Clients are tests/bench.py's lean ones, answering at once.

    python -m tests.bench_fleet [--repeats 5] [--tasks 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tests.bench import QUEUE_URL, ROOT, measure, shown
from tests.postgres import INSTALL_HINT, Postgres, binaries

# label, clients, figure, higher is better, target ratio (queue / memory).
# Clients 0: two servers on one database, two clients each, the tasks asked
# on one of them; against one server in memory with four clients.
ROWS = [
    ("ContactServer with --queue, ask per task, 1 client (tasks/s)", 1, "tasks_per_s", True, 0.5),
    ("  server CPU per task (µs)", 1, "cpu_us", False, None),
    ("  4 clients (tasks/s)", 4, "tasks_per_s", True, 0.5),
    ("  server CPU per task (µs)", 4, "cpu_us", False, None),
    ("two servers on one database, 2 clients each (tasks/s)", 0, "tasks_per_s", True, None),
    ("  CPU per task of the server asked (µs)", 0, "cpu_us", False, None),
]
PEER_CLIENTS = 2


@contextmanager
def peer(url: str) -> Iterator[None]:
    """Another server of the fleet on `url`, with PEER_CLIENTS lean clients,
    ready (its clients registered) until the block ends."""
    command = [sys.executable, "-m", "tests.bench"]
    env = {**os.environ, QUEUE_URL: url}
    server = subprocess.Popen(
        [*command, "serve", "server-queue-peer", "throughput", str(PEER_CLIENTS), "0", "."],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert server.stdout is not None
    clients = None
    try:
        port = json.loads(server.stdout.readline())["port"]
        clients = subprocess.Popen(
            [*command, "clients", str(port), str(PEER_CLIENTS), "peer"],
            cwd=ROOT, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        json.loads(server.stdout.readline())  # ready
        yield
    finally:
        for process in (clients, server):
            if process is not None:
                process.kill()
                process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per run")
    args = parser.parse_args()
    found = binaries()
    if found is None:
        print(f"fleet rows skipped: {INSTALL_HINT}")
        return 0
    postgres = Postgres(found)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        made = 0
        for repeat in range(args.repeats):
            for clients in (1, 4, 0):
                for impl in ("server", "server-queue"):  # interleaved: drift hits both
                    print(f"repeat {repeat + 1}/{args.repeats}: {impl} x{clients}", flush=True)
                    made += 1
                    url = os.environ[QUEUE_URL] = postgres.new_database(f"bench{made}")
                    if clients or impl == "server":
                        figures = measure(impl, "throughput", clients or 4, args.tasks)
                    else:
                        with peer(url):
                            figures = measure(impl, "throughput", PEER_CLIENTS, args.tasks)
                    runs.setdefault((impl, clients), []).append(figures)
    finally:
        postgres.stop()
    print(f"\nmedians of {args.repeats} runs; project: --queue, baseline: in memory")
    print("| measure | project | baseline | ratio | target |\n|---|---:|---:|---:|---|")
    failures = 0
    for label, clients, figure, higher_better, target in ROWS:
        project = statistics.median(r[figure] for r in runs[("server-queue", clients)])
        baseline = statistics.median(r[figure] for r in runs[("server", clients)])
        ratio, verdict = project / baseline, ""
        if target is not None:
            met = ratio >= target if higher_better else ratio <= target
            failures += not met
            verdict = f"{'>=' if higher_better else '<='} {target}x {'met' if met else 'MISSED'}"
        print(f"| {label} | {shown(project)} | {shown(baseline)} | {ratio:.2f}x | {verdict} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
