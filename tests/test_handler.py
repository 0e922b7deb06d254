"""Unit tests of the client's handler pools (contact/client/handler.py) and of its
Work: what a handler does becomes a Result, withdrawn tasks free their
worker, and the window is enforced per registration."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc
import pytest

from contact import contact_pb2
from contact.client.handler import handler_pool
from contact.client.streams import StreamEndedError
from contact.client.work import BATCH_BYTES, Work


def task(text: str, task_id: str) -> contact_pb2.ServerMsg:
    return contact_pb2.ServerMsg(task=text, id=task_id)


class Results:
    """The `done` of a pool: every Result, and a wait for the next few; its
    `started` hears each task begin, and `events` keeps both in order."""

    def __init__(self) -> None:
        self.results: list[contact_pb2.Result] = []
        self.events: list[str] = []
        self._changed = asyncio.Event()

    def started(self, task: contact_pb2.ServerMsg) -> None:
        self.events.append(f"began {task.id}")
        self._changed.set()

    def __call__(self, task: contact_pb2.ServerMsg, result: contact_pb2.Result) -> None:
        self.results.append(result)
        self.events.append(f"done {task.id}")
        self._changed.set()

    async def at_least(self, count: int) -> list[contact_pb2.Result]:
        await self.until(lambda: len(self.results) >= count)
        return self.results

    async def until(self, happened: Callable[[], bool]) -> None:
        while not happened():  # each event sets `_changed`: one wait per event at most
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 5)


def test_an_async_task_withdrawn_before_its_first_step_frees_its_worker() -> None:
    async def upper(task: contact_pb2.ServerMsg) -> str:
        return task.task.upper()

    async def scenario() -> None:
        done = Results()
        pool = handler_pool(upper, 1, done, done.started)
        pool.work_on(task("a", "1"))  # started, but its first step has not run
        assert pool.withdraw("1") == "cancelled while it ran"
        pool.work_on(task("b", "2"))
        assert [(r.id, r.ret) for r in await done.at_least(1)] == [("2", "B")]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("raises", "error"),
    [
        (asyncio.CancelledError, "CancelledError"),
        (SystemExit, "SystemExit"),
        (ValueError, "ValueError"),
    ],
)
def test_whatever_an_async_handler_raises_is_a_failure_and_the_next_runs(
    raises: type[BaseException], error: str
) -> None:
    async def odd(task: contact_pb2.ServerMsg) -> str:
        if task.task == "raise":
            raise raises("on purpose")
        return task.task.upper()

    async def scenario() -> None:
        done = Results()
        pool = handler_pool(odd, 1, done, done.started)
        pool.work_on(task("raise", "1"))
        pool.work_on(task("next", "2"))
        first, second = await done.at_least(2)
        assert done.events == ["began 1", "done 1", "began 2", "done 2"]
        assert first.id == "1" and first.error.startswith(error) and not first.ret
        assert (second.id, second.ret) == ("2", "NEXT")

    asyncio.run(scenario())


def test_a_thread_skips_a_task_withdrawn_before_it_started_and_finishes_a_running_one() -> None:
    started, release = threading.Event(), threading.Event()

    def blocking(task: contact_pb2.ServerMsg) -> str:
        if task.task == "block":
            started.set()
            release.wait(5)
        return task.task.upper()

    async def scenario() -> None:
        done = Results()
        pool = handler_pool(blocking, 1, done, done.started)
        pool.work_on(task("block", "1"))
        pool.work_on(task("waiting", "2"))
        pool.work_on(task("last", "3"))
        assert await asyncio.to_thread(started.wait, 5)
        assert pool.withdraw("1") is None  # running in a thread: it runs to the end
        assert pool.withdraw("2") == "dropped before it started"
        release.set()
        results = await done.at_least(2)
        assert [(r.id, r.ret) for r in results] == [("1", "BLOCK"), ("3", "LAST")]
        assert done.events == ["began 1", "done 1", "began 3", "done 3"]  # "2" never began
        pool.close()

    asyncio.run(scenario())


def test_a_task_dropped_before_it_started_runs_when_sent_again_after_a_reconnect() -> None:
    started, release = threading.Event(), threading.Event()

    def blocking(task: contact_pb2.ServerMsg) -> str:
        if task.task == "block":
            started.set()
            release.wait(5)
        return task.task.upper()

    async def scenario() -> None:
        done = Results()
        pool = handler_pool(blocking, 1, done, done.started)
        pool.work_on(task("block", "1"))
        pool.work_on(task("waiting", "2"))
        assert await asyncio.to_thread(started.wait, 5)
        assert pool.withdraw("2") == "dropped before it started"
        assert pool.drop_waiting() == ["2"]  # the connection ended
        pool.work_on(task("waiting", "2"))  # the next one sends it again
        release.set()
        assert [(r.id, r.ret) for r in await done.at_least(2)] == [("1", "BLOCK"), ("2", "WAITING")]
        pool.close()

    asyncio.run(scenario())


def test_a_registration_s_window_counts_its_own_tasks_and_a_lost_one_drops_what_waits() -> None:
    """The client's side of the window (contact/client/work.py): more than the
    window from one registration is a protocol error; a task still running
    from the last counts again only if the server sends it again."""
    started, release = threading.Event(), threading.Event()

    def slow(task: contact_pb2.ServerMsg) -> str:
        started.set()
        release.wait(5)
        return task.task.upper()

    async def scenario() -> None:
        work = Work(slow, concurrency=1, window=2, max_tasks=None)
        work.connection_began(grpc.aio.Metadata())
        work.start(task("a", "1"))
        work.start(task("b", "2"))  # waits for the one thread
        with pytest.raises(StreamEndedError, match="more than the 2 tasks asked"):
            work.start(task("c", "3"))
        assert await asyncio.to_thread(started.wait, 5)
        work.connection_ended()  # "b" had not started: the server's again
        assert (work.running, work.held) == ({"1"}, set())
        work.start(task("f", "6"))  # read after the connection ended: not started
        assert (work.running, work.held) == ({"1"}, set())
        work.connection_began(grpc.aio.Metadata())
        work.start(task("a", "1"))  # sent again by the next registration: not started twice
        work.start(task("d", "4"))
        with pytest.raises(StreamEndedError):
            work.start(task("e", "5"))
        release.set()
        while len(work.unsent) < 2:  # bounded: each answer sets answer_ready
            work.answer_ready.clear()
            await asyncio.wait_for(work.answer_ready.wait(), 5)
        assert [(r.id, r.ret) for r in work.unsent] == [("1", "A"), ("4", "D")]
        work.handlers.close()

    asyncio.run(scenario())


def test_a_failed_connection_waits_for_the_last_answers_write_before_it_decides() -> None:
    """A server that stops as it reads the last answer fails the other calls
    first: the client waits for that write's outcome, so it knows the task
    limit is reached, and does not retry for ever. It does not wait for a
    write that cannot hold the last answer."""

    def echo(task: contact_pb2.ServerMsg) -> str:
        return task.task

    async def scenario() -> None:
        work = Work(echo, concurrency=1, window=1, max_tasks=1)
        work.connection_began(grpc.aio.Metadata())
        work.unsent.append(contact_pb2.Result(id="1", ret="ANSWER"))
        write_ends = asyncio.Event()

        async def write() -> None:  # as send_answers does, its write ending after the failure
            work.next_message()
            await write_ends.wait()
            work.written()

        writer = asyncio.ensure_future(write())
        await asyncio.sleep(0)  # (the message is built)
        work.connection_ended()
        asyncio.get_running_loop().call_later(0.05, write_ends.set)
        assert not work.done()
        await work.last_write_settled(writer)
        assert work.done() and writer.done()
        never = asyncio.ensure_future(asyncio.Event().wait())
        await asyncio.wait_for(work.last_write_settled(never), 0.5)  # nothing left to write
        never.cancel()
        work.handlers.close()

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_answers_ready_together_go_in_one_message_to_a_server_that_batches() -> None:
    def echo(task: contact_pb2.ServerMsg) -> str:
        return task.task

    async def scenario() -> None:
        work = Work(echo, concurrency=1, window=8, max_tasks=None)
        work.unsent.extend(contact_pb2.Result(id=str(n), ret="x") for n in range(3))
        work.unsent.append(contact_pb2.Result(id="big", ret="y" * BATCH_BYTES))
        work.unsent.append(contact_pb2.Result(id="4", ret="x"))
        assert not work.next_message().more  # the server did not echo batches-answers
        work.batches = True
        message = work.next_message()
        assert [message.id, *(answer.id for answer in message.more)] == ["0", "1", "2"]  # not big
        work.written()
        assert work.answered == 3
        alone = work.next_message()  # over BATCH_BYTES with any other: it goes alone
        assert alone.id == "big" and not alone.more and len(work.unsent) == 2
        work.handlers.close()

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_an_async_handler_that_answers_at_once_is_begun_and_done_in_one_step() -> None:
    """So that a start and its answer go out in one message, not two."""

    async def upper(task: contact_pb2.ServerMsg) -> str:
        return task.task.upper()

    async def scenario() -> None:
        results = Results()
        pool = handler_pool(upper, 1, results, results.started)
        pool.work_on(task("a", "1"))
        assert results.events == []  # begun when it begins, not when it is queued
        await asyncio.sleep(0)  # the task's one step
        assert results.events == ["began 1", "done 1"]
        pool.close()

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_an_id_sent_again_while_its_withdrawn_run_delays_its_cancel_runs_anew() -> None:
    """An async handler may take its time to end when cancelled, and the
    server may send the withdrawn id again meanwhile: the new run answers,
    the old one does not, and each frees its worker when it ends."""

    async def scenario() -> None:
        release, hold = asyncio.Event(), asyncio.Event()
        runs = 0

        async def stubborn(message: contact_pb2.ServerMsg) -> str:
            nonlocal runs
            if message.id != "1":
                await hold.wait()
                return "held"
            runs += 1
            run = runs
            try:
                await release.wait()
            except asyncio.CancelledError:
                await release.wait()  # cleans up first: the cancel takes a while
            return f"{message.task} run {run}"

        results = Results()
        pool = handler_pool(stubborn, 2, results, results.started)
        pool.work_on(task("a", "1"))
        await results.until(lambda: results.events == ["began 1"])
        assert pool.withdraw("1") == "cancelled while it ran"
        pool.work_on(task("a", "1"))  # sent again: the second worker takes it
        await results.until(lambda: results.events == ["began 1", "began 1"])
        release.set()
        assert [(r.id, r.ret) for r in await results.at_least(1)] == [("1", "a run 2")]
        pool.work_on(task("b", "2"))
        pool.work_on(task("c", "3"))  # both run at once: both workers are free again
        await results.until(lambda: {"began 2", "began 3"} <= set(results.events))
        assert [(r.id, r.ret) for r in results.results] == [("1", "a run 2")]  # none from run 1
        hold.set()
        await results.at_least(3)
        pool.close()

    asyncio.run(asyncio.wait_for(scenario(), 5))
