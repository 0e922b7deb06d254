"""Unit tests of the Dispatcher, over both kinds of queue: which client gets
which task, and what happens when a client leaves, answers or hangs."""

from __future__ import annotations

import asyncio
import gc

import pytest

from contact import WITHDRAWN
from contact.queue.base import NewTask, Outcome, QueueFullError, Task
from contact.queue.dispatcher import LEASE_EXPIRED, REPLACED, SHUTDOWN, SILENT, Session
from tests.dispatching import ProbedDispatcher, make_dispatcher

# Each test runs on both kinds of queue: in memory, and SQLite (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("queue_kind")


def assigned(session: Session) -> list[str]:
    """The texts of the tasks in flight at a session, oldest first."""
    return [task.text for task in session.in_flight.values()]


def unwritten(session: Session) -> list[str]:
    """The texts still waiting to be written to a session's stream."""
    return [task.text for task in session.outbox]


def answer_all(dispatcher: ProbedDispatcher, session: Session) -> None:
    for task in list(session.in_flight.values()):
        assert dispatcher.complete(session.name, task.id, "done") is Outcome.ACCEPTED


def test_a_task_goes_to_the_client_with_fewest_in_flight() -> None:
    dispatcher = make_dispatcher()
    alice = dispatcher.connect("alice")
    dispatcher.queue.add("one")
    dispatcher.queue.add("two")
    bob = dispatcher.connect("bob")
    dispatcher.queue.add("three")
    assert assigned(alice) == ["one", "two"]
    assert assigned(bob) == ["three"]


def test_equally_loaded_clients_take_turns() -> None:
    dispatcher = make_dispatcher()
    alice, bob = dispatcher.connect("alice"), dispatcher.connect("bob")
    for text in ("one", "two", "three", "four"):
        dispatcher.queue.add(text)
    assert assigned(alice) == ["one", "three"]
    assert assigned(bob) == ["two", "four"]


def test_each_task_goes_to_exactly_one_client() -> None:
    dispatcher = make_dispatcher()
    sessions = [dispatcher.connect(f"c{i}") for i in range(3)]
    ids = [dispatcher.queue.add(f"task {i}").id for i in range(10)]
    delivered = [task.id for s in sessions for task in s.in_flight.values()]
    assert sorted(delivered) == sorted(ids)


def test_a_targeted_task_waits_for_its_client_and_goes_only_to_it() -> None:
    dispatcher = make_dispatcher()
    alice = dispatcher.connect("alice")
    dispatcher.queue.add("for bob", target="bob")
    assert assigned(alice) == []
    assert dispatcher.queued() == 1
    bob = dispatcher.connect("bob")
    assert assigned(bob) == ["for bob"]
    assert dispatcher.queued() == 0


def test_no_client_gets_more_than_max_in_flight() -> None:
    dispatcher = make_dispatcher(max_in_flight=2)
    alice = dispatcher.connect("alice")
    tasks = [dispatcher.queue.add(f"t{i}") for i in range(5)]
    dispatcher.queue.add("for alice", target="alice")
    assert assigned(alice) == ["t0", "t1"]
    assert dispatcher.queued() == 4
    assert dispatcher.complete("alice", tasks[0].id, "ok") is Outcome.ACCEPTED
    # Room for one more: her own waiting task comes before the shared queue.
    assert assigned(alice) == ["t1", "for alice"]
    assert dispatcher.complete("alice", tasks[1].id, "ok") is Outcome.ACCEPTED
    assert assigned(alice) == ["for alice", "t2"]


def test_a_departed_clients_tasks_go_back_to_the_front_in_order() -> None:
    dispatcher = make_dispatcher(max_in_flight=2)
    alice = dispatcher.connect("alice")
    for text in ("one", "two", "three"):
        dispatcher.queue.add(text)
    dispatcher.queue.add("alice only", target="alice")
    dispatcher.disconnect(alice)
    assert dispatcher.queue.in_flight() == 0
    assert dispatcher.queued() == 4
    bob = dispatcher.connect("bob")
    assert assigned(bob) == ["one"]  # taken back, it travels alone: it may be what killed alice
    alice = dispatcher.connect("alice")
    assert assigned(alice) == ["alice only"]  # "two" is next, and waits for an idle client
    answer_all(dispatcher, bob)
    assert assigned(bob) == ["two"]
    assert assigned(alice) == ["alice only", "three"]  # the head moved on, in order


def test_the_first_result_wins_and_a_later_one_is_a_duplicate() -> None:
    dispatcher = make_dispatcher()
    alice = dispatcher.connect("alice")
    task = dispatcher.queue.add("job")
    dispatcher.disconnect(alice)  # alice vanished while holding it
    bob = dispatcher.connect("bob")
    assert unwritten(bob) == ["job"]
    # alice's answer arrives late, on a new connection: she was given the task.
    assert dispatcher.complete("alice", task.id, "from alice") is Outcome.ACCEPTED
    assert unwritten(bob) == []  # no longer worth sending to bob
    assert bob.in_flight == {}
    assert dispatcher.complete("bob", task.id, "from bob") is Outcome.DUPLICATE


def test_a_result_for_an_unknown_id_is_ignored() -> None:
    dispatcher = make_dispatcher()
    dispatcher.connect("alice")
    task = dispatcher.queue.add("job")
    run = task.id.rpartition("-")[0]
    bogus_ids = ("", "nonsense", "000000-1", task.id + "0", "-1", task.id[:-1] + "٣")
    for bogus in (*bogus_ids, f"{run}-{'9' * 5000}"):
        assert dispatcher.complete("alice", bogus, "x") is Outcome.UNKNOWN, bogus
    assert dispatcher.queue.in_flight() == 1


def test_a_client_cannot_finish_a_task_it_was_never_given() -> None:
    dispatcher = make_dispatcher()
    alice = dispatcher.connect("alice")
    held = dispatcher.queue.add("held by alice")
    waiting = dispatcher.queue.add("for nobody yet", target="nobody")
    assert dispatcher.complete("mallory", held.id, "x") is Outcome.NOT_GIVEN
    assert dispatcher.complete("mallory", waiting.id, "x") is Outcome.NOT_GIVEN
    assert held.id in alice.in_flight
    assert dispatcher.queued() == 1


def test_a_new_registration_under_a_connected_name_takes_over() -> None:
    dispatcher = make_dispatcher()
    old = dispatcher.connect("alice")
    dispatcher.queue.add("one")
    dispatcher.queue.add("two", target="alice")
    new = dispatcher.connect("alice")
    assert old.ended == REPLACED
    assert old.in_flight == {}
    # Her own waiting task first. A takeover is no evidence against the
    # tasks the old session held: not suspect, and no attempt charged.
    assert assigned(new) == ["two", "one"]
    assert [task.attempts for task in new.in_flight.values()] == [1, 1]
    assert not any(task.suspect for task in new.in_flight.values())


def test_takeovers_in_a_row_charge_no_attempt() -> None:
    dispatcher = make_dispatcher(max_attempts=2, on_failed=lambda task, why: pytest.fail(why))
    held = [dispatcher.queue.add(f"t{n}", target="victim") for n in range(10)]
    for _ in range(8):
        dispatcher.connect("victim", window=10)
    survivor = dispatcher.session("victim")
    assert survivor is not None and assigned(survivor) == [f"t{n}" for n in range(10)]
    answer_all(dispatcher, survivor)
    assert all(task.attempts == 1 for task in held)


def test_close_ends_every_session_and_keeps_unfinished_tasks_queued() -> None:
    dispatcher = make_dispatcher()
    alice = dispatcher.connect("alice")
    dispatcher.queue.add("one")
    dispatcher.queue.add("two", target="bob")
    dispatcher.close()
    assert alice.ended == SHUTDOWN
    assert (dispatcher.queued(), dispatcher.queue.in_flight()) == (2, 0)
    with pytest.raises(RuntimeError):
        dispatcher.queue.add("three")
    with pytest.raises(RuntimeError):
        dispatcher.connect("carol")


def test_nothing_is_left_behind_once_everything_is_answered() -> None:
    dispatcher = make_dispatcher(max_in_flight=3)
    clients = [dispatcher.connect(f"c{i}") for i in range(4)]
    for i in range(20):
        dispatcher.queue.add(f"t{i}", target="c1" if i % 5 == 0 else None)
    while dispatcher.queue.in_flight():
        for session in clients:
            answer_all(dispatcher, session)
    for session in clients:
        dispatcher.disconnect(session)
    assert (dispatcher.queued(), dispatcher.queue.in_flight()) == (0, 0)
    assert (
        dispatcher.queue._tasks == {}
        and dispatcher.queue._waiting == {}
        and dispatcher._sessions == {}
    )
    assert dispatcher._by_load == {}


def test_disconnect_is_idempotent() -> None:
    dispatcher = make_dispatcher()
    alice = dispatcher.connect("alice")
    dispatcher.queue.add("one")
    dispatcher.disconnect(alice)
    dispatcher.disconnect(alice)
    assert dispatcher.queued() == 1


async def test_next_task_waits_for_work_and_returns_none_when_the_session_ends() -> None:
    dispatcher = make_dispatcher()
    alice = dispatcher.connect("alice")
    waiter = asyncio.create_task(alice.next_task())
    await asyncio.sleep(0)
    assert not waiter.done()
    dispatcher.queue.add("job")
    task = await asyncio.wait_for(waiter, 1)
    assert task is not None and task.text == "job"
    waiter = asyncio.create_task(alice.next_task())
    await asyncio.sleep(0)
    dispatcher.disconnect(alice)
    assert await asyncio.wait_for(waiter, 1) is None


async def test_an_outcome_that_fails_with_nobody_awaiting_it_is_no_error() -> None:
    """A typed task's outcome is awaited by nobody: when it fails (its
    client's error, a cancel) asyncio must not report it as never
    retrieved, which it does as the future is freed, to the loop's
    exception handler."""
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
    dispatcher = make_dispatcher()
    dispatcher.connect("alice")
    broken = await dispatcher.queue.put("breaks")
    withdrawn = await dispatcher.queue.put("waits for bob", "bob")
    assert dispatcher.complete("alice", broken.id, "", "it broke") is Outcome.ACCEPTED
    assert dispatcher.cancel(withdrawn.id) is withdrawn
    gc.collect()
    assert reported == []


def test_a_huge_max_in_flight_costs_nothing_up_front() -> None:
    dispatcher = make_dispatcher(max_in_flight=10**9)
    sessions = [dispatcher.connect(f"c{i}") for i in range(3)]
    for i in range(3000):
        dispatcher.queue.add(f"t{i}")
    assert [len(s.in_flight) for s in sessions] == [1000, 1000, 1000]


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make_dispatcher(max_in_flight=0)


def test_a_client_gets_at_most_the_window_it_asked_for() -> None:
    dispatcher = make_dispatcher(max_in_flight=8)
    small = dispatcher.connect("small", window=2)
    big = dispatcher.connect("big")  # asked nothing: the server's own limit
    tasks = [dispatcher.queue.add(f"t{i}") for i in range(12)]
    assert (small.window, big.window) == (2, 8)
    assert len(small.in_flight) == 2 and len(big.in_flight) == 8
    assert dispatcher.queued() == 2
    dispatcher.complete("small", next(iter(small.in_flight)), "ok")
    assert len(small.in_flight) == 2  # refilled from the queue, up to its window
    assert dispatcher.queued() == 1
    assert tasks[0].id not in small.in_flight


def test_a_window_over_the_servers_limit_is_capped() -> None:
    dispatcher = make_dispatcher(max_in_flight=3)
    greedy = dispatcher.connect("greedy", window=1000)
    for i in range(5):
        dispatcher.queue.add(f"t{i}")
    assert greedy.window == 3 and len(greedy.in_flight) == 3


def test_a_full_client_is_passed_over_for_one_with_room() -> None:
    dispatcher = make_dispatcher(max_in_flight=4)
    one = dispatcher.connect("one", window=1)
    two = dispatcher.connect("two", window=3)
    for i in range(4):
        dispatcher.queue.add(f"t{i}")
    assert assigned(one) == ["t0"]
    assert assigned(two) == ["t1", "t2", "t3"]


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make_dispatcher().connect("zero", window=0)


def test_on_answer_hears_each_accepted_result_once() -> None:
    heard: list[tuple[str, str, str]] = []
    dispatcher = make_dispatcher(
        on_answer=lambda task, name, text: heard.append((task.text, name, text))
    )
    dispatcher.connect("alice")
    task = dispatcher.queue.add("job")
    assert dispatcher.complete("alice", task.id, "done") is Outcome.ACCEPTED
    assert dispatcher.complete("alice", task.id, "again") is Outcome.DUPLICATE
    assert heard == [("job", "alice", "done")]


def test_close_returns_every_unfinished_task() -> None:
    dispatcher = make_dispatcher()
    dispatcher.connect("alice")
    held = dispatcher.queue.add("held")
    waiting = dispatcher.queue.add("waiting", target="bob")
    dispatcher.close()
    assert set(dispatcher.queue.unfinished()) == {held, waiting}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_that_runs_out_sends_the_task_elsewhere_and_stalls_its_holder() -> None:
    clock = Clock()
    dispatcher = make_dispatcher(max_in_flight=2, task_timeout=10, clock=clock)
    hung = dispatcher.connect("hung")
    first, second = dispatcher.queue.add("one"), dispatcher.queue.add("two")
    clock.now = 9.9
    dispatcher.expire_leases()
    assert assigned(hung) == ["one", "two"]  # not yet
    clock.now = 10.0
    dispatcher.expire_leases()
    assert assigned(hung) == [] and hung.stalled
    assert dispatcher.requeues[LEASE_EXPIRED] == 2  # (stats' lease_expiries)
    dispatcher.queue.add("three")
    assert assigned(hung) == []  # a hung client gets nothing more
    rescuer = dispatcher.connect("rescuer")
    assert assigned(rescuer) == ["one"]  # taken back, it travels alone
    # The slow holder's late answer still counts if it comes first.
    assert dispatcher.complete("hung", first.id, "late") is Outcome.ACCEPTED
    assert not hung.stalled  # it answered: it is slow, not hung, and has room again
    assert assigned(rescuer) == ["two"] and assigned(hung) == ["three"]
    assert dispatcher.complete("rescuer", second.id, "ok") is Outcome.ACCEPTED
    assert dispatcher.queue.in_flight() == 1 and dispatcher.queued() == 0


def test_a_task_taken_back_too_often_fails_and_others_go_on() -> None:
    failed: list[tuple[str, str]] = []
    dispatcher = make_dispatcher(
        max_attempts=3, on_failed=lambda task, why: failed.append((task.text, why))
    )
    dispatcher.queue.add("poison")
    for attempt in range(3):
        victim = dispatcher.connect(f"victim-{attempt}")
        assert assigned(victim) == ["poison"]
        dispatcher.disconnect(victim)  # it died of the task
    assert failed == [("poison", "sent 3 times without an answer")]
    assert (dispatcher.queued(), dispatcher.queue.in_flight()) == (0, 0)
    survivor = dispatcher.connect("survivor")
    healthy = dispatcher.queue.add("healthy")
    assert dispatcher.complete("survivor", healthy.id, "ok") is Outcome.ACCEPTED
    assert assigned(survivor) == []


def test_a_shutdown_fails_no_task_whatever_its_attempts() -> None:
    dispatcher = make_dispatcher(max_attempts=1, on_failed=lambda task, why: pytest.fail(why))
    dispatcher.connect("alice")
    task = dispatcher.queue.add("one")
    dispatcher.close()
    assert dispatcher.queue.unfinished() == [task]


def test_leases_can_be_turned_off() -> None:
    clock = Clock()
    dispatcher = make_dispatcher(task_timeout=None, clock=clock)
    alice = dispatcher.connect("alice")
    dispatcher.queue.add("forever")
    clock.now = 10**9
    dispatcher.expire_leases()
    assert assigned(alice) == ["forever"]


def test_tasks_that_waited_beside_a_poison_task_are_not_failed_with_it() -> None:
    failed: list[str] = []
    dispatcher = make_dispatcher(
        max_in_flight=4, max_attempts=2, on_failed=lambda t, why: failed.append(t.text)
    )
    for text in ("poison", "a", "b", "c"):
        dispatcher.queue.add(text)
    first = dispatcher.connect("first")
    assert assigned(first) == ["poison", "a", "b", "c"]
    dispatcher.disconnect(first)  # died of the poison, holding the rest
    second, third = dispatcher.connect("second"), dispatcher.connect("third")
    assert (assigned(second), assigned(third)) == (["poison"], ["a"])  # each alone now
    dispatcher.disconnect(second)  # the poison again
    assert failed == ["poison"]
    while dispatcher.queue.in_flight():
        answer_all(dispatcher, third)
    assert failed == ["poison"] and dispatcher.queued() == 0


# Recovered tasks made up here, not read from a file: in memory only (a
# SQLite queue's own recovery is tested in tests/test_journal.py).
@pytest.mark.parametrize("queue_kind", ["memory"], indirect=True)
def test_resume_requeues_recovered_tasks_first_and_any_client_may_answer_them() -> None:
    dispatcher = make_dispatcher()
    recovered = [
        Task(id="old.1-7", text="seven", attempts=2, suspect=True, recovered=True),
        Task(id="old.1-9", text="nine", recovered=True),
    ]
    dispatcher.queue.recover("old.2", ["old.1"], recovered)
    fresh = dispatcher.queue.add("new")
    assert fresh.id == "old.2-1"
    assert dispatcher.queued() == 3
    alice = dispatcher.connect("alice")
    assert assigned(alice) == ["seven"]  # a suspect task travels alone
    # Before the restart "nine" may have been sent to anyone: bob's answer counts.
    assert dispatcher.complete("bob", "old.1-9", "NINE") is Outcome.ACCEPTED
    assert dispatcher.complete("bob", fresh.id, "NEW") is Outcome.NOT_GIVEN  # as ever
    # A late answer for a task an earlier run finished is a duplicate, not unknown.
    assert dispatcher.complete("alice", "old.1-3", "THREE") is Outcome.DUPLICATE
    assert dispatcher.complete("alice", "gone.1-3", "THREE") is Outcome.UNKNOWN


@pytest.mark.parametrize("queue_kind", ["memory"], indirect=True)
def test_resume_comes_before_any_task() -> None:
    dispatcher = make_dispatcher()
    dispatcher.queue.add("too soon")
    with pytest.raises(RuntimeError, match="before any task"):
        dispatcher.queue.recover("run", [], [])


def test_on_requeued_hears_each_task_taken_back_with_attempts_left() -> None:
    requeued: list[tuple[str, int]] = []
    dispatcher = make_dispatcher(
        on_requeued=lambda task: requeued.append((task.text, task.attempts))
    )
    alice = dispatcher.connect("alice")
    dispatcher.queue.add("one")
    dispatcher.disconnect(alice)
    assert requeued == [("one", 1)]
    dispatcher.connect("bob")
    dispatcher.close()  # a shutdown is no attempt of the task's
    assert requeued == [("one", 1)]


def test_a_reported_failure_finishes_the_task_through_on_error_not_on_answer() -> None:
    answers: list[str] = []
    errors: list[tuple[str, str, str]] = []
    dispatcher = make_dispatcher(
        on_answer=lambda task, name, text: answers.append(text),
        on_error=lambda task, name, error: errors.append((task.text, name, error)),
    )
    alice = dispatcher.connect("alice", window=1)
    broken, after = dispatcher.queue.add("broken"), dispatcher.queue.add("after")
    assert dispatcher.complete("alice", broken.id, "", "ValueError: no") is Outcome.ACCEPTED
    assert errors == [("broken", "alice", "ValueError: no")] and answers == []
    assert assigned(alice) == ["after"]  # its slot is free again; not sent again
    assert dispatcher.complete("alice", broken.id, "late") is Outcome.DUPLICATE
    assert after.attempts == 1 and broken.attempts == 1


def test_cancel_withdraws_a_queued_task_and_what_waited_behind_it_moves() -> None:
    dispatcher = make_dispatcher()
    waiting = dispatcher.queue.add("for bob", target="bob")
    behind = dispatcher.queue.add("also for bob", target="bob")
    assert dispatcher.cancel(waiting.id) is waiting
    assert dispatcher.cancel(waiting.id) is None  # once only
    assert dispatcher.queued() == 1
    bob = dispatcher.connect("bob")
    assert assigned(bob) == ["also for bob"]
    assert dispatcher.complete("bob", waiting.id, "late") is Outcome.DUPLICATE
    assert behind.id in bob.in_flight


def test_cancel_of_a_task_in_flight_tells_a_client_that_listens_and_keeps_its_slot() -> None:
    """The client may still be working on it: its place in the window is
    free again only once the client sends a result for it, which is ignored."""
    dispatcher = make_dispatcher()
    for accepts_cancel in (True, False):
        name = f"listens-{accepts_cancel}"
        client = dispatcher.connect(name, window=1, accepts_cancel=accepts_cancel)
        held = dispatcher.queue.add(f"held by {name}", target=name)
        nxt = dispatcher.queue.add(f"next for {name}", target=name)
        assert client.outbox.popleft() is held  # written to its stream
        assert dispatcher.cancel(held.id) is held
        notices = [t.id for t in client.outbox if t.cancelled]
        assert notices == ([held.id] if accepts_cancel else [])
        assert assigned(client) == [] and dispatcher.queued() == 1  # its slot is still taken
        assert dispatcher.complete(name, held.id, "late") is Outcome.DUPLICATE  # ignored...
        assert assigned(client) == [f"next for {name}"]  # ...and the slot is free
        assert dispatcher.complete(name, nxt.id, "ok") is Outcome.ACCEPTED


def test_cancel_of_a_task_not_yet_written_sends_nothing() -> None:
    dispatcher = make_dispatcher()
    alice = dispatcher.connect("alice", accepts_cancel=True)
    task = dispatcher.queue.add("job")
    assert dispatcher.cancel(task.id) is task
    assert list(alice.outbox) == [] and alice.in_flight == {}


def test_a_client_that_reports_starts_is_leased_each_task_from_when_it_begins() -> None:
    clock = Clock()
    dispatcher = make_dispatcher(task_timeout=10, clock=clock)
    worker = dispatcher.connect("worker", window=2, reports_start=True)
    slow, waiting = dispatcher.queue.add("slow"), dispatcher.queue.add("waiting")
    worker.outbox.clear()  # both written
    dispatcher.started(worker, [slow.id])
    clock.now = 15.0  # "waiting" has waited longer than a lease, behind "slow"
    dispatcher.started(worker, [waiting.id, "no-such-task"])
    dispatcher.expire_leases()
    assert assigned(worker) == ["waiting"] and worker.stalled  # "slow" ran out at 10 s
    assert dispatcher.complete("worker", slow.id, "late but fine") is Outcome.ACCEPTED
    assert not worker.stalled
    clock.now = 24.9
    dispatcher.expire_leases()
    assert assigned(worker) == ["waiting"]  # its lease runs until 25 s
    clock.now = 25.0
    dispatcher.expire_leases()
    assert assigned(worker) == [] and waiting.attempts == 1


def test_a_hung_client_loses_the_tasks_it_has_not_begun_a_lease_after_it_stalled() -> None:
    clock = Clock()
    dispatcher = make_dispatcher(task_timeout=10, clock=clock)
    hung = dispatcher.connect("hung", window=3, reports_start=True, accepts_cancel=True)
    stuck, second, third = (dispatcher.queue.add(text) for text in ("stuck", "second", "third"))
    hung.outbox.clear()  # all three written
    dispatcher.started(hung, [stuck.id])
    clock.now = 10.0
    dispatcher.expire_leases()  # "stuck" taken back and charged; the others wait behind it
    assert assigned(hung) == ["second", "third"] and hung.stalled
    clock.now = 19.9
    dispatcher.expire_leases()
    assert assigned(hung) == ["second", "third"]
    clock.now = 20.0
    dispatcher.expire_leases()
    assert assigned(hung) == [] and hung.stalled
    assert (dispatcher.requeues[LEASE_EXPIRED], dispatcher.requeues[SILENT]) == (1, 2)
    assert [task.id for task in hung.outbox if task.cancelled] == [second.id, third.id]
    assert (stuck.attempts, second.attempts, third.attempts) == (1, 0, 0)  # only one charged
    helper = dispatcher.connect("helper")
    assert assigned(helper) == ["second", "third"]  # not the suspect "stuck": it travels alone
    # The hung client's acknowledgements free its window; an answer it
    # had begun after all would still count.
    assert dispatcher.complete("hung", second.id, "", WITHDRAWN) is Outcome.DUPLICATE
    assert hung.withdrawn == {third.id}
    assert dispatcher.complete("hung", third.id, "done after all") is Outcome.ACCEPTED


async def test_past_max_queued_submitters_wait_in_turn_and_go_in_as_clients_take_tasks() -> None:
    dispatcher = make_dispatcher(max_queued=2)
    entered: list[int] = []

    async def submit(number: int) -> None:
        await dispatcher.queue.put(f"task {number}", "absent")
        entered.append(number)

    waiting = [asyncio.create_task(submit(n)) for n in range(6)]
    await asyncio.wait(waiting[:2], timeout=5)  # queued (committed, for SQLite); the rest wait
    assert entered == [0, 1] and dispatcher.queued() == 2
    with pytest.raises(QueueFullError):
        await dispatcher.queue.reserve(wait=False)  # nor does it jump the line
    waiting[3].cancel()  # gives up its turn
    absent = dispatcher.connect("absent", window=3)  # takes two, and then a third
    await asyncio.wait(waiting, timeout=5)
    assert entered == [0, 1, 2, 4, 5] and assigned(absent) == ["task 0", "task 1", "task 2"]
    assert dispatcher.queued() == 2
    late = asyncio.create_task(dispatcher.queue.reserve())
    await asyncio.sleep(0)
    dispatcher.close()  # a waiter is not left hanging at shutdown
    with pytest.raises(RuntimeError, match="closed"):
        await late
    assert dispatcher.queue._reserved == 0  # every place held was filled or given back


async def test_tasks_put_together_are_queued_in_order_all_or_none() -> None:
    dispatcher = make_dispatcher(max_queued=3)
    queue = dispatcher.queue
    batch = [NewTask("one"), NewTask("for bob", "bob"), NewTask("two", fields={"attempt": 0})]
    tasks = await queue.put_many(batch)
    assert [(task.text, task.target) for task in tasks] == [(t.text, t.target) for t in batch]
    assert all(queue.outcome(task.id) is not None for task in tasks)
    assert await queue.put_many([]) == []
    # Full: a batch that may not wait is refused whole, and holds no place.
    with pytest.raises(QueueFullError):
        await queue.put_many([NewTask("refused")], wait=False)
    assert queue.queued() == 3 and queue._reserved == 0
    # A batch larger than max_queued goes in whole once there is room for
    # one task more: it never waits for room its own places would hold.
    alice = dispatcher.connect("alice", window=1)
    assert assigned(alice) == ["one"]
    bigger = await asyncio.wait_for(queue.put_many([NewTask(f"big {n}") for n in range(5)]), 5)
    assert [task.text for task in bigger] == [f"big {n}" for n in range(5)]
    assert queue.queued() == 7 and queue._reserved == 0
    # Batches waiting for room go in one at a time, each once there is
    # room for one task more: never past max_queued by more than one batch.
    second = asyncio.create_task(queue.put_many([NewTask(f"second {n}") for n in range(3)]))
    third = asyncio.create_task(queue.put_many([NewTask(f"third {n}") for n in range(3)]))
    await asyncio.sleep(0)
    for task in bigger:
        queue.cancel(task.id)  # room at the last: "second" is let in, and holds three places
    queue.cancel(tasks[2].id)  # a place more, in the same turn: still none for "third"
    await asyncio.wait_for(second, 5)
    assert queue.queued() == 1 + 3 and queue._reserved == 0 and not third.done()
    third.cancel()
    # Cancelled while it waits for room: nothing of it is queued.
    waiting = asyncio.create_task(queue.put_many([NewTask("late 1"), NewTask("late 2")]))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert queue.queued() == 4 and queue._reserved == 0
    assert "late 1" not in [task.text for task in queue.unfinished()]


def test_tasks_behind_a_withdrawn_task_that_never_ends_are_taken_back() -> None:
    """A plain handler's thread cannot be stopped: a withdrawn task that hangs
    keeps its worker, and nothing is leased there any more. The tasks behind
    it go elsewhere once the client has been silent for two leases."""
    clock = Clock()
    dispatcher = make_dispatcher(task_timeout=10, clock=clock)
    worker = dispatcher.connect("worker", window=2, reports_start=True, accepts_cancel=True)
    hangs = dispatcher.queue.add("hangs")
    worker.outbox.clear()
    dispatcher.started(worker, [hangs.id])
    clock.now = 5.0
    dispatcher.cancel(hangs.id)  # the thread runs on
    behind = dispatcher.queue.add("behind")
    worker.outbox.clear()
    clock.now = 19.9
    dispatcher.expire_leases()
    assert assigned(worker) == ["behind"]
    clock.now = 20.0  # two leases since its last sign of life: it began "hangs"
    dispatcher.expire_leases()
    assert assigned(worker) == [] and worker.stalled and behind.attempts == 0
    assert dispatcher.queued() == 1


def test_a_task_given_to_an_idle_client_gets_two_whole_leases_to_begin() -> None:
    clock = Clock()
    dispatcher = make_dispatcher(task_timeout=10, clock=clock)
    worker = dispatcher.connect("worker", reports_start=True)
    first = dispatcher.queue.add("first")
    dispatcher.started(worker, [first.id])
    clock.now = 1.0
    assert dispatcher.complete("worker", first.id, "done") is Outcome.ACCEPTED
    clock.now = 20.9  # idle since its answer at 1 s
    later = dispatcher.queue.add("later")
    clock.now = 21.0
    dispatcher.expire_leases()
    assert assigned(worker) == ["later"] and not worker.stalled
    clock.now = 40.8
    dispatcher.expire_leases()
    assert assigned(worker) == ["later"]
    clock.now = 40.9  # two leases after it was given "later"
    dispatcher.expire_leases()
    assert assigned(worker) == [] and later.attempts == 0


def test_a_client_silent_only_because_its_tasks_waited_wakes_once_it_dropped_them() -> None:
    clock = Clock()
    dispatcher = make_dispatcher(task_timeout=10, clock=clock)
    frozen = dispatcher.connect("frozen", window=2, reports_start=True, accepts_cancel=True)
    one, two = dispatcher.queue.add("one"), dispatcher.queue.add("two")
    frozen.outbox.clear()
    clock.now = 20.0
    dispatcher.expire_leases()  # it began nothing for two leases: both go back
    assert frozen.stalled and frozen.withdrawn == {one.id, two.id}
    assert dispatcher.complete("frozen", one.id, "", WITHDRAWN) is Outcome.DUPLICATE
    assert frozen.stalled  # it still holds "two"
    assert dispatcher.complete("frozen", two.id, "", WITHDRAWN) is Outcome.DUPLICATE
    assert not frozen.stalled and assigned(frozen) == ["one", "two"]  # no busy worker known


def test_a_late_acknowledgement_on_a_new_registration_fails_nothing() -> None:
    dispatcher = make_dispatcher()
    old = dispatcher.connect("worker", accepts_cancel=True)
    task = dispatcher.queue.add("kept")
    dispatcher.disconnect(old)  # the acknowledgement of an earlier withdrawal is still unsent
    dispatcher.connect("worker", accepts_cancel=True)
    assert dispatcher.complete("worker", task.id, "", WITHDRAWN) is Outcome.DUPLICATE
    assert dispatcher.complete("worker", task.id, "KEPT") is Outcome.ACCEPTED
