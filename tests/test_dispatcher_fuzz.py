"""Random sequences of connect / disconnect / submit / result / failure /
cancel / takeover against the Dispatcher and the in-memory queue, with
their invariants checked after every step."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from contact import WITHDRAWN
from contact.queue.base import Outcome, Task
from tests.dispatching import make_dispatcher

NAMES = st.sampled_from(["ann", "bob", "cy", "dee"])
LEASE = 10.0  # seconds of the fake clock


class DispatcherMachine(RuleBasedStateMachine):
    @initialize(max_in_flight=st.integers(1, 3), max_attempts=st.none() | st.integers(1, 3))
    def start(self, max_in_flight: int, max_attempts: int | None) -> None:
        self.now = 0.0
        self.dispatcher = make_dispatcher(
            max_in_flight,
            task_timeout=LEASE,
            max_attempts=max_attempts,
            on_failed=lambda task, reason: self.failed.add(task.id),
            clock=lambda: self.now,
        )
        self.tasks: list[Task] = []  # every task ever submitted
        self.finished: set[str] = set()
        self.failed: set[str] = set()

    @rule(seconds=st.floats(0, 2 * LEASE))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.dispatcher.expire_leases()
        assert all(task.lease_ends > self.now for task in self.dispatcher._leases.values())

    @rule(
        name=NAMES,
        window=st.none() | st.integers(1, 4),
        accepts_cancel=st.booleans(),
        reports_start=st.booleans(),
    )
    def connect(
        self, name: str, window: int | None, accepts_cancel: bool, reports_start: bool
    ) -> None:
        old = self.dispatcher._sessions.get(name)  # a takeover when connected
        self.dispatcher.connect(
            name, window, accepts_cancel=accepts_cancel, reports_start=reports_start
        )
        assert old is None or old.ended == "replaced"

    @rule(name=NAMES)
    def disconnect(self, name: str) -> None:
        session = self.dispatcher._sessions.get(name)
        if session is not None:
            self.dispatcher.disconnect(session)

    @rule(text=st.text(max_size=5), for_name=st.none() | NAMES)
    def submit(self, text: str, for_name: str | None) -> None:
        self.tasks.append(self.dispatcher.queue.add(text, for_name))

    @rule(
        name=NAMES, pick=st.integers(0, 10**6), error=st.sampled_from(["", "it broke", WITHDRAWN])
    )
    def result(self, name: str, pick: int, error: str) -> None:
        if not self.tasks:
            return
        task = self.tasks[pick % len(self.tasks)]
        was_given = name in task.given_to
        outcome = self.dispatcher.complete(name, task.id, "done", error)
        if task.id in self.finished or task.id in self.failed or error == WITHDRAWN:
            assert outcome is Outcome.DUPLICATE
        elif was_given:
            assert outcome is Outcome.ACCEPTED
            self.finished.add(task.id)
        else:
            assert outcome is Outcome.NOT_GIVEN

    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        if not self.tasks:
            return
        task = self.tasks[pick % len(self.tasks)]
        withdrawn = self.dispatcher.cancel(task.id)
        if task.id in self.finished or task.id in self.failed:
            assert withdrawn is None
        else:
            assert withdrawn is task
            self.finished.add(task.id)
        assert self.dispatcher.cancel(task.id) is None  # once only

    @rule(name=NAMES)
    def write(self, name: str) -> None:
        """getTask writes what waits for client `name` (a task or a notice)."""
        session = self.dispatcher._sessions.get(name)
        if session is not None and session.outbox:
            session.outbox.popleft()

    @rule(name=NAMES, pick=st.integers(0, 10**6))
    def begin(self, name: str, pick: int) -> None:
        """Client `name` reports that it began one of its tasks."""
        session = self.dispatcher._sessions.get(name)
        if session is not None and session.in_flight:
            tasks = list(session.in_flight)
            self.dispatcher.started(session, [tasks[pick % len(tasks)], "no-such-task"])

    @rule(name=NAMES, pick=st.integers(0, 10**6))
    def result_for_a_withdrawn_task(self, name: str, pick: int) -> None:
        session = self.dispatcher._sessions.get(name)
        if session is not None and session.withdrawn:
            withdrawn = sorted(session.withdrawn)[pick % len(session.withdrawn)]
            ack = self.dispatcher.complete(name, withdrawn, "", WITHDRAWN)
            assert ack is Outcome.DUPLICATE
            assert withdrawn not in session.withdrawn  # its place in the window is free

    @rule(bogus=st.text(max_size=12))
    def unknown_result(self, bogus: str) -> None:
        if bogus not in {task.id for task in self.tasks}:
            assert self.dispatcher.complete("ann", bogus, "x") is Outcome.UNKNOWN

    @invariant()
    def every_task_is_queued_or_at_exactly_one_live_client_or_finished(self) -> None:
        dispatcher = self.dispatcher
        queued = list(dispatcher.queue._queue) + [
            t for line in dispatcher.queue._waiting.values() for t in line
        ]
        held = [t for s in dispatcher._sessions.values() for t in s.in_flight.values()]
        assert len({id(t) for t in queued + held}) == len(queued) + len(held)  # no task twice
        for task in self.tasks:
            places = sum(t is task for t in queued) + sum(t is task for t in held)
            done = task.id in self.finished or task.id in self.failed
            assert places == (0 if done else 1), task
        for session in dispatcher._sessions.values():
            for task in session.in_flight.values():  # held by name: its live session
                assert task.holder == session.name
                assert task.target in (None, session.name)
        for task in queued:
            assert task.holder is None
            if dispatcher.queue.max_attempts is not None:
                assert task.attempts < dispatcher.queue.max_attempts  # it would have failed
        always_leased = {
            t.id
            for s in dispatcher._sessions.values()
            if not s.reports_start
            for t in s.in_flight.values()
        }
        assert always_leased <= set(dispatcher._leases) <= {t.id for t in held}
        ends = [t.lease_ends for t in dispatcher._leases.values()]
        assert ends == sorted(ends)  # the soonest to run out first
        assert self.finished.isdisjoint(self.failed)

    @invariant()
    def no_client_is_over_its_limit_and_no_work_waits_beside_room(self) -> None:
        dispatcher = self.dispatcher
        for session in dispatcher._sessions.values():
            assert session.window <= dispatcher.max_in_flight
            assert len(session.in_flight) + len(session.withdrawn) <= session.window
            assert not (session.stalled and session.has_room())  # a hung client gets nothing
            assert session.stalled or not session.silent
            tasks = [t for t in session.outbox if not t.cancelled]
            notices = [t for t in session.outbox if t.cancelled]
            assert set(t.id for t in tasks) <= set(session.in_flight)
            assert not notices or session.accepts_cancel  # only told if it listens
            # A task withdrawn from a client (it hung) may go back to it once it
            # answers again: the notice then reaches it before the task does.
            order = [(t.id, t.cancelled) for t in session.outbox]
            for task_id in {t.id for t in notices} & set(session.in_flight):
                assert (task_id, False) not in order or order.index((task_id, True)) < order.index(
                    (task_id, False)
                )
            assert session.suspects == sum(t.suspect for t in session.in_flight.values())
            if session.suspects:
                assert len(session.in_flight) == 1  # a suspect task travels alone
            own = dispatcher.queue._waiting.get(session.name)
            if own:  # waits only where it cannot be taken
                assert not session.can_take(own[0])
        if dispatcher.queue._queue:
            assert not any(
                s.can_take(dispatcher.queue._queue[0]) for s in dispatcher._sessions.values()
            )
        assert all(dispatcher.queue._waiting.values())  # no empty line left behind
        for heard in dispatcher._heard:  # only live clients that report starts are watched
            assert heard.reports_start and dispatcher._sessions.get(heard.name) is heard
        for session in dispatcher._sessions.values():  # no task can be held for ever
            if any(task_id not in dispatcher._leases for task_id in session.in_flight):
                assert session in dispatcher._heard

    @invariant()
    def every_live_client_with_room_is_in_the_bucket_of_its_load(self) -> None:
        dispatcher = self.dispatcher
        placed = {s: load for load, bucket in dispatcher._by_load.items() for s in bucket}
        with_room = [s for s in dispatcher._sessions.values() if s.has_room()]
        assert placed == {s: len(s.in_flight) for s in with_room}
        assert all(dispatcher._by_load.values())  # no empty bucket kept

    @invariant()
    def counts_agree(self) -> None:
        unfinished = len(self.tasks) - len(self.finished) - len(self.failed)
        assert self.dispatcher.queued() + self.dispatcher.queue.in_flight() == unfinished
        waiting = sum(len(line) for line in self.dispatcher.queue._waiting.values())
        assert (
            self.dispatcher.queued() == len(self.dispatcher.queue._queue) + waiting
        )  # the kept count


DispatcherMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
test_dispatcher_state_machine = DispatcherMachine.TestCase
