"""Unit tests of the Router, the gRPC-free queue and routing of the server."""

from __future__ import annotations

import asyncio

import pytest

from contact import WITHDRAWN
from contact.queue.router import REPLACED, SHUTDOWN, Outcome, QueueFullError, Router, Session, Task


def assigned(session: Session) -> list[str]:
    """The texts of the tasks in flight at a session, oldest first."""
    return [task.text for task in session.in_flight.values()]


def unwritten(session: Session) -> list[str]:
    """The texts still waiting to be written to a session's stream."""
    return [task.text for task in session.outbox]


def answer_all(router: Router, session: Session) -> None:
    for task in list(session.in_flight.values()):
        assert router.complete(session.name, task.id, "done") is Outcome.ACCEPTED


def test_a_task_goes_to_the_client_with_fewest_in_flight() -> None:
    router = Router()
    alice = router.connect("alice")
    router.add("one")
    router.add("two")
    bob = router.connect("bob")
    router.add("three")
    assert assigned(alice) == ["one", "two"]
    assert assigned(bob) == ["three"]


def test_equally_loaded_clients_take_turns() -> None:
    router = Router()
    alice, bob = router.connect("alice"), router.connect("bob")
    for text in ("one", "two", "three", "four"):
        router.add(text)
    assert assigned(alice) == ["one", "three"]
    assert assigned(bob) == ["two", "four"]


def test_each_task_goes_to_exactly_one_client() -> None:
    router = Router()
    sessions = [router.connect(f"c{i}") for i in range(3)]
    ids = [router.add(f"task {i}").id for i in range(10)]
    delivered = [task.id for s in sessions for task in s.in_flight.values()]
    assert sorted(delivered) == sorted(ids)


def test_a_targeted_task_waits_for_its_client_and_goes_only_to_it() -> None:
    router = Router()
    alice = router.connect("alice")
    router.add("for bob", target="bob")
    assert assigned(alice) == []
    assert router.queued() == 1
    bob = router.connect("bob")
    assert assigned(bob) == ["for bob"]
    assert router.queued() == 0


def test_no_client_gets_more_than_max_in_flight() -> None:
    router = Router(max_in_flight=2)
    alice = router.connect("alice")
    tasks = [router.add(f"t{i}") for i in range(5)]
    router.add("for alice", target="alice")
    assert assigned(alice) == ["t0", "t1"]
    assert router.queued() == 4
    assert router.complete("alice", tasks[0].id, "ok") is Outcome.ACCEPTED
    # Room for one more: her own waiting task comes before the shared queue.
    assert assigned(alice) == ["t1", "for alice"]
    assert router.complete("alice", tasks[1].id, "ok") is Outcome.ACCEPTED
    assert assigned(alice) == ["for alice", "t2"]


def test_a_departed_clients_tasks_go_back_to_the_front_in_order() -> None:
    router = Router(max_in_flight=2)
    alice = router.connect("alice")
    for text in ("one", "two", "three"):
        router.add(text)
    router.add("alice only", target="alice")
    router.disconnect(alice)
    assert router.in_flight() == 0
    assert router.queued() == 4
    bob = router.connect("bob")
    assert assigned(bob) == ["one"]  # taken back, it travels alone: it may be what killed alice
    alice = router.connect("alice")
    assert assigned(alice) == ["alice only"]  # "two" is next, and waits for an idle client
    answer_all(router, bob)
    assert assigned(bob) == ["two"]
    assert assigned(alice) == ["alice only", "three"]  # the head moved on, in order


def test_the_first_result_wins_and_a_later_one_is_a_duplicate() -> None:
    router = Router()
    alice = router.connect("alice")
    task = router.add("job")
    router.disconnect(alice)  # alice vanished while holding it
    bob = router.connect("bob")
    assert unwritten(bob) == ["job"]
    # alice's answer arrives late, on a new connection: she was given the task.
    assert router.complete("alice", task.id, "from alice") is Outcome.ACCEPTED
    assert unwritten(bob) == []  # no longer worth sending to bob
    assert bob.in_flight == {}
    assert router.complete("bob", task.id, "from bob") is Outcome.DUPLICATE


def test_a_result_for_an_unknown_id_is_ignored() -> None:
    router = Router()
    router.connect("alice")
    task = router.add("job")
    run = task.id.rpartition("-")[0]
    bogus_ids = ("", "nonsense", "000000-1", task.id + "0", "-1", task.id[:-1] + "٣")
    for bogus in (*bogus_ids, f"{run}-{'9' * 5000}"):
        assert router.complete("alice", bogus, "x") is Outcome.UNKNOWN, bogus
    assert router.in_flight() == 1


def test_a_client_cannot_finish_a_task_it_was_never_given() -> None:
    router = Router()
    alice = router.connect("alice")
    held = router.add("held by alice")
    waiting = router.add("for nobody yet", target="nobody")
    assert router.complete("mallory", held.id, "x") is Outcome.NOT_GIVEN
    assert router.complete("mallory", waiting.id, "x") is Outcome.NOT_GIVEN
    assert held.id in alice.in_flight
    assert router.queued() == 1


def test_a_new_registration_under_a_connected_name_takes_over() -> None:
    router = Router()
    old = router.connect("alice")
    router.add("one")
    router.add("two", target="alice")
    new = router.connect("alice")
    assert old.ended == REPLACED
    assert old.in_flight == {}
    # Her own waiting task first. A takeover is no evidence against the
    # tasks the old session held: not suspect, and no attempt charged.
    assert assigned(new) == ["two", "one"]
    assert [task.attempts for task in new.in_flight.values()] == [1, 1]
    assert not any(task.suspect for task in new.in_flight.values())


def test_takeovers_in_a_row_charge_no_attempt() -> None:
    router = Router(max_attempts=2, on_failed=lambda task, why: pytest.fail(why))
    held = [router.add(f"t{n}", target="victim") for n in range(10)]
    for _ in range(8):
        router.connect("victim", window=10)
    survivor = router.session("victim")
    assert survivor is not None and assigned(survivor) == [f"t{n}" for n in range(10)]
    answer_all(router, survivor)
    assert all(task.attempts == 1 for task in held)


def test_close_ends_every_session_and_keeps_unfinished_tasks_queued() -> None:
    router = Router()
    alice = router.connect("alice")
    router.add("one")
    router.add("two", target="bob")
    router.close()
    assert alice.ended == SHUTDOWN
    assert (router.queued(), router.in_flight()) == (2, 0)
    with pytest.raises(RuntimeError):
        router.add("three")
    with pytest.raises(RuntimeError):
        router.connect("carol")


def test_nothing_is_left_behind_once_everything_is_answered() -> None:
    router = Router(max_in_flight=3)
    clients = [router.connect(f"c{i}") for i in range(4)]
    for i in range(20):
        router.add(f"t{i}", target="c1" if i % 5 == 0 else None)
    while router.in_flight():
        for session in clients:
            answer_all(router, session)
    for session in clients:
        router.disconnect(session)
    assert (router.queued(), router.in_flight()) == (0, 0)
    assert router._tasks == {} and router._waiting == {} and router._sessions == {}
    assert router._by_load == {}


def test_disconnect_is_idempotent() -> None:
    router = Router()
    alice = router.connect("alice")
    router.add("one")
    router.disconnect(alice)
    router.disconnect(alice)
    assert router.queued() == 1


def test_next_task_waits_for_work_and_returns_none_when_the_session_ends() -> None:
    async def scenario() -> None:
        router = Router()
        alice = router.connect("alice")
        waiter = asyncio.create_task(alice.next_task())
        await asyncio.sleep(0)
        assert not waiter.done()
        router.add("job")
        task = await asyncio.wait_for(waiter, 1)
        assert task is not None and task.text == "job"
        waiter = asyncio.create_task(alice.next_task())
        await asyncio.sleep(0)
        router.disconnect(alice)
        assert await asyncio.wait_for(waiter, 1) is None

    asyncio.run(scenario())


def test_a_huge_max_in_flight_costs_nothing_up_front() -> None:
    router = Router(max_in_flight=10**9)
    sessions = [router.connect(f"c{i}") for i in range(3)]
    for i in range(3000):
        router.add(f"t{i}")
    assert [len(s.in_flight) for s in sessions] == [1000, 1000, 1000]


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Router(max_in_flight=0)


def test_a_client_gets_at_most_the_window_it_asked_for() -> None:
    router = Router(max_in_flight=8)
    small = router.connect("small", window=2)
    big = router.connect("big")  # asked nothing: the server's own limit
    tasks = [router.add(f"t{i}") for i in range(12)]
    assert (small.window, big.window) == (2, 8)
    assert len(small.in_flight) == 2 and len(big.in_flight) == 8
    assert router.queued() == 2
    router.complete("small", next(iter(small.in_flight)), "ok")
    assert len(small.in_flight) == 2  # refilled from the queue, up to its window
    assert router.queued() == 1
    assert tasks[0].id not in small.in_flight


def test_a_window_over_the_servers_limit_is_capped() -> None:
    router = Router(max_in_flight=3)
    greedy = router.connect("greedy", window=1000)
    for i in range(5):
        router.add(f"t{i}")
    assert greedy.window == 3 and len(greedy.in_flight) == 3


def test_a_full_client_is_passed_over_for_one_with_room() -> None:
    router = Router(max_in_flight=4)
    one = router.connect("one", window=1)
    two = router.connect("two", window=3)
    for i in range(4):
        router.add(f"t{i}")
    assert assigned(one) == ["t0"]
    assert assigned(two) == ["t1", "t2", "t3"]


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Router().connect("zero", window=0)


def test_on_answer_hears_each_accepted_result_once() -> None:
    heard: list[tuple[str, str, str]] = []
    router = Router(on_answer=lambda task, name, text: heard.append((task.text, name, text)))
    router.connect("alice")
    task = router.add("job")
    assert router.complete("alice", task.id, "done") is Outcome.ACCEPTED
    assert router.complete("alice", task.id, "again") is Outcome.DUPLICATE
    assert heard == [("job", "alice", "done")]


def test_close_returns_every_unfinished_task() -> None:
    router = Router()
    router.connect("alice")
    held = router.add("held")
    waiting = router.add("waiting", target="bob")
    router.close()
    assert set(router.unfinished()) == {held, waiting}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_that_runs_out_sends_the_task_elsewhere_and_stalls_its_holder() -> None:
    clock = Clock()
    router = Router(max_in_flight=2, task_timeout=10, clock=clock)
    hung = router.connect("hung")
    first, second = router.add("one"), router.add("two")
    clock.now = 9.9
    router.expire_leases()
    assert assigned(hung) == ["one", "two"]  # not yet
    clock.now = 10.0
    router.expire_leases()
    assert assigned(hung) == [] and hung.stalled
    router.add("three")
    assert assigned(hung) == []  # a hung client gets nothing more
    rescuer = router.connect("rescuer")
    assert assigned(rescuer) == ["one"]  # taken back, it travels alone
    # The slow holder's late answer still counts if it comes first.
    assert router.complete("hung", first.id, "late") is Outcome.ACCEPTED
    assert not hung.stalled  # it answered: it is slow, not hung, and has room again
    assert assigned(rescuer) == ["two"] and assigned(hung) == ["three"]
    assert router.complete("rescuer", second.id, "ok") is Outcome.ACCEPTED
    assert router.in_flight() == 1 and router.queued() == 0


def test_a_task_taken_back_too_often_fails_and_others_go_on() -> None:
    failed: list[tuple[str, str]] = []
    router = Router(max_attempts=3, on_failed=lambda task, why: failed.append((task.text, why)))
    router.add("poison")
    for attempt in range(3):
        victim = router.connect(f"victim-{attempt}")
        assert assigned(victim) == ["poison"]
        router.disconnect(victim)  # it died of the task
    assert failed == [("poison", "sent 3 times without an answer")]
    assert (router.queued(), router.in_flight()) == (0, 0)
    survivor = router.connect("survivor")
    healthy = router.add("healthy")
    assert router.complete("survivor", healthy.id, "ok") is Outcome.ACCEPTED
    assert assigned(survivor) == []


def test_a_shutdown_fails_no_task_whatever_its_attempts() -> None:
    router = Router(max_attempts=1, on_failed=lambda task, why: pytest.fail(why))
    router.connect("alice")
    task = router.add("one")
    router.close()
    assert router.unfinished() == [task]


def test_leases_can_be_turned_off() -> None:
    clock = Clock()
    router = Router(task_timeout=None, clock=clock)
    alice = router.connect("alice")
    router.add("forever")
    clock.now = 10**9
    router.expire_leases()
    assert assigned(alice) == ["forever"]


def test_tasks_that_waited_beside_a_poison_task_are_not_failed_with_it() -> None:
    failed: list[str] = []
    router = Router(max_in_flight=4, max_attempts=2, on_failed=lambda t, why: failed.append(t.text))
    for text in ("poison", "a", "b", "c"):
        router.add(text)
    first = router.connect("first")
    assert assigned(first) == ["poison", "a", "b", "c"]
    router.disconnect(first)  # died of the poison, holding the rest
    second, third = router.connect("second"), router.connect("third")
    assert (assigned(second), assigned(third)) == (["poison"], ["a"])  # each alone now
    router.disconnect(second)  # the poison again
    assert failed == ["poison"]
    while router.in_flight():
        answer_all(router, third)
    assert failed == ["poison"] and router.queued() == 0


def test_resume_requeues_recovered_tasks_first_and_any_client_may_answer_them() -> None:
    router = Router()
    recovered = [
        Task(id="old.1-7", text="seven", attempts=2, suspect=True, recovered=True),
        Task(id="old.1-9", text="nine", recovered=True),
    ]
    router.resume("old.2", ["old.1"], recovered)
    fresh = router.add("new")
    assert fresh.id == "old.2-1"
    assert router.queued() == 3
    alice = router.connect("alice")
    assert assigned(alice) == ["seven"]  # a suspect task travels alone
    # Before the restart "nine" may have been sent to anyone: bob's answer counts.
    assert router.complete("bob", "old.1-9", "NINE") is Outcome.ACCEPTED
    assert router.complete("bob", fresh.id, "NEW") is Outcome.NOT_GIVEN  # as ever
    # A late answer for a task an earlier run finished is a duplicate, not unknown.
    assert router.complete("alice", "old.1-3", "THREE") is Outcome.DUPLICATE
    assert router.complete("alice", "gone.1-3", "THREE") is Outcome.UNKNOWN


def test_resume_comes_before_any_task() -> None:
    router = Router()
    router.add("too soon")
    with pytest.raises(RuntimeError, match="before any task"):
        router.resume("run", [], [])


def test_on_requeued_hears_each_task_taken_back_with_attempts_left() -> None:
    requeued: list[tuple[str, int]] = []
    router = Router(on_requeued=lambda task: requeued.append((task.text, task.attempts)))
    alice = router.connect("alice")
    router.add("one")
    router.disconnect(alice)
    assert requeued == [("one", 1)]
    router.connect("bob")
    router.close()  # a shutdown is no attempt of the task's
    assert requeued == [("one", 1)]


def test_a_reported_failure_finishes_the_task_through_on_error_not_on_answer() -> None:
    answers: list[str] = []
    errors: list[tuple[str, str, str]] = []
    router = Router(
        on_answer=lambda task, name, text: answers.append(text),
        on_error=lambda task, name, error: errors.append((task.text, name, error)),
    )
    alice = router.connect("alice", window=1)
    broken, after = router.add("broken"), router.add("after")
    assert router.complete("alice", broken.id, "", "ValueError: no") is Outcome.ACCEPTED
    assert errors == [("broken", "alice", "ValueError: no")] and answers == []
    assert assigned(alice) == ["after"]  # its slot is free again; not sent again
    assert router.complete("alice", broken.id, "late") is Outcome.DUPLICATE
    assert after.attempts == 1 and broken.attempts == 1


def test_cancel_withdraws_a_queued_task_and_what_waited_behind_it_moves() -> None:
    router = Router()
    waiting = router.add("for bob", target="bob")
    behind = router.add("also for bob", target="bob")
    assert router.cancel(waiting.id) is waiting
    assert router.cancel(waiting.id) is None  # once only
    assert router.queued() == 1
    bob = router.connect("bob")
    assert assigned(bob) == ["also for bob"]
    assert router.complete("bob", waiting.id, "late") is Outcome.DUPLICATE
    assert behind.id in bob.in_flight


def test_cancel_of_a_task_in_flight_tells_a_client_that_listens_and_keeps_its_slot() -> None:
    """The client may still be working on it: its place in the window is
    free again only once the client sends a result for it, which is ignored."""
    router = Router()
    for accepts_cancel in (True, False):
        name = f"listens-{accepts_cancel}"
        client = router.connect(name, window=1, accepts_cancel=accepts_cancel)
        held = router.add(f"held by {name}", target=name)
        nxt = router.add(f"next for {name}", target=name)
        assert client.outbox.popleft() is held  # written to its stream
        assert router.cancel(held.id) is held
        notices = [t.id for t in client.outbox if t.cancelled]
        assert notices == ([held.id] if accepts_cancel else [])
        assert assigned(client) == [] and router.queued() == 1  # its slot is still taken
        assert router.complete(name, held.id, "late") is Outcome.DUPLICATE  # ignored...
        assert assigned(client) == [f"next for {name}"]  # ...and the slot is free
        assert router.complete(name, nxt.id, "ok") is Outcome.ACCEPTED


def test_cancel_of_a_task_not_yet_written_sends_nothing() -> None:
    router = Router()
    alice = router.connect("alice", accepts_cancel=True)
    task = router.add("job")
    assert router.cancel(task.id) is task
    assert list(alice.outbox) == [] and alice.in_flight == {}


def test_a_client_that_reports_starts_is_leased_each_task_from_when_it_begins() -> None:
    clock = Clock()
    router = Router(task_timeout=10, clock=clock)
    worker = router.connect("worker", window=2, reports_start=True)
    slow, waiting = router.add("slow"), router.add("waiting")
    worker.outbox.clear()  # both written
    router.started(worker, [slow.id])
    clock.now = 15.0  # "waiting" has waited longer than a lease, behind "slow"
    router.started(worker, [waiting.id, "no-such-task"])
    router.expire_leases()
    assert assigned(worker) == ["waiting"] and worker.stalled  # "slow" ran out at 10 s
    assert router.complete("worker", slow.id, "late but fine") is Outcome.ACCEPTED
    assert not worker.stalled
    clock.now = 24.9
    router.expire_leases()
    assert assigned(worker) == ["waiting"]  # its lease runs until 25 s
    clock.now = 25.0
    router.expire_leases()
    assert assigned(worker) == [] and waiting.attempts == 1


def test_a_hung_client_loses_the_tasks_it_has_not_begun_a_lease_after_it_stalled() -> None:
    clock = Clock()
    router = Router(task_timeout=10, clock=clock)
    hung = router.connect("hung", window=3, reports_start=True, accepts_cancel=True)
    stuck, second, third = (router.add(text) for text in ("stuck", "second", "third"))
    hung.outbox.clear()  # all three written
    router.started(hung, [stuck.id])
    clock.now = 10.0
    router.expire_leases()  # "stuck" taken back and charged; the others wait behind it
    assert assigned(hung) == ["second", "third"] and hung.stalled
    clock.now = 19.9
    router.expire_leases()
    assert assigned(hung) == ["second", "third"]
    clock.now = 20.0
    router.expire_leases()
    assert assigned(hung) == [] and hung.stalled
    assert [task.id for task in hung.outbox if task.cancelled] == [second.id, third.id]
    assert (stuck.attempts, second.attempts, third.attempts) == (1, 0, 0)  # only one charged
    helper = router.connect("helper")
    assert assigned(helper) == ["second", "third"]  # not the suspect "stuck": it travels alone
    # The hung client's acknowledgements free its window; an answer it
    # had begun after all would still count.
    assert router.complete("hung", second.id, "", WITHDRAWN) is Outcome.DUPLICATE
    assert hung.withdrawn == {third.id}
    assert router.complete("hung", third.id, "done after all") is Outcome.ACCEPTED


def test_past_max_queued_submitters_wait_in_turn_and_go_in_as_clients_take_tasks() -> None:
    async def scenario() -> None:
        router = Router(max_queued=2)
        entered: list[int] = []

        async def submit(number: int) -> None:
            await router.reserve()
            router.queue(router.new_task(f"task {number}", "absent"), reserved=True)
            entered.append(number)

        waiting = [asyncio.create_task(submit(n)) for n in range(6)]
        await asyncio.sleep(0)  # (each runs to its first wait)
        assert entered == [0, 1] and router.queued() == 2
        with pytest.raises(QueueFullError):
            await router.reserve(wait=False)  # nor does it jump the line
        waiting[3].cancel()  # gives up its turn
        absent = router.connect("absent", window=3)  # takes two, and then a third
        await asyncio.wait(waiting, timeout=5)
        assert entered == [0, 1, 2, 4, 5] and assigned(absent) == ["task 0", "task 1", "task 2"]
        assert router.queued() == 2
        late = asyncio.create_task(router.reserve())
        await asyncio.sleep(0)
        router.close()  # a waiter is not left hanging at shutdown
        with pytest.raises(RuntimeError, match="closed"):
            await late

    asyncio.run(scenario())


def test_tasks_behind_a_withdrawn_task_that_never_ends_are_taken_back() -> None:
    """A plain handler's thread cannot be stopped: a withdrawn task that hangs
    keeps its worker, and nothing is leased there any more. The tasks behind
    it go elsewhere once the client has been silent for two leases."""
    clock = Clock()
    router = Router(task_timeout=10, clock=clock)
    worker = router.connect("worker", window=2, reports_start=True, accepts_cancel=True)
    hangs = router.add("hangs")
    worker.outbox.clear()
    router.started(worker, [hangs.id])
    clock.now = 5.0
    router.cancel(hangs.id)  # the thread runs on
    behind = router.add("behind")
    worker.outbox.clear()
    clock.now = 19.9
    router.expire_leases()
    assert assigned(worker) == ["behind"]
    clock.now = 20.0  # two leases since its last sign of life: it began "hangs"
    router.expire_leases()
    assert assigned(worker) == [] and worker.stalled and behind.attempts == 0
    assert router.queued() == 1


def test_a_task_given_to_an_idle_client_gets_two_whole_leases_to_begin() -> None:
    clock = Clock()
    router = Router(task_timeout=10, clock=clock)
    worker = router.connect("worker", reports_start=True)
    first = router.add("first")
    router.started(worker, [first.id])
    clock.now = 1.0
    assert router.complete("worker", first.id, "done") is Outcome.ACCEPTED
    clock.now = 20.9  # idle since its answer at 1 s
    later = router.add("later")
    clock.now = 21.0
    router.expire_leases()
    assert assigned(worker) == ["later"] and not worker.stalled
    clock.now = 40.8
    router.expire_leases()
    assert assigned(worker) == ["later"]
    clock.now = 40.9  # two leases after it was given "later"
    router.expire_leases()
    assert assigned(worker) == [] and later.attempts == 0


def test_a_client_silent_only_because_its_tasks_waited_wakes_once_it_dropped_them() -> None:
    clock = Clock()
    router = Router(task_timeout=10, clock=clock)
    frozen = router.connect("frozen", window=2, reports_start=True, accepts_cancel=True)
    one, two = router.add("one"), router.add("two")
    frozen.outbox.clear()
    clock.now = 20.0
    router.expire_leases()  # it began nothing for two leases: both go back
    assert frozen.stalled and frozen.withdrawn == {one.id, two.id}
    assert router.complete("frozen", one.id, "", WITHDRAWN) is Outcome.DUPLICATE
    assert frozen.stalled  # it still holds "two"
    assert router.complete("frozen", two.id, "", WITHDRAWN) is Outcome.DUPLICATE
    assert not frozen.stalled and assigned(frozen) == ["one", "two"]  # no busy worker known


def test_a_late_acknowledgement_on_a_new_registration_fails_nothing() -> None:
    router = Router()
    old = router.connect("worker", accepts_cancel=True)
    task = router.add("kept")
    router.disconnect(old)  # the acknowledgement of an earlier withdrawal is still unsent
    router.connect("worker", accepts_cancel=True)
    assert router.complete("worker", task.id, "", WITHDRAWN) is Outcome.DUPLICATE
    assert router.complete("worker", task.id, "KEPT") is Outcome.ACCEPTED
