"""The real scripts as separate processes on free loopback ports, driven as a
person would: tasks typed into the server, signals for Ctrl-C and kill."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable

import grpc
import pytest

from contact import MAX_MESSAGE_BYTES, contact_pb2
from tests.calls import GET, STATUS, TELL, send_raw
from tests.processes import ROOT, Process, start_server
from tests.test_limits import REPEAT


def hold_a_task(srv: Process, holder: Process, text: str) -> str:
    """Freeze the client `holder`, then type the task `text`, which goes to it
    and stays there unanswered; return its id."""
    holder.freeze()
    srv.type(text)
    job = srv.task_id(text)
    srv.wait_for(rf"task {job} sent to {holder.label}")
    return job


def assert_clean_exit(process: Process, code: int = 0, within: float = 10.0) -> None:
    assert process.exit_code(within) == code, process.output
    assert "Traceback" not in process.output, process.output


def test_typed_tasks_reach_a_client_and_results_reach_the_server_log(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    srv, port = start_server("--log-level", "DEBUG")  # with the status lines
    processes.append(srv)
    worker = client("worker", port, "--max-tasks", "2", "--log-level", "DEBUG")
    worker.wait_for(r"server acknowledged status: ")  # the first is sent at registration
    srv.type("hello world", "", "second task")
    srv.wait_for(r"result from worker: 'HELLO WORLD'$")
    srv.wait_for(r"result from worker: 'SECOND TASK'$")
    assert_clean_exit(worker)
    worker.wait_for(r"answered 2 tasks; exiting")
    srv.wait_for(r"status from worker: ")
    assert srv.count(r"queued for") == 2  # the blank line was no task


def test_a_task_is_logged_queued_while_no_client_may_take_it_and_sent_with_its_text(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    """One line a task on its way out: `sent to NAME: TEXT`; a task no
    connected client may take is logged as queued too, as it waits."""
    srv, port = server
    srv.type("before anyone")
    job = srv.wait_for(r"INFO task (\S+) queued for any client: 'before anyone'$").group(1)
    client("alice", port)
    srv.wait_for(rf"INFO task {job} sent to alice: 'before anyone'$")
    srv.type("hello", "@bob for bob")
    srv.wait_for(r"INFO task \S+ queued for bob: 'for bob'$")
    srv.wait_for(r"INFO task \S+ result from alice: 'HELLO'$")
    assert srv.count(r"'hello'") == 1, srv.output  # its "sent to alice" line, and no other
    assert srv.count(r"'for bob'") == 1, srv.output  # waiting for bob, so not sent


def test_a_targeted_task_reaches_only_its_client(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    srv, port = server
    alice = client("alice", port)
    srv.type("@bob secret for bob", "one", "two", "three")
    srv.wait_for(r"result from alice", count=3)
    assert srv.count("secret for bob") == 1  # queued, and waiting
    bob = client("bob", port)
    srv.wait_for(r"result from bob: 'SECRET FOR BOB'$")
    bob.wait_for(r"task \S+: 'secret for bob'")  # bob's own output may lag the server's
    assert "secret" not in alice.output.lower()
    assert bob.count(r"task \S+: ") == 1


def test_a_task_held_by_a_killed_client_goes_to_another(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    srv, port = server
    doomed = client("doomed", port)
    job = hold_a_task(srv, doomed, "rescue me")
    rescuer = client("rescuer", port)
    assert srv.count(r"result from") == 0
    doomed.send(signal.SIGKILL)
    srv.wait_for(rf"task {job} requeued \(doomed left\)")
    srv.wait_for(rf"task {job} result from rescuer: 'RESCUE ME'$")
    rescuer.wait_for(rf"task {job}: 'rescue me'")


def test_the_same_client_process_reconnects_to_a_restarted_server(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    first, port = start_server()
    processes.append(first)
    worker = client("worker", port, "--max-backoff", "1")
    first.send(signal.SIGTERM)
    assert_clean_exit(first)
    worker.wait_for(r"server 127\.0\.0\.1:\d+ unavailable .* retrying until it is back")
    second, _ = start_server(port=port)
    processes.append(second)
    worker.wait_for(r"registered with .* as worker", count=2, timeout=5)
    second.type("after the restart")
    second.wait_for(r"result from worker: 'AFTER THE RESTART'$")
    assert worker.popen.poll() is None  # the same process, still running
    assert worker.count(r"unavailable") == 1  # said once, not once per retry


@pytest.mark.parametrize("run", range(REPEAT))
def test_sigterm_stops_the_server_within_its_grace_period(
    processes: list[Process], client: Callable[..., Process], run: int
) -> None:
    srv, port = start_server("--grace", "2")
    processes.append(srv)
    worker = client("worker", port, "--max-backoff", "1")
    srv.type("@absent never answered")
    srv.task_id("never answered")
    started = time.monotonic()
    srv.send(signal.SIGTERM)
    assert_clean_exit(srv, within=4)
    assert time.monotonic() - started < 4
    srv.wait_for(r"shutting down: tasks queued: 1, in flight: 0")
    srv.wait_for(r"stopped; tasks never answered: 1")
    worker.wait_for(r"unavailable \(UNAVAILABLE: the server is shutting down\)")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_a_client_at_once_and_loses_no_task(
    server: tuple[Process, int], client: Callable[..., Process], sig: signal.Signals
) -> None:
    srv, port = server
    worker = client("worker", port)
    job = hold_a_task(srv, worker, "interrupted")
    worker.send(sig)  # handled when it runs again, racing the task it holds
    started = time.monotonic()
    worker.thaw()
    assert_clean_exit(worker, within=3)
    assert time.monotonic() - started < 3
    worker.wait_for(r"INFO stopped$")
    # Answered before the signal took effect, or taken back and answered by
    # the next client: either way exactly once.
    client("backup", port)
    srv.type("after the signal")
    srv.wait_for(r"result from backup: 'AFTER THE SIGNAL'$")  # requeued tasks come first
    assert srv.count(rf"task {job} result from (worker|backup): 'INTERRUPTED'$") == 1


def test_a_second_client_with_the_same_name_takes_over(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    srv, port = server
    old = client("twin", port)
    job = hold_a_task(srv, old, "held by the old twin")
    new = client("twin", port)
    srv.wait_for(rf"task {job} requeued \(twin replaced\)")
    srv.wait_for(rf"task {job} result from twin: 'HELD BY THE OLD TWIN'$")
    new.wait_for(rf"task {job}: ")
    old.thaw()
    assert_clean_exit(old, code=1)
    old.wait_for(r"refused this client: ABORTED: a newer client registered as twin")


# -- calls a real client never makes (tests/calls.py) ---------------------------


@pytest.mark.parametrize(
    "name", [None, "", "bad name", "x" * 65], ids=["missing", "empty", "space", "too-long"]
)
def test_a_client_without_a_valid_name_is_refused(
    server: tuple[Process, int], client: Callable[..., Process], name: str | None
) -> None:
    srv, port = server
    assert asyncio.run(send_raw(port, GET, None, name)) is grpc.StatusCode.INVALID_ARGUMENT
    srv.wait_for(r"WARNING refused a call from .*client-id")
    client("fine", port)  # and the server serves the next client as before
    srv.type("still served")
    srv.wait_for(r"result from fine: 'STILL SERVED'$")


def test_a_result_for_a_task_never_given_is_refused_and_the_task_kept(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    srv, port = server
    srv.type("@victim not yours")
    job = srv.task_id("not yours")
    forged = contact_pb2.Result(id=job, ret="forged").SerializeToString()
    # Sending nothing: the registration is checked before any message is read.
    unregistered = asyncio.run(send_raw(port, TELL, None, "mallory", registered=False))
    assert unregistered is grpc.StatusCode.FAILED_PRECONDITION
    srv.wait_for(r"refused a call from .*: mallory is not registered: call getTask first")
    code = asyncio.run(send_raw(port, TELL, forged, "mallory"))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    srv.wait_for(rf"result for task {job} refused: mallory was never given it")
    client("victim", port)
    srv.wait_for(rf"task {job} result from victim: 'NOT YOURS'$")


def test_an_oversized_message_is_refused_and_others_are_served(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    srv, port = server
    worker = client("worker", port)
    huge = contact_pb2.Result(id="x", ret="x" * MAX_MESSAGE_BYTES).SerializeToString()
    code = asyncio.run(send_raw(port, TELL, huge, "flooder"))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    srv.type("after the flood")
    srv.wait_for(r"result from worker: 'AFTER THE FLOOD'$")
    assert worker.popen.poll() is None


def test_a_malformed_message_gets_an_error_status_and_others_are_served(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    srv, port = server
    worker = client("worker", port)
    garbage = b"\xff\xff\xff"  # no protobuf message
    codes = {m: asyncio.run(send_raw(port, m, garbage, "garbler")) for m in (GET, TELL, STATUS)}
    assert codes["tellResult"] is grpc.StatusCode.INVALID_ARGUMENT
    assert codes["sendStatus"] is grpc.StatusCode.INVALID_ARGUMENT
    assert codes["getTask"] is not grpc.StatusCode.OK  # parsed by grpc itself: UNKNOWN
    srv.wait_for(r"WARNING refused a call from .*: malformed message from garbler", count=2)
    srv.type("after the garbage")
    srv.wait_for(r"result from worker: 'AFTER THE GARBAGE'$")
    assert worker.popen.poll() is None


def test_end_of_input_does_not_stop_the_server(
    server: tuple[Process, int], client: Callable[..., Process]
) -> None:
    srv, port = server
    srv.type("typed before the end", "@late waits for late")
    srv.end_input()
    srv.wait_for(r"end of standard input; still serving")
    client("late", port)
    srv.wait_for(r"result from late: 'WAITS FOR LATE'$")
    srv.wait_for(r"result from late: 'TYPED BEFORE THE END'$")
    assert srv.popen.poll() is None


def test_make_demo_exits_0() -> None:
    demo = subprocess.run(
        ["make", "--no-print-directory", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "every process exited 0" in demo.stdout
    assert "Traceback" not in demo.stdout + demo.stderr


def test_keepalive_notices_a_silently_dead_peer_on_either_side(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    """SIGSTOP leaves the TCP connection up but answers no ping: only
    keepalive can tell. Both directions run at once to share the wait."""
    srv, port = start_server()
    processes.append(srv)
    frozen = client("frozen", port)
    job = hold_a_task(srv, frozen, "stuck at a frozen client")
    rescuer = client("rescuer", port)

    frozen_srv, frozen_port = start_server()
    processes.append(frozen_srv)
    orphan = client("orphan", frozen_port)
    frozen_srv.freeze()

    started = time.monotonic()
    srv.wait_for(rf"task {job} requeued \(frozen left\)", timeout=40)
    srv.wait_for(rf"task {job} result from rescuer: ")
    orphan.wait_for(r"server 127\.0\.0\.1:\d+ unavailable", timeout=40)
    assert time.monotonic() - started < 35
    # The live pair pinged each other throughout without being cut off.
    assert "unavailable" not in rescuer.output
    assert "too_many_pings" not in rescuer.output + srv.output


@pytest.mark.parametrize("ends", ["getTask", "tellResult", "sendStatus"])
def test_a_client_reconnects_when_the_server_ends_a_stream_without_error(
    processes: list[Process], ends: str
) -> None:
    fake = Process("fake", "tests/fake_server.py", f"ends-{ends}")
    processes.append(fake)
    port = fake.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    worker = Process(
        "worker", "contact_client.py", "--server", f"127.0.0.1:{port}", "--name", "worker",
        "--max-backoff", "0.5", "--status-every", "0.1",
    )  # fmt: skip
    processes.append(worker)
    worker.wait_for(r"registered with .* as worker", count=2)
    fake.stop()
    assert worker.popen.poll() is None, worker.output
    assert "Traceback" not in worker.output, worker.output
    # How grpc words it depends on timing (OK end, or INTERNAL for a write
    # that raced it); what matters is that the client said so and came back.
    assert worker.count(r"WARNING server .* unavailable") >= 1, worker.output
