"""Floods the server must take without starving its clients: a burst of
lines piped into it while real clients work.

`make test` pipes CONTACT_BURST_LINES lines (5,000 by default); `make
soak` pipes 200,000, the size that used to stall the loop for 14.5 s and
drop every client.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.processes import Process, start_client, start_server

BURST_LINES = int(os.environ.get("CONTACT_BURST_LINES", "5000"))


def count_until(process: Process, pattern: str, count: int, timeout: float) -> float:
    """Wait until `count` output lines match `pattern` (reading each line once);
    return how long it took."""
    regex, seen, read = re.compile(pattern), 0, 0
    began = time.monotonic()
    while seen < count:
        left = timeout - (time.monotonic() - began)
        process.wait_for(r"", timeout=max(left, 0.0), after=read)  # a line we have not read
        new = process.lines_since(read)
        read += len(new)
        seen += sum(1 for line in new if regex.search(line))
    return time.monotonic() - began


@pytest.mark.timeout(max(60, BURST_LINES / 200))
def test_a_piped_burst_starves_no_client(processes: list[Process]) -> None:
    srv, port = start_server()
    processes.append(srv)
    workers = [start_client(f"w{n}", port, "--concurrency", "4") for n in range(2)]
    processes.extend(workers)
    began = time.monotonic()
    srv.type(*(f"task {n}" for n in range(BURST_LINES)))  # returns once the server read them
    took = count_until(srv, r"result from w\d: 'TASK \d+'$", BURST_LINES, BURST_LINES / 200)
    print(
        f"{BURST_LINES} lines piped: read in {time.monotonic() - began - took:.1f} s, "
        f"all answered {took:.1f} s later"
    )
    for worker in workers:
        assert "unavailable" not in worker.output, worker.output[-2000:]
        assert worker.count(r"registered with") == 1
    assert srv.count(r"requeued|taken back") == 0
