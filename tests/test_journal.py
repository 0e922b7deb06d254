"""--journal FILE: tasks survive a server killed at any instant, and a
journal that cannot be used stops the server with one clear line.

The kill test is the issue's own: real processes, tasks typed in, the
server SIGKILLed at random moments and started again on the same file.
Set CONTACT_SEED to replay a run's kill moments (each run prints its seed).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from contact.logtext import BatchedHandler
from contact.queue import sqlite as sqlite_module
from contact.queue.base import NewTask, Task
from contact.queue.sqlite import JournalError, SqliteQueue
from contact_server import ContactServer
from tests.processes import ROOT, Process, free_port, logged_at, start_server

TASKS = 2_000
KILLS = 3
CLIENTS = 4
QUEUED = re.compile(r"task (\S+) (?:queued|recovered) for any client: '(.*)'$")
RESULT = re.compile(r"task (\S+) result from \S+: '(.*)'$")
SENT = re.compile(r"task (\S+) sent to \S+: ")
# An answer is logged before its task's removal is committed, and that commit
# comes within a batch window (5 ms) once the writer is free. The bound is on
# time, not on answers: in a CI run (tests four at a time) one commit waited
# while 137 answers came (a bound of 99 answers failed); here it is 3-5 ms.
REMOVAL_WITHIN_SECONDS = 1.0


@dataclass
class Run:
    """What one server process logged."""

    texts: dict[str, str] = field(default_factory=dict)  # id -> text, queued or recovered
    recovered: set[str] = field(default_factory=set)
    recovered_in_order: list[str] = field(default_factory=list)  # ids, as logged
    listening_at: int = -1  # the line that says the server listens
    answered: list[str] = field(default_factory=list)  # ids, in the order their results came
    answered_at: dict[str, float] = field(default_factory=dict)  # id -> when its result was logged
    sent: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, server: Process) -> Run:
        run = cls()
        for line in server.lines:
            if match := QUEUED.search(line):
                run.texts[match.group(1)] = match.group(2)
                if " recovered for " in line:
                    run.recovered.add(match.group(1))
                    run.recovered_in_order.append(match.group(1))
            elif match := RESULT.search(line):
                run.answered.append(match.group(1))
                run.answered_at[match.group(1)] = logged_at(line)
                assert match.group(2) == run.texts[match.group(1)].upper(), line
            elif match := SENT.search(line):
                run.sent.add(match.group(1))
            elif "listening on" in line:
                run.listening_at = len(run.answered) + len(run.texts)  # lines that count so far
        return run


def submission_order(task_id: str) -> tuple[int, int]:
    """Ids are TOKEN.START-NUMBER: earlier starts first, then in order within one."""
    start, _, number = task_id.rpartition(".")[2].partition("-")
    return int(start), int(number)


def journalled_server(
    journal: Path, processes: list[Process], port: int = 0
) -> tuple[Process, int]:
    server, port = start_server("--journal", str(journal), port=port)
    processes.append(server)
    return server, port


def test_tasks_survive_three_kills_of_the_server(processes: list[Process], tmp_path: Path) -> None:
    seed = int(os.environ.get("CONTACT_SEED", random.randrange(1_000_000)))
    print(f"seed {seed} (CONTACT_SEED={seed} replays these kill moments)")
    rng = random.Random(seed)
    journal = tmp_path / "tasks.journal"
    typed = [f"job {n:04}" for n in range(TASKS)]
    server, port = journalled_server(journal, processes)
    for number in range(CLIENTS):  # each handler takes 2 ms, two at a time
        name = f"worker-{number}"
        args = [f"127.0.0.1:{port}", name, "--sleep", "0.002", "--concurrency", "2"]
        processes.append(Process(name, "tests/odd_client.py", *args))

    runs: list[Run] = []
    while True:
        # What earlier runs logged as queued, and what this one recovered
        # (listed before it listens): retyping a recovered line repeats it.
        queued = {text for run in [*runs, Run.read(server)] for text in run.texts.values()}
        retyped = [text for text in typed if text not in queued]  # all of them, at first
        server.type(*retyped)
        if len(runs) == KILLS:
            break
        server.wait_for(r"result from", count=rng.randint(50, 400), timeout=60)
        server.popen.kill()  # SIGKILL: no clean-up of any kind
        server.exit_code()
        runs.append(Run.read(server))
        server, _ = journalled_server(journal, processes, port)

    # The last run answers what it recovered and what was typed into it, once each.
    recovered = len(Run.read(server).recovered)
    server.wait_for(r"result from", count=recovered + len(retyped), timeout=60)
    server.send(signal.SIGINT)
    assert server.exit_code() == 0
    server.wait_for(r"stopped; tasks never answered: 0$")
    runs.append(Run.read(server))

    # Every typed task has a result, with its text, in some run's log; each
    # kept one id for life.
    texts = {task_id: text for run in runs for task_id, text in run.texts.items()}
    answered = {task_id for run in runs for task_id in run.answered}
    assert sorted(texts[task_id] for task_id in answered) == typed
    assert len(texts) == TASKS
    for before, after in itertools.pairwise(runs):
        # What a kill leaves unfinished is exactly what the next run
        # recovers, plus the answers whose removal was not committed yet:
        # those are the only tasks answered twice, and they are the last
        # answers before the kill (commits land in order).
        twice = set(before.answered) & after.recovered
        assert after.recovered == set(before.texts) - set(before.answered) | twice
        # Queued again in the order they were first submitted, before any client is served.
        assert after.recovered_in_order == sorted(after.recovered, key=submission_order)
        assert after.listening_at == len(after.recovered)
        assert set(before.answered[len(before.answered) - len(twice) :]) == twice
        in_flight = before.sent - set(before.answered)
        print(
            f"kill: {len(before.answered)} answered in that run, {len(in_flight)} in flight, "
            f"{len(after.recovered)} recovered, answered again after it: {len(twice)}"
        )
        # Only answers of the kill's last moments lose their removal's commit.
        last = before.answered_at[before.answered[-1]] if before.answered else 0.0
        waited = max((last - before.answered_at[task_id] for task_id in twice), default=0.0)
        print(f"  the oldest of those was logged {1000 * waited:.0f} ms before the last answer")
        assert waited < REMOVAL_WITHIN_SECONDS, "removals wait too long for a commit"
    with contextlib.closing(sqlite3.connect(journal)) as db:
        left_over = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
    assert left_over == 0, "the journal still holds tasks"


def test_retyping_the_lines_a_kill_left_neither_queued_nor_recovered_repeats_none(
    processes: list[Process], tmp_path: Path
) -> None:
    """A line read just before a kill may be committed without ever being
    logged as queued; the restart lists it as recovered. Typing again the
    lines logged neither way, as docs/guarantees.md advises, runs every
    line exactly once."""
    journal = tmp_path / "tasks.journal"
    typed = [f"line {n:04}" for n in range(5_000)]
    server, port = journalled_server(journal, processes)
    threading.Thread(target=server.type, args=typed, daemon=True).start()
    server.wait_for(r"queued for any client", count=1_000, timeout=30)
    server.popen.kill()  # amid the lines: some are read, some committed, some logged
    server.exit_code()
    before = Run.read(server)
    server, _ = journalled_server(journal, processes, port)
    after = Run.read(server)
    kept = set(before.texts.values()) | {after.texts[task_id] for task_id in after.recovered}
    retyped = [text for text in typed if text not in kept]
    unlogged = {after.texts[task_id] for task_id in after.recovered} - set(before.texts.values())
    print(
        f"killed after {len(before.texts)} lines logged as queued; {len(after.recovered)} "
        f"recovered, {len(unlogged)} of them never logged as queued; {len(retyped)} typed again"
    )
    server.type(*retyped)
    worker = Process("worker", "tests/odd_client.py", f"127.0.0.1:{port}", "worker")
    processes.append(worker)
    server.wait_for(r"result from worker", count=len(typed), timeout=60)
    answers = [m.group(2) for line in server.lines if (m := RESULT.search(line))]
    assert sorted(answers) == [text.upper() for text in typed]  # each line once


UNUSABLE = {
    "a corrupt file": "is corrupt (file is not a database)",
    "another SQLite file": "not a contact journal",
    "a journal of another version": "made by a contact of journal version 99",
}


def make_unusable(journal: Path, kind: str) -> None:
    if kind == "a corrupt file":
        journal.write_bytes(b"not what sqlite writes " * 200)
        return
    with contextlib.closing(sqlite3.connect(journal)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        if kind == "a journal of another version":
            db.execute(f"PRAGMA application_id = {sqlite_module.APPLICATION_ID}")
            db.execute("PRAGMA user_version = 99")
        db.commit()


@pytest.mark.parametrize("kind", sorted(UNUSABLE))
def test_a_journal_that_cannot_be_used_is_one_line_and_exit_1_and_stays_as_it_was(
    processes: list[Process], tmp_path: Path, kind: str
) -> None:
    journal = tmp_path / "tasks.journal"
    make_unusable(journal, kind)
    before = journal.read_bytes()
    server = Process("server", "contact_server.py", "--port", "0", "--journal", str(journal))
    processes.append(server)
    assert server.exit_code() == 1
    assert len(server.lines) == 1, server.output
    assert re.search(
        rf"ERROR journal \S*tasks.journal:? {re.escape(UNUSABLE[kind])}", server.output
    )
    assert journal.read_bytes() == before  # never repaired nor replaced
    assert sorted(tmp_path.iterdir()) == [journal]


def test_a_journal_in_a_missing_directory_is_one_line_and_exit_1(
    processes: list[Process], tmp_path: Path
) -> None:
    journal = tmp_path / "no such folder" / "tasks.journal"
    server = Process("server", "contact_server.py", "--port", "0", "--journal", str(journal))
    processes.append(server)
    assert server.exit_code() == 1
    assert len(server.lines) == 1, server.output
    assert f"the directory {journal.parent} does not exist" in server.output
    assert not journal.parent.exists()


def test_a_second_server_on_the_same_journal_is_refused_and_the_first_serves_on(
    processes: list[Process], tmp_path: Path
) -> None:
    journal = tmp_path / "tasks.journal"
    first, port = journalled_server(journal, processes)
    second = Process("second", "contact_server.py", "--port", "0", "--journal", str(journal))
    processes.append(second)
    assert second.exit_code() == 1
    assert len(second.lines) == 1, second.output
    assert "is in use by another server (database is locked)" in second.output
    worker = Process("worker", "tests/odd_client.py", f"127.0.0.1:{port}", "worker")
    processes.append(worker)
    first.type("still here")
    first.wait_for(r"result from worker: 'STILL HERE'$")


# --- The SQLite queue itself (no gRPC) ----------------------------------------


HAND_ON_AND_MAYBE_CRASH = """
import asyncio, os, sys
from contact.queue.sqlite import SqliteQueue

async def main(crash: bool) -> None:
    queue, handed = SqliteQueue(sys.argv[1]), asyncio.Event()

    def hand_on(task, client, outcome):
        removal = ("DELETE FROM tasks WHERE id = ?", (task.id,))
        print("handed on:", outcome, "- removal pending:", removal in queue._ops, flush=True)
        if crash:
            os._exit(9)  # killed as the answer is handed on
        handed.set()

    queue.listen(lambda task, client, outcome: None, hand_on)
    task = await queue.put("hello")
    queue.take(task, "alice")
    queue.settle("alice", task.id, "HELLO")
    await asyncio.wait_for(handed.wait(), 10)
    await queue.close()

asyncio.run(main(sys.argv[2] == "crash"))
"""


@pytest.mark.parametrize("crash", [True, False])
def test_an_answer_is_forgotten_only_after_it_is_handed_on(tmp_path: Path, crash: bool) -> None:
    """The crash rule, in the SQLite queue itself: a process killed as an
    answer is handed on (an `on_answer` hook, say) finds its task again at
    the next start; one that handed it on and closed does not."""
    path = tmp_path / "tasks.journal"
    done = subprocess.run(
        [sys.executable, "-c", HAND_ON_AND_MAYBE_CRASH, str(path), "crash" if crash else "no"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout == "handed on: HELLO - removal pending: False\n", done.stdout + done.stderr
    assert done.returncode == (9 if crash else 0), done.stderr
    reopened = SqliteQueue(path)
    try:
        assert [task.text for task in reopened.recovered] == (["hello"] if crash else [])
    finally:
        asyncio.run(reopened.close())


def test_a_reopened_journal_gives_back_what_was_unfinished_in_order(tmp_path: Path) -> None:
    path = tmp_path / "tasks.journal"

    async def first_run() -> str:
        queue = SqliteQueue(path)
        one, two, three, four = [
            await queue.put(f"t{n}", "bob" if n == 2 else None) for n in range(1, 5)
        ]
        for task in one, three, four:
            queue.take(task, "alice")
        queue.settle("alice", one.id, "answered")
        for _ in range(2):  # bob died twice holding it
            queue.take(two, "bob")
            queue.release(two, charged=True)
        queue.release(three, charged=False)  # a shutdown, say: no attempt
        queue.settle("alice", four.id, "", "boom")
        await queue.close()
        return queue.run

    first = asyncio.run(first_run())
    queue = SqliteQueue(path)
    try:
        assert [(t.text, t.target, t.attempts) for t in queue.recovered] == [
            ("t2", "bob", 2),
            ("t3", None, 0),
        ]
        assert [t.suspect for t in queue.recovered] == [True, False]  # taken back before
        assert all(t.recovered for t in queue.recovered)
        assert queue.run != first and queue._earlier_runs == {first}
        assert queue.queued() == 2  # queued again, in their order
    finally:
        asyncio.run(queue.close())
    with contextlib.closing(sqlite3.connect(path)) as db:
        failed = db.execute("SELECT text, attempts, reason FROM tasks WHERE state = 'failed'")
        assert failed.fetchall() == [("t4", 1, "failed at alice: boom")]


def test_only_the_newest_failed_tasks_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "KEEP_FAILED", 3)
    path = tmp_path / "tasks.journal"

    async def fail_five() -> None:
        queue = SqliteQueue(path, max_attempts=1)
        for n in range(5):
            task = await queue.put(f"t{n}")
            queue.take(task, "alice")
            assert not queue.release(task, charged=True)  # out of attempts: failed
        await queue.close()

    asyncio.run(fail_five())
    with contextlib.closing(sqlite3.connect(path)) as db:
        kept = [row for row in db.execute("SELECT text, attempts, reason FROM tasks ORDER BY seq")]
    assert kept == [(f"t{n}", 1, "sent 1 times without an answer") for n in (2, 3, 4)]


def test_a_lone_task_is_committed_at_once_and_writes_under_load_share_one(
    tmp_path: Path,
) -> None:
    """Batching is for load: a task that finds the writer idle is committed
    at once (the removal pending beside it goes along), and the tasks that
    come while a commit is under way share the next. Tasks put together
    share a commit."""

    async def scenario() -> None:
        queue = SqliteQueue(tmp_path / "tasks.journal")
        commits: list[int] = []
        commit = queue._commit

        def counted(ops: list[tuple[str, tuple[object, ...]]]) -> None:
            commits.append(len(ops))
            commit(ops)

        queue._commit = counted  # type: ignore[method-assign]
        tasks = await asyncio.gather(*(queue.put("t") for _ in range(100)))
        assert commits == [1, 99]  # the first at once, the other 99 while it was written
        queue.take(tasks[0], "alice")
        queue.settle("alice", tasks[0].id, "done")  # its removal waits for a batch
        lone = asyncio.create_task(queue.put("lone"))
        await asyncio.sleep(0)  # (it runs to its wait for the commit)
        assert queue._writing is not None  # begun at once, not after BATCH_SECONDS
        await lone
        assert commits == [1, 99, 2]
        # Put together, tasks share one commit, begun at once on an idle writer.
        batch = await queue.put_many([NewTask(f"b{n}") for n in range(50)])
        assert commits == [1, 99, 2, 50] and len(batch) == 50
        await queue.close()

    asyncio.run(scenario())


def test_tasks_put_together_and_cancelled_during_their_commit_leave_nothing(
    tmp_path: Path,
) -> None:
    """The commit goes on (other tasks may share it); the batch's rows are
    removed again, and its places in the queue given back."""

    async def scenario() -> None:
        queue = SqliteQueue(tmp_path / "tasks.journal", max_queued=10)
        putting = asyncio.create_task(queue.put_many([NewTask(f"t{n}") for n in range(5)]))
        await asyncio.sleep(0)  # (it runs to its wait for the commit)
        assert queue._writing is not None and queue._reserved == 5
        putting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await putting
        assert queue._reserved == 0 and queue.queued() == 0
        await queue.put("after")
        await queue.close()
        reopened = SqliteQueue(tmp_path / "tasks.journal")
        assert [task.text for task in reopened.recovered] == ["after"]
        await reopened.close()

    asyncio.run(scenario())


def test_a_failed_write_fails_its_submitters_and_the_next_write_goes_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        queue = SqliteQueue(tmp_path / "tasks.journal")
        pages = queue._db.execute("PRAGMA page_count").fetchone()[0]
        queue._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # as a full disk would
        big = [f"{n}" + "x" * 4000 for n in range(10)]
        outcomes = await asyncio.gather(*(queue.put(text) for text in big), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, JournalError)]
        assert failed and all("database or disk is full" in str(o) for o in failed)
        kept = [o.text for o in outcomes if isinstance(o, Task)]
        assert len(kept) + len(failed) == len(big)
        assert [task.text for task in queue.unfinished()] == kept  # the others were not queued
        # Put together, the batch fails whole, and nothing was written to remove.
        with pytest.raises(JournalError, match="database or disk is full"):
            await queue.put_many([NewTask(f"b{n}" + "x" * 4000) for n in range(10)])
        assert not queue._ops and queue._reserved == 0
        queue._db.execute("PRAGMA max_page_count = 1000000")
        await queue.put("small")
        await queue.close()
        reopened = SqliteQueue(tmp_path / "tasks.journal")
        assert [task.text for task in reopened.recovered] == [*kept, "small"]
        await reopened.close()

    asyncio.run(scenario())
    assert "database or disk is full" in caplog.text


def test_submit_returns_once_committed_and_a_result_is_logged_before_its_removal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, journal=tmp_path / "tasks.journal") as server:
            journal = server._queue
            assert isinstance(journal, SqliteQueue)
            commit, forget = journal._commit, journal._forget

            def noted(ops: list[tuple[str, tuple[object, ...]]]) -> None:
                commit(ops)
                events.append("committed")

            journal._commit = noted  # type: ignore[method-assign]

            def removal(task: Task, outcome: object) -> None:
                logged = "result from alice: 'HELLO'" in caplog.text
                events.append(f"removal written (result logged: {logged}, handed: {answer.done()})")
                forget(task, outcome)  # type: ignore[arg-type]

            journal._forget = removal  # type: ignore[method-assign]
            answer = await server.submit("hello")
            events.append("submit returned")
            alice = server._dispatcher.connect("alice")
            task_id = next(iter(alice.in_flight))
            server._dispatcher.complete("alice", task_id, "HELLO")
            assert await answer == "HELLO"

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert events == [
        "committed",
        "submit returned",
        "removal written (result logged: True, handed: True)",
        "committed",  # at the latest when the server closes
    ]


def test_a_removal_is_committed_only_after_the_log_lines_held_before_it_are_written(
    tmp_path: Path,
) -> None:
    """The scripts' log handler holds lines for a moment; the journal has
    them written before it commits, so an answer logged before its task's
    removal is in the log however soon after the commit a kill comes."""
    written = io.StringIO()
    handler = BatchedHandler()
    handler.setStream(written)
    handler.setFormatter(logging.Formatter("%(message)s"))
    seen_at_commit: list[str] = []

    async def scenario() -> None:
        queue = SqliteQueue(tmp_path / "tasks.journal")

        def report(task: Task, client: str, outcome: object) -> None:
            logging.getLogger("contact.server").info("task x-1 result from alice: 'HELLO'")
            assert "result from" not in written.getvalue()  # held back, for now

        queue.listen(report)
        task = await queue.put("hello")
        commit = queue._commit

        def noted(ops: list[tuple[str, tuple[object, ...]]]) -> None:
            seen_at_commit.append(written.getvalue())
            commit(ops)

        queue._commit = noted  # type: ignore[method-assign]
        queue.take(task, "alice")
        queue.settle("alice", task.id, "HELLO")
        await queue.close()

    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        asyncio.run(scenario())
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert len(seen_at_commit) == 1  # the removal's commit
    assert seen_at_commit[0].endswith("task x-1 result from alice: 'HELLO'\n")
    assert SqliteQueue(tmp_path / "tasks.journal").recovered == []


@pytest.mark.skipif(sys.platform == "win32", reason="closes file descriptor 2 before exec")
def test_a_server_whose_standard_error_is_closed_still_queues_and_answers_with_a_journal(
    processes: list[Process], tmp_path: Path
) -> None:
    """Its log lines cannot be written (the journal has them written before
    each commit): they are dropped, and the tasks still go out and come back."""
    path, port = tmp_path / "tasks.journal", free_port()
    server = subprocess.Popen(
        [sys.executable, "contact_server.py", "--port", str(port), "--journal", str(path)],
        cwd=ROOT, stdin=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(2),
    )  # fmt: skip
    try:
        client = Process("worker", "contact_client.py", "--server", f"127.0.0.1:{port}",
                         "--max-tasks", "3", "--max-backoff", "0.2")  # fmt: skip
        processes.append(client)
        client.wait_for(r"registered with ", timeout=20)
        assert server.stdin is not None
        server.stdin.write("one\ntwo\nthree\n")
        server.stdin.flush()
        assert client.exit_code(20) == 0, client.output
        assert client.count(r"task \S+: '\w+' -> ") == 3
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert SqliteQueue(path).recovered == []  # every answer's removal was committed


def test_a_journal_that_cannot_be_checked_for_a_while_is_trouble_only_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat that fails other than with "no such file" (a folder made
    unreadable, say) is trouble while it lasts, not a journal lost for good."""

    def unreadable(path: object) -> os.stat_result:
        raise PermissionError(13, "Permission denied", str(path))

    async def check() -> None:
        queue = SqliteQueue(tmp_path / "tasks.journal")
        with monkeypatch.context() as patched:
            patched.setattr(os, "stat", unreadable)
            trouble = queue.trouble()
            assert trouble is not None and "cannot be checked: [Errno 13]" in trouble
            assert queue.kept().startswith(" (perhaps NOT kept: journal ")
        assert queue.trouble() is None and queue.lost is None
        assert queue.kept() == " (kept in the journal for the next start)"
        await queue.close()

    asyncio.run(check())


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot delete an open file")
def test_a_journal_deleted_while_the_server_runs_is_said_and_nothing_is_reported_kept(
    processes: list[Process], tmp_path: Path
) -> None:
    path = tmp_path / "tasks.journal"
    srv, _ = start_server("--journal", str(path))
    processes.append(srv)
    srv.type("kept before")
    srv.wait_for(r"task \S+ queued for any client: 'kept before'$")
    path.unlink()  # the server holds the file open: its writes would vanish at exit
    srv.type("typed after", *(f"and after {n}" for n in range(49)))
    srv.wait_for(r"ERROR journal .*tasks\.journal was deleted while the server ran")
    # Each line is refused; the log says so briefly, every one counted.
    srv.wait_for_total(r"ERROR task not queued: journal .* was deleted", "not queued", 50)
    assert srv.count(r"task not queued") <= 5
    assert srv.count(r"queued for any client: '(typed|and) after") == 0
    srv.send(signal.SIGTERM)
    assert srv.exit_code() == 0, srv.output
    srv.wait_for(r"stopped; tasks never answered: 1 \(NOT kept: the journal file was deleted\)")
