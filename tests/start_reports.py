"""What start reports (`reports-start`, Result.started) cost the server:
tasks typed into a real server at WARNING and answered by one shipped
client process (concurrency 4), with and without the client asking for
them, in turn; medians of the repeats, with the server's CPU per task.

    python -m tests.start_reports [--tasks 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import psutil

import contact_client
from tests.processes import ROOT, Process, free_port


def one_run(tasks: int, reports_start: bool) -> tuple[float, float]:
    """(tasks per second, server CPU µs per task) of one run."""
    port = free_port()
    server = Process("server", "contact_server.py", "--port", str(port), "--log-level", "WARNING")
    client_args = ["--concurrency", "4", "--max-tasks", str(tasks), "--log-level", "WARNING"]
    client = Process(
        "client", "tests/start_reports.py", "client", str(port), str(int(reports_start)),
        *client_args,
    )  # fmt: skip
    try:
        time.sleep(2.0)  # both up and registered (neither says so at WARNING)
        cpu = psutil.Process(server.pid)
        cpu_before, began = sum(cpu.cpu_times()[:2]), time.monotonic()
        server.type(*(f"task {n}" for n in range(tasks)))
        assert client.exit_code(timeout=300) == 0, client.output
        took, cpu_used = time.monotonic() - began, sum(cpu.cpu_times()[:2]) - cpu_before
        return tasks / took, cpu_used / tasks * 1e6
    finally:
        server.stop()
        client.stop()


def client_main(port: str, reports_start: str, *args: str) -> int:
    """The shipped client; without `reports_start` it asks under a key no server knows."""
    if reports_start == "0":
        # As an older client: the server sees no reports-start, and echoes none.
        setattr(contact_client, "REPORTS_START_KEY", "x-no-reports-start")  # noqa: B010
    sys.argv = ["contact_client.py", "--server", f"127.0.0.1:{port}", "--name", "w", *args]
    return contact_client.main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for reports_start in (True, False):
            runs[reports_start].append(one_run(args.tasks, reports_start))
    for reports_start, figures in runs.items():
        rate = statistics.median(rate for rate, _ in figures)
        cpu = statistics.median(cpu for _, cpu in figures)
        label = "with start reports" if reports_start else "without"
        print(f"{label}: {rate:,.0f} tasks/s, server CPU {cpu:.0f} µs per task (median)")
    print(f"({args.repeats} runs each of {args.tasks:,} tasks, from {ROOT})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        raise SystemExit(client_main(*sys.argv[2:]))
    main()
