"""Floods the server must take without starving its clients or drowning
its log: a burst of lines piped into it while real clients work, malformed
calls, and clients that register and leave in a loop.

`make test` pipes CONTACT_BURST_LINES lines (60,000 by default: about
the size that used to drop every client); `make soak` pipes 200,000, which
used to stall the loop for 14.5 s.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import grpc
import pytest

from contact import CLIENT_ID_KEY, contact_pb2, contact_pb2_grpc
from tests.measure import rss_mb
from tests.processes import Process, free_port, start_client, start_server

BURST_LINES = int(os.environ.get("CONTACT_BURST_LINES", "60000"))


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
@pytest.mark.alone
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


@pytest.mark.alone
def test_malformed_get_task_calls_write_a_summary_not_tracebacks(
    processes: list[Process],
) -> None:
    srv, port = start_server()
    processes.append(srv)
    calls = 2000

    async def attack() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            get_task = channel.unary_stream("/contact.Contact/getTask")
            for _ in range(calls):  # bytes that are no valid Empty
                call = get_task(b"\xff\xff\xff", metadata=((CLIENT_ID_KEY, "x"),))
                assert await call.code() is grpc.StatusCode.UNKNOWN

    before = len(srv.lines)
    asyncio.run(attack())
    # Every call is told, the last "... and N more" summary included.
    srv.wait_for_total(r"refused a request that is no valid message", "undecodable request", calls)
    log = "\n".join(srv.lines_since(before))
    print(f"{calls} malformed getTask calls: {len(log.encode())} bytes of log")
    assert len(log.encode()) < 100_000 and "Traceback" not in log


@pytest.mark.alone
def test_register_and_leave_cycles_write_little(processes: list[Process]) -> None:
    srv, port = start_server()
    processes.append(srv)
    cycles = 5000

    async def attack() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contact_pb2_grpc.ContactStub(channel)
            for number in range(cycles):
                call = stub.getTask(contact_pb2.Empty(), metadata=((CLIENT_ID_KEY, f"c{number}"),))
                await call.initial_metadata()
                call.cancel()

    before = len(srv.lines)
    asyncio.run(attack())
    srv.wait_for_total(r"client c\d+ disconnected", "disconnect", cycles)  # every one is told
    srv.wait_for_total(r"client c\d+ connected", "connect", cycles)
    log = "\n".join(srv.lines_since(before))
    print(f"{cycles} register-and-leave cycles: {len(log.encode())} bytes of log")
    assert len(log.encode()) < 100_000


QUEUE_LINES = 30_000  # over six times what the pipe, the reader and a batch hold (~4,500)


@pytest.mark.timeout(120)
@pytest.mark.alone
def test_past_max_queued_the_server_reads_no_further_and_loses_nothing(
    processes: list[Process],
) -> None:
    """30,000 lines for a name connected nowhere, into a server that queues
    at most 100: it stops reading its input (its memory stays flat), and
    once the name connects every line is answered. Both sides log at
    WARNING: 90,000 INFO lines would cost most of the test's time."""
    port = free_port()  # (at WARNING the server does not say which it got)
    quiet = ("--log-level", "WARNING")
    srv = Process("server", "contact_server.py", "--port", str(port), "--max-queued", "100", *quiet)
    processes.append(srv)
    typing = threading.Thread(
        target=srv.type, args=[f"@absent task {n}" for n in range(QUEUE_LINES)], daemon=True
    )
    typing.start()  # it blocks once the server stops reading
    srv.wait_for(r"the queue is full \(100 tasks\)")
    full = rss_mb(srv.pid)
    typing.join(2.0)
    assert typing.is_alive()  # most lines are still unread, in the pipe
    later = rss_mb(srv.pid)
    assert later - full < 5 and later < 100, f"{full:.0f} MB when full, {later:.0f} MB 2 s later"
    answers = ("--concurrency", "4", "--max-tasks", str(QUEUE_LINES), *quiet)
    server = ("--server", f"127.0.0.1:{port}")
    absent = Process("absent", "contact_client.py", *server, "--name", "absent", *answers)
    processes.append(absent)
    began = time.monotonic()
    assert absent.exit_code(timeout=100) == 0  # it exits once it answered them all
    typing.join(5.0)
    print(
        f"max-queued 100: server {full:.0f} MB when full, {later:.0f} MB 2 s later; "
        f"{QUEUE_LINES} lines answered {time.monotonic() - began:.1f} s after the name connected"
    )
    srv.wait_for(r"the queue has room again")
    srv.send(signal.SIGINT)
    assert srv.exit_code() == 0
    assert srv.count(r"ERROR|requeued|taken back") == 0
