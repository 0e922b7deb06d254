"""`make bench`'s fleet rows: ContactServer with `--queue` (a throwaway
PostgreSQL, tests/postgres.py) against the same server in memory, in the
same run; each figure the median of --repeats runs, each run on a fresh
database. Clients are tests/bench.py's lean ones, answering at once.

    python -m tests.bench_fleet [--repeats 5] [--tasks 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from tests.bench import QUEUE_URL, measure, shown
from tests.postgres import INSTALL_HINT, Postgres, binaries

# label, clients, figure, higher is better, target ratio (queue / memory)
ROWS = [
    ("ContactServer with --queue, ask per task, 1 client (tasks/s)", 1, "tasks_per_s", True, 0.5),
    ("  server CPU per task (µs)", 1, "cpu_us", False, None),
    ("  4 clients (tasks/s)", 4, "tasks_per_s", True, 0.5),
    ("  server CPU per task (µs)", 4, "cpu_us", False, None),
]


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
            for clients in sorted({row[1] for row in ROWS}):
                for impl in ("server", "server-queue"):  # interleaved: drift hits both
                    print(f"repeat {repeat + 1}/{args.repeats}: {impl} x{clients}", flush=True)
                    made += 1
                    os.environ[QUEUE_URL] = postgres.new_database(f"bench{made}")
                    runs.setdefault((impl, clients), []).append(
                        measure(impl, "throughput", clients, args.tasks)
                    )
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
