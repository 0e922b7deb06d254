"""ContactServer used from code, with real client processes: task handles,
cancel (queued and in flight), ask's timeout, failures that raise, the
on_answer hook across a restart, and what submit refuses at the door."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import contact.server.core
from contact.queue.sqlite import SqliteQueue
from contact_server import (
    Answer,
    ContactServer,
    NewTask,
    QueueFullError,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    TaskHandle,
)
from tests.processes import Process, start_client


async def wait_for(process: Process, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    """Process.wait_for without blocking the server's loop, which runs in this thread."""
    return await asyncio.to_thread(process.wait_for, pattern, timeout)


async def started(processes: list[Process], start: Callable[..., Process], *args: Any) -> Process:
    """A client process, once registered (started off the loop, which must keep serving)."""
    process = await asyncio.to_thread(start, *args)
    processes.append(process)
    return process


def odd_client(port: int, name: str, *args: str) -> Process:
    odd = Process(name, "tests/odd_client.py", f"127.0.0.1:{port}", name, *args)
    odd.wait_for(rf"registered with .* as {name}$")
    return odd


def test_a_cancelled_queued_task_never_reaches_its_client(
    processes: list[Process], store: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            handle = await server.submit("never sent", target="bob")
            assert handle.cancel() is True
            assert handle.cancel() is False  # already withdrawn
            with pytest.raises(TaskCancelledError, match=f"task {re.escape(handle.id)} was"):
                await handle
            after = await server.submit("after", target="bob")
            bob = await started(processes, start_client, "bob", server.port)
            assert await after.result(timeout=20) == "AFTER"
            await wait_for(bob, r"task \S+: 'after' -> 'AFTER'$")
            assert not server._queue.unfinished()
        assert handle.cancel() is False  # the server is closed
        assert bob.count(r"task \S+: ") == 1, bob.output  # only "after"
        assert "never sent" not in bob.output

    asyncio.run(scenario())


@pytest.mark.parametrize("handler", ["plain", "async"])
def test_a_task_cancelled_in_flight_has_its_answer_ignored(
    processes: list[Process], caplog: pytest.LogCaptureFixture, handler: str, store: dict[str, Any]
) -> None:
    how = "it runs to the end" if handler == "plain" else "cancelled while it ran"

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            flags = ["--sleep", "2"] + (["--async"] if handler == "async" else [])
            odd = await started(processes, odd_client, server.port, "odd", *flags)
            slow = await server.submit("slow")
            await wait_for(odd, rf"started task {re.escape(slow.id)} \(attempt 1\)")
            assert slow.cancel() is True
            with pytest.raises(TaskCancelledError):
                await slow
            await wait_for(odd, rf"task {re.escape(slow.id)} withdrawn by the server: {how}")
            # The client sends a result for it all the same (the plain
            # handler's answer, or that it stopped): that frees its place in
            # the window, and is ignored.
            assert await server.ask("next", timeout=20) == "NEXT"
        assert f"task {slow.id} withdrawn from odd" in caplog.text
        assert f"result for withdrawn task '{slow.id}' from odd ignored" in caplog.text
        assert f"task {slow.id} result from" not in caplog.text  # never taken as an answer

    with caplog.at_level(logging.DEBUG, logger="contact"):
        asyncio.run(scenario())


def test_ask_with_a_timeout_gives_up_within_it_and_withdraws_the_task(
    processes: list[Process], store: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            began = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await server.ask("nobody answers this", timeout=1)
            waited = time.monotonic() - began
            print(f"ask(timeout=1) raised after {waited:.2f} s")
            assert waited < 2
            assert not server._queue.unfinished()  # gone, not queued
            # A caller cancelled while it waits withdraws its task too.
            asking = asyncio.ensure_future(server.ask("nor this", target="late"))
            while not server._queue.unfinished():
                await asyncio.sleep(0)
            asking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asking
            assert not server._queue.unfinished()
            late = await started(processes, start_client, "late", server.port)
            assert await server.ask("after", target="late", timeout=20) == "AFTER"
            await wait_for(late, r"task \S+: 'after' -> 'AFTER'$")
        assert late.count(r"task \S+: ") == 1, late.output

    asyncio.run(scenario())


def test_a_handler_that_raises_makes_ask_raise_task_error_and_is_not_sent_again(
    processes: list[Process], store: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            odd = await started(processes, odd_client, server.port, "odd")
            with pytest.raises(TaskError, match=r"failed at odd: SystemExit: 2$") as failure:
                await server.ask("exit", timeout=20)
            assert (failure.value.client, failure.value.error) == ("odd", "SystemExit: 2")
            assert await server.ask("after", timeout=20) == "AFTER"
            await wait_for(odd, r"task \S+: 'after' -> 'AFTER'$")  # its output has caught up
            assert odd.count(r"started task") == 2  # the failed one once, then "after"

    asyncio.run(scenario())


def test_answers_to_recovered_tasks_reach_the_hook_after_a_restart(
    processes: list[Process], tmp_path: Path
) -> None:
    path = tmp_path / "tasks.journal"

    async def first_run() -> list[str]:
        async with ContactServer(port=0, grace=0, journal=path) as server:
            handles = [await server.submit(text) for text in ("one", "exit", "two")]
        return [handle.id for handle in handles]

    async def second_run() -> list[Answer]:
        heard: list[Answer] = []
        all_heard = asyncio.Event()

        def on_answer(answer: Answer) -> None:
            heard.append(answer)
            if len(heard) == 3:
                all_heard.set()

        async with ContactServer(port=0, grace=0, journal=path, on_answer=on_answer) as server:
            await started(processes, odd_client, server.port, "odd")
            await asyncio.wait_for(all_heard.wait(), 20)
        return heard

    ids = asyncio.run(first_run())
    heard = asyncio.run(second_run())
    assert [answer.id for answer in heard] == ids
    assert all(answer.recovered and answer.client == "odd" for answer in heard)
    assert [answer.text for answer in heard] == ["ONE", None, "TWO"]
    assert isinstance(heard[1].error, TaskError)
    with pytest.raises(TaskError, match="SystemExit: 2"):
        heard[1].result()
    reopened = SqliteQueue(path)
    assert reopened.recovered == []  # answered and failed: nothing left to do
    asyncio.run(reopened.close())


BAD_TASKS: list[tuple[str, dict[str, Any], str]] = [
    ("x" * (2 * 1024 * 1024), {}, "over the limit of 524288 bytes"),
    ("\ud800", {}, "not valid text"),
    ("fine", {"target": "no spaces allowed"}, "no client name"),
    ("fine", {"no_such_field": "x"}, "no_such_field"),
    ("fine", {"attempt": 3}, "the server's to fill"),
]


def test_submit_refuses_what_could_never_be_sent_and_nobody_sees_it(
    processes: list[Process], caplog: pytest.LogCaptureFixture, store: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            worker = await started(processes, start_client, "worker", server.port)
            for text, kwargs, complaint in BAD_TASKS:
                with pytest.raises(ValueError, match=complaint):
                    await server.submit(text, **kwargs)
            assert await server.ask("fine", timeout=20) == "FINE"
            await wait_for(worker, r"task \S+: 'fine' -> 'FINE'$")  # its output has caught up
        assert worker.count(r"task \S+: ") == 1, worker.output
        assert caplog.text.count(" queued for ") == 1, caplog.text  # none of the bad tasks
        assert "Traceback" not in caplog.text + worker.output

    with caplog.at_level(logging.DEBUG):  # (queued lines are DEBUG while a client may take them)
        asyncio.run(scenario())


def test_submit_many_queues_tasks_together_or_none_of_them(
    processes: list[Process], store: dict[str, Any]
) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            with pytest.raises(ValueError, match="not valid text"):
                await server.submit_many(["first", NewTask("\ud800"), "third"])
            for one in ("one text", NewTask("one task")):
                with pytest.raises(TypeError, match="a list of tasks"):
                    await server.submit_many(one)  # type: ignore[arg-type]
            assert (server.stats().submitted, server.stats().queued) == (0, 0)
            handles = await server.submit_many(["one", NewTask("for bob", "bob"), NewTask("two")])
            assert server.stats().queued == 3
            await started(processes, start_client, "worker", server.port)
            assert [await handles[n].result(20) for n in (0, 2)] == ["ONE", "TWO"]
            assert handles[1].cancel()  # bob never came

    asyncio.run(scenario())


def test_one_bad_task_in_a_journal_batch_does_not_fail_the_others(tmp_path: Path) -> None:
    path = tmp_path / "tasks.journal"

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, journal=path) as server:
            submitted = await asyncio.gather(
                server.submit("first"),
                server.submit("\ud800"),
                server.submit("third"),
                return_exceptions=True,
            )
            assert isinstance(submitted[0], TaskHandle) and isinstance(submitted[2], TaskHandle)
            assert isinstance(submitted[1], ValueError)

    asyncio.run(scenario())
    reopened = SqliteQueue(path)
    assert [task.text for task in reopened.recovered] == ["first", "third"]
    asyncio.run(reopened.close())


def test_submit_threadsafe_gives_an_id_and_cancels_from_the_thread(store: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:

            def plain_code() -> None:
                answer = server.submit_threadsafe("for nobody", target="nobody")
                assert answer.id in {task.id for task in server._queue.unfinished()}
                assert answer.cancel() is True
                with pytest.raises(TaskCancelledError):
                    answer.result(timeout=5)
                assert answer.cancel() is False
                with pytest.raises(ValueError, match="not valid text"):
                    server.submit_threadsafe("\ud800")

            await asyncio.to_thread(plain_code)
            assert not server._queue.unfinished()
            with pytest.raises(RuntimeError, match="this is its loop"):
                server.submit_threadsafe("from the loop itself")

    asyncio.run(scenario())


def test_a_submitter_cancelled_during_its_commit_leaves_the_others_of_the_commit_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.journal"

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, journal=path) as server:
            cancelled = asyncio.ensure_future(server.submit("one"))
            kept = asyncio.ensure_future(server.submit("two"))
            await asyncio.sleep(0)  # both wait for the same commit now
            cancelled.cancel()
            assert isinstance(await kept, TaskHandle)  # not cancelled with it
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert [task.text for task in server._queue.unfinished()] == ["two"]

    asyncio.run(scenario())
    reopened = SqliteQueue(path)
    assert [task.text for task in reopened.recovered] == ["two"]  # "one" written, then removed
    asyncio.run(reopened.close())


def test_a_hook_that_cancels_tasks_while_failures_land_breaks_nothing(
    store: dict[str, Any],
) -> None:
    """Failures land while the Dispatcher ends a session: the hook that cancels
    the rest of a batch runs once the Dispatcher is done."""

    async def scenario() -> None:
        cancelled: list[bool] = []

        def on_answer(answer: Answer) -> None:
            cancelled.extend(server.cancel(handle.id) for handle in batch)

        server = ContactServer(port=0, grace=0, max_attempts=1, on_answer=on_answer, **store)
        async with server:
            holder = server._dispatcher.connect("holder", window=2)
            batch = [await server.submit(f"part {n}") for n in range(3)]
            assert len(holder.in_flight) == 2
            server._dispatcher.disconnect(holder)  # both held parts fail: their first attempt
            for handle in batch[:2]:
                with pytest.raises(TaskFailedError):
                    await handle
            with pytest.raises(TaskCancelledError):
                await batch[2]
        assert cancelled.count(True) == 1  # only the queued part was still there to cancel

    asyncio.run(scenario())


def test_serve_until_stopped_stops_on_sigterm_and_gives_the_signal_back(
    store: dict[str, Any],
) -> None:
    def own(signum: int, frame: object) -> None:
        raise AssertionError("the program's own handler must not run while the server serves")

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            serving = asyncio.ensure_future(server.serve_until_stopped())
            await asyncio.sleep(0)  # its handlers are in place
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(serving, 5)

    earlier = signal.signal(signal.SIGTERM, own)
    try:
        asyncio.run(scenario())
        assert signal.getsignal(signal.SIGTERM) is own  # the program's again
    finally:
        signal.signal(signal.SIGTERM, earlier)


def test_a_full_queue_makes_submit_wait_and_ask_and_submit_threadsafe_give_up_in_time(
    monkeypatch: pytest.MonkeyPatch, store: dict[str, Any]
) -> None:
    monkeypatch.setattr(contact.server.core, "LOOP_REPLY_SECONDS", 0.5)

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, max_queued=1, **store) as server:
            first = await server.submit("first", target="absent")
            with pytest.raises(QueueFullError):
                await server.submit("second", target="absent", wait=False)
            began = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await server.ask("asked", target="absent", timeout=0.5)
            assert 0.5 <= time.monotonic() - began < 2.0
            # (Python 3.10's to_thread turns concurrent's TimeoutError into asyncio's.)
            with pytest.raises((concurrent.futures.TimeoutError, asyncio.TimeoutError)):
                await asyncio.to_thread(server.submit_threadsafe, "from a thread", "absent")
            waiting = asyncio.create_task(server.submit("third", target="absent"))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            assert first.cancel()  # room: the waiting submit goes in, and no other did
            third = await asyncio.wait_for(waiting, 5)
            assert server._queue.queued() == 1 and third.cancel()

    asyncio.run(scenario())


def test_an_ask_cancelled_at_any_moment_leaves_no_task_queued(store: dict[str, Any]) -> None:
    """Cancelled at each turn of the loop in turn (before its task is queued,
    as it is queued, while it waits for the answer), `ask` leaves nothing
    behind: a task queued as its caller gave up is withdrawn."""

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            for turns in range(12):
                asking = asyncio.create_task(server.ask(f"asked {turns}", target="absent"))
                for _ in range(turns):
                    await asyncio.sleep(0)
                asking.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asking
                ends = time.monotonic() + 5  # a journal's commit may still be on
                while server._queue.unfinished() and time.monotonic() < ends:
                    await asyncio.sleep(0.01)
                assert server._queue.unfinished() == [], f"left queued when cancelled after {turns}"

    asyncio.run(scenario())


def test_submit_threadsafe_given_up_on_a_stuck_loop_leaves_no_task_queued(
    monkeypatch: pytest.MonkeyPatch, store: dict[str, Any]
) -> None:
    monkeypatch.setattr(contact.server.core, "LOOP_REPLY_SECONDS", 0.2)

    def submit_from_a_thread(server: ContactServer) -> BaseException | None:
        try:
            server.submit_threadsafe("while the loop is stuck", "absent")
        except BaseException as err:
            return err
        return None

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            asking = asyncio.get_running_loop().run_in_executor(None, submit_from_a_thread, server)
            time.sleep(1.0)  # the loop stuck (the fault under test): the thread gives up at 0.4 s
            error = await asyncio.wait_for(asking, 5)
            assert isinstance(error, (concurrent.futures.TimeoutError, TimeoutError)), error
            ends = time.monotonic() + 5  # what the loop does with the given-up submit
            while server._queue.unfinished() and time.monotonic() < ends:
                await asyncio.sleep(0.01)
            assert server._queue.unfinished() == []

    asyncio.run(scenario())
