"""Clients that stay connected but misbehave, and tasks that misbehave: a
client that never answers, a task that kills whoever takes it, a handler
that returns nonsense. Real processes throughout."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from contact import CLIENT_ID_KEY, MAX_IN_FLIGHT_KEY, contact_pb2, contact_pb2_grpc
from contact_server import ContactServer, TaskFailedError
from tests.measure import rss_mb
from tests.processes import Process, logged_at, start_server
from tests.proxy import Proxy


def test_a_client_that_never_answers_loses_its_tasks_when_their_lease_runs_out(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    srv, port = start_server("--task-timeout", "2")
    processes.append(srv)

    async def scenario() -> None:
        metadata = ((CLIENT_ID_KEY, "hung"), (MAX_IN_FLIGHT_KEY, "2"))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # Registered and alive (gRPC answers its pings), but it reads and answers nothing.
            call = contact_pb2_grpc.ContactStub(channel).getTask(
                contact_pb2.Empty(), metadata=metadata
            )
            await call.initial_metadata()
            srv.type("held one", "held two")
            await asyncio.to_thread(srv.wait_for, r"sent to hung", 10.0, 2)
            await asyncio.to_thread(client, "rescuer", port)
            for text in ("HELD ONE", "HELD TWO"):
                await asyncio.to_thread(srv.wait_for, rf"result from rescuer: '{text}'$", 10.0)
            srv.type(*(f"later {i}" for i in range(5)))
            await asyncio.to_thread(srv.wait_for, r"result from rescuer: 'LATER \d'$", 10.0, 5)
            call.cancel()

    asyncio.run(scenario())
    for text in ("held one", "held two"):
        job = srv.task_id(text)
        sent = srv.wait_for(rf"task {job} sent to hung")
        srv.wait_for(rf"task {job} taken back from hung: no answer within 2 s")
        answered = srv.wait_for(rf"task {job} result from rescuer")
        assert logged_at(answered.string) - logged_at(sent.string) <= 5.0
    assert srv.count(r"sent to hung") == 2  # nothing beyond its window


def test_a_hung_client_with_a_wide_window_gets_nothing_once_a_lease_ran_out(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    """Its window (the server's 32) is no invitation: after one lease ran out
    it is sent nothing until it answers, and its task goes to the idle client."""
    srv, port = start_server("--task-timeout", "2")
    processes.append(srv)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = contact_pb2_grpc.ContactStub(channel).getTask(
                contact_pb2.Empty(),
                metadata=((CLIENT_ID_KEY, "hung"),),  # no window: 32
            )
            await call.initial_metadata()
            await asyncio.to_thread(client, "idle", port)  # registered after: ties go to hung
            srv.type("held")
            await asyncio.to_thread(srv.wait_for, r"sent to hung")
            await asyncio.to_thread(srv.wait_for, r"result from idle: 'HELD'$", 10.0)
            srv.type(*(f"later {i}" for i in range(10)))
            await asyncio.to_thread(srv.wait_for, r"result from idle: 'LATER \d'$", 10.0, 10)
            call.cancel()

    asyncio.run(scenario())
    job = srv.task_id("held")
    expired = srv.wait_for(rf"task {job} taken back from hung: no answer within 2 s")
    answered = srv.wait_for(rf"task {job} result from idle")
    assert logged_at(answered.string) - logged_at(expired.string) <= 5.0
    assert srv.count(r"sent to hung") == 1  # the one task, and nothing after


def odd_client(processes: list[Process], name: str, port: int, *args: str) -> Process:
    """tests/odd_client.py (run() with a handler that naps on cue), once registered."""
    started = Process(name, "tests/odd_client.py", f"127.0.0.1:{port}", name, *args)
    processes.append(started)
    started.wait_for(rf"registered with .* as {name}$")
    return started


def test_a_task_waiting_behind_a_slow_one_is_not_taken_back(processes: list[Process]) -> None:
    """The client says when it begins each task, and its lease runs from
    then: a task it holds behind one longer than the lease waits its turn
    and is answered once, by that client."""
    srv, port = start_server("--task-timeout", "3")
    processes.append(srv)
    worker = odd_client(processes, "worker", port)  # one at a time, up to 3 more held
    srv.type("nap 4.5", "waiting")
    srv.wait_for(r"result from worker: 'WAITING'$", timeout=15)
    slow = srv.task_id("nap 4.5")
    waiting = srv.task_id("waiting")
    srv.wait_for(rf"task {slow} taken back from worker: no answer within 3 s")  # longer than that
    srv.wait_for(rf"task {slow} result from worker: 'NAP 4.5'$")  # late, still first: accepted
    assert srv.count(rf"task {waiting} sent to") == 1
    assert srv.count(rf"task {waiting} (taken back|requeued)") == 0
    assert srv.count(rf"task {waiting} result from") == 1
    worker.wait_for(r"'waiting' -> 'WAITING'$")  # its output may lag the server's
    assert worker.count(rf"started task {waiting} \(attempt 1\)") == 1


def test_a_hung_client_loses_the_tasks_it_has_not_begun_to_a_helper(
    processes: list[Process],
) -> None:
    """The shipped run() with a handler that never returns: its task fails
    once its lease runs out (one attempt allowed), and the three it holds
    behind it go to a helper a lease later, uncharged; the hung client
    drops them when told."""
    srv, port = start_server("--task-timeout", "1", "--max-attempts", "1")
    processes.append(srv)
    stuck = odd_client(processes, "stuck", port)
    srv.type("nap 600", "a", "b", "c")
    srv.wait_for(r"sent to stuck", count=4)
    helper = odd_client(processes, "helper", port)
    for text in "ABC":
        srv.wait_for(rf"result from helper: '{text}'$", timeout=10)
    srv.wait_for(r"failed: sent 1 times without an answer: 'nap 600'$")
    assert srv.count(r"taken back from stuck before it began: 2 s without a sign of life") == 3
    stuck.wait_for(r"withdrawn by the server: dropped before it started", count=3)
    helper.wait_for(r"started task \S+ \(attempt 1\)", count=3)  # its output may lag
    assert srv.count(r"sent to stuck") == 4


def test_eight_takeovers_in_a_row_fail_none_of_the_tasks_held(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    """A newer client under a name is no evidence against the tasks the older
    held: 8 takeovers with --max-attempts 3 charge none of them."""
    srv, port = start_server("--max-attempts", "3")
    processes.append(srv)
    srv.type(*(f"@victim task {n}" for n in range(10)))
    srv.wait_for(r"queued for victim: 'task 9'$")

    async def take_over_eight_times() -> None:
        metadata = ((CLIENT_ID_KEY, "victim"), (MAX_IN_FLIGHT_KEY, "10"))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contact_pb2_grpc.ContactStub(channel)
            calls = []
            for _ in range(8):  # each registration ends the one before (ABORTED)
                calls.append(stub.getTask(contact_pb2.Empty(), metadata=metadata))
                await calls[-1].initial_metadata()
            for call in calls:
                call.cancel()

    asyncio.run(take_over_eight_times())
    srv.wait_for_total(r"client victim disconnected", "disconnect", 8)  # all eight are gone
    client("victim", port)
    srv.wait_for(r"result from victim: 'TASK \d'$", count=10, timeout=20)
    assert srv.count(r"failed") == 0, srv.output
    srv.wait_for_total(r"requeued \(victim (replaced|left)\)", "requeued", 80)  # each held ten


def test_a_task_that_kills_every_client_fails_and_the_rest_are_answered(
    processes: list[Process], store: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, max_attempts=3, grace=1, **store) as server:
            poison = await server.submit("poison")
            healthy = [await server.submit(f"healthy {i}") for i in range(6)]
            for number in range(4):  # each dies of the poison it is sent, but the last
                name = f"victim-{number}"
                odd = Process(name, "tests/odd_client.py", f"127.0.0.1:{server.port}", name)
                processes.append(odd)
            with pytest.raises(TaskFailedError, match="sent 3 times without an answer"):
                await asyncio.wait_for(poison, 30)
            answers = await asyncio.wait_for(asyncio.gather(*healthy), 30)
            assert answers == [f"HEALTHY {i}" for i in range(6)]

    asyncio.run(scenario())
    # The server sees a victim's sockets close a moment before its process
    # can be reaped: stop the survivors, then wait for every exit code.
    for process in processes:
        if process.popen.poll() is None:
            process.send(signal.SIGINT)
    exits = [process.exit_code() for process in processes]
    victims = "\n".join(process.output for process in processes)
    assert exits.count(3) == 3, victims  # three died of it, one was never sent it again


def test_whatever_the_handler_does_the_task_fails_with_why_and_the_next_is_served(
    server: tuple[Process, int], processes: list[Process]
) -> None:
    srv, port = server
    odd = Process("odd", "tests/odd_client.py", f"127.0.0.1:{port}", "odd")
    processes.append(odd)
    odd.wait_for(r"registered with .* as odd$")
    srv.type("none", "exit", "surrogate", "after them")
    srv.wait_for(r"result from odd: 'AFTER THEM'$")
    errors = {
        "none": r"the handler returned NoneType, not str",
        "exit": r"SystemExit: 2",
        "surrogate": r"the answer cannot be sent: it is not valid text \(surrogates not allowed",
    }
    for text, error in errors.items():
        job = srv.task_id(text)
        srv.wait_for(rf"task {re.escape(job)} failed at odd: '{error}")
    assert srv.count(r"result from odd") == 1  # a failure is no answer
    assert odd.popen.poll() is None  # still serving


def test_a_reconnect_during_a_long_task_does_not_start_it_again(
    server: tuple[Process, int], processes: list[Process]
) -> None:
    srv, port = server

    async def scenario() -> None:
        async with Proxy(port) as proxy:
            odd = Process(
                "odd", "tests/odd_client.py", f"127.0.0.1:{proxy.port}", "odd", "--sleep", "3"
            )
            processes.append(odd)
            await asyncio.to_thread(odd.wait_for, r"registered with .* as odd$")
            srv.type("long task")
            job = (await asyncio.to_thread(odd.wait_for, r"started task (\S+)")).group(1)
            proxy.cut()  # the network drops in the middle of the task
            await asyncio.to_thread(srv.wait_for, rf"task {job} requeued \(odd left\)")
            await asyncio.to_thread(odd.wait_for, r"registered with .* as odd$", 10.0, 2)
            await asyncio.to_thread(srv.wait_for, rf"task {job} sent to odd", 10.0, 2)
            await asyncio.to_thread(srv.wait_for, rf"task {job} result from odd: 'LONG TASK'$")
            assert odd.count(rf"started task {job}") == 1  # sent twice, worked on once

    asyncio.run(scenario())


def test_a_client_retries_a_server_that_never_answers_registration(
    processes: list[Process],
) -> None:
    stuck = Process("stuck", "tests/fake_server.py", "never-answers")
    processes.append(stuck)
    port = stuck.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    client = Process("client", "contact_client.py", "--server", f"127.0.0.1:{port}")
    processes.append(client)
    stuck.wait_for(r"getTask call")
    first = time.monotonic()
    line = client.wait_for(r"unavailable \((.*)\)", timeout=15)
    assert "no answer to getTask in 5 s" in line.group(1)
    stuck.wait_for(r"getTask call", count=2, timeout=5)  # it tries again, after a short backoff
    assert time.monotonic() - first < 15


def test_a_busy_client_that_is_taken_over_stops_within_a_second(
    server: tuple[Process, int], processes: list[Process], client: Callable[..., Process]
) -> None:
    srv, port = server
    old = Process("old", "tests/odd_client.py", f"127.0.0.1:{port}", "twin", "--sleep", "1")
    processes.append(old)
    old.wait_for(r"registered with .* as twin$")
    srv.type(*(f"busy {i}" for i in range(8)))
    old.wait_for(r"started task")  # one running, three more waiting at it
    client("twin", port)  # the new twin takes over
    taken_over = time.monotonic()
    assert old.exit_code(3) == 1
    stopped = time.monotonic() - taken_over
    print(f"the old client stopped {stopped:.2f} s after the takeover")
    assert stopped < 1.0
    old.wait_for(r"refused this client: ABORTED: a newer client registered as twin")
    assert old.count(r"started task") <= 2  # at most the one that was running, and none after
    srv.wait_for(r"result from twin: 'BUSY \d'$", count=8, timeout=20)


def fake_server(processes: list[Process], kind: str) -> tuple[Process, str]:
    fake = Process("fake", "tests/fake_server.py", kind)
    processes.append(fake)
    return fake, fake.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)


def test_a_server_that_does_not_echo_reports_start_is_sent_plain_answers(
    processes: list[Process],
) -> None:
    """Older servers know no Result.started: the client reports starts only
    to a server that echoed `reports-start`."""
    fake, port = fake_server(processes, "older")
    worker = Process("worker", "contact_client.py", "--server", f"127.0.0.1:{port}")
    processes.append(worker)
    fake.wait_for(r"^result ", count=5)
    results = [line for line in fake.lines if line.startswith("result ")]
    assert all(re.fullmatch(r"result id='x-\d+' started=\[\]", line) for line in results), results


def test_a_server_that_pushes_past_the_window_is_dropped_and_memory_stays_small(
    processes: list[Process],
) -> None:
    fake, port = fake_server(processes, "floods")
    worker = Process("worker", "contact_client.py", "--server", f"127.0.0.1:{port}")
    processes.append(worker)
    worker.wait_for(r"unavailable \(the server sent more than the 4 tasks asked\)")
    peak = 0.0
    for calls in range(2, 6):  # it calls again, with backoff, and is dropped again
        fake.wait_for(r"getTask call", count=calls, timeout=15)
        peak = max(peak, rss_mb(worker.pid))
    print(f"client memory against a flooding server: {peak:.0f} MB")
    assert peak < 100
    assert worker.popen.poll() is None


def test_a_server_that_sends_headers_without_the_echo_is_called_again_within_10_s(
    processes: list[Process],
) -> None:
    fake, port = fake_server(processes, "no-echo")
    worker = Process("worker", "contact_client.py", "--server", f"127.0.0.1:{port}")
    processes.append(worker)
    first = time.monotonic()
    fake.wait_for(r"getTask call")
    fake.wait_for(r"getTask call", count=2, timeout=10)
    print(f"getTask called again after {time.monotonic() - first:.1f} s")
    worker.wait_for(r"unavailable \(no answer to getTask in 5 s\)")


def test_a_client_with_a_task_limit_leaves_a_server_that_never_ends_tell_result(
    processes: list[Process],
) -> None:
    fake, port = fake_server(processes, "keeps-results")
    worker = Process(
        "worker", "contact_client.py", "--server", f"127.0.0.1:{port}", "--max-tasks", "3"
    )
    processes.append(worker)
    fake.wait_for(r"tellResult closed by the client")
    closed = time.monotonic()
    assert worker.exit_code(10) == 0, worker.output
    print(f"the client left {time.monotonic() - closed:.1f} s after closing tellResult")
    worker.wait_for(r"the server did not confirm the last answers \(no answer to the last")
    worker.wait_for(r"answered 3 tasks; exiting")
