"""The task queue in PostgreSQL (`--queue postgresql://...`): every server
started on one database serves one fleet. Tasks live in the database; each
server claims, for the clients connected to it, what they have room for,
and keeps what it claimed in a MemoryQueue of its own (the local lines the
Dispatcher takes from, synchronously, as with the other queues).

- A task is inserted, and committed, before `put` returns (writes share
  transactions, as the journal's do), with a NOTIFY that wakes every server.
- A server whose clients have room (the Dispatcher found nothing local for
  them) claims the oldest queued tasks for any client, or for the names
  connected to it, with `FOR UPDATE SKIP LOCKED`: no two servers claim one
  task. Claimed tasks no client here took within HOLD_SECONDS go back.
  While tasks are scarce, a server whose clients are all busy claims a
  little later than one with an idler client (DEFER_PER_TASK_SECONDS).
- An answer is settled where it arrives. If the task was submitted on
  another server, its row keeps the answer (state 'ended') and that server
  is notified: it logs it, resolves its handle, calls its hooks, and only
  then deletes the row (the crash rule of sqlite.py, across servers).
- Every server writes a heartbeat by the database's clock; one silent for
  `dead_after` seconds is declared dead by the others, which queue its
  claimed tasks again and report the answers that were waiting for it.
- NOTIFY is only a hint: a slow poll behind it (POLL_SECONDS) finds what a
  lost notification or a reconnection missed.

docs/fleet.md says what a fleet promises, and what it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from typing import Any

from contact import contact_pb2
from contact.logtext import write_held_lines
from contact.queue.base import (
    DEAD_AFTER_SECONDS,
    MAX_ATTEMPTS,
    MAX_QUEUED,
    Dispatching,
    Outcome,
    QueueError,
    Task,
    TaskCancelledError,
    TaskFailedError,
    TaskNotAnsweredError,
)
from contact.queue.memory import MemoryQueue, client_failure, fail

log = logging.getLogger("contact.fleet")

VERSION = 2  # of the schema below; a database with another is refused
# The key of the advisory lock held while the schema is checked or made:
# concurrent CREATE TABLE IF NOT EXISTS can fail, so servers take turns.
SCHEMA_LOCK = 0x636F6E74  # "cont"
# Connecting at start gives up after this long (an address that never
# answers would otherwise hang the start for minutes).
CONNECT_SECONDS = 10.0
# A statement the database has not answered in this long fails (the
# connection is then made again): a hung database is a lost one.
QUERY_SECONDS = 30.0
# A server stalled inside a transaction (a pause of its process, a frozen
# VM) this long loses that connection: PostgreSQL ends it, so that the row
# locks it held never hold up the other servers' reaping (CUT_OFF ends the
# sessions of one stalled in the middle of a statement).
IDLE_IN_TRANSACTION_MS = 3000
# How often a server says it is alive (by the database's clock); others take
# it for dead after --dead-after (DEAD_AFTER_SECONDS) without one.
HEARTBEAT_SECONDS = 2.0
# A heartbeat this late after the one before (the loop or the database
# stalled, even without an error) starts the reaper's wait again.
STALLED_SECONDS = 3 * HEARTBEAT_SECONDS
# The slow poll behind NOTIFY: how late a lost notification is made up for.
POLL_SECONDS = 1.0
# The most tasks one claim takes (also bounded by the room of this server's
# clients): large enough to keep full windows fed in one round trip.
CLAIM_BATCH = 256
# The poll wakes the clients of at most this many names with tasks queued.
POLL_TARGETS = 10_000
# Stats count the tasks queued for at most this many names (those with the
# most), read at each heartbeat: bounded, however many names wait.
STATS_NAMES = 100
# Fleet-wide, the least loaded clients get new tasks first: when tasks are
# scarce (the last claim for any client emptied the queue), a server whose
# least loaded client with room already has N tasks in flight waits N times
# this before it claims for any client, so that a server with idler clients,
# woken by the same notification, claims first. Several times the time from
# a notification to its claim (about 2 ms here), yet small beside a task.
DEFER_PER_TASK_SECONDS = 0.010
# The longest such wait: beyond this many tasks in flight, loads are equals.
DEFER_MAX_SECONDS = 0.050
# Tasks cancelled here while another server held them are remembered (the
# newest this many), so that an answer that passed the cancel by is dropped
# when it comes: that race lasts milliseconds, so a few are plenty.
CANCELS_REMEMBERED = 1000
# Claimed tasks no client here took for this long go back to the database,
# for the clients of other servers (their names moved, or all are busy).
HOLD_SECONDS = 1.0
# Writes begin a transaction at most this often under load (see sqlite.py).
BATCH_SECONDS = 0.005
# After a failed write or heartbeat, wait this long before trying again,
# doubling up to RETRY_MAX_SECONDS: a database that is down is not hammered.
RETRY_SECONDS = 0.25
RETRY_MAX_SECONDS = 5.0
# At shutdown, the last writes (tasks given back, answers) get this long to
# commit; a database still unreachable then loses them (the fleet's
# heartbeat rule queues the tasks again, and repeats those answers' tasks).
CLOSE_SECONDS = 5.0
# Failed tasks kept for inspection (the newest), as in the journal.
KEEP_FAILED = 1000
WRITER, CLAIMER, BEATER, LISTENER = "writer", "claimer", "beater", "listener"
REGISTRAR = "registrar"  # (registrations wait for nothing else)
CHANNEL = "contact"  # the NOTIFY channel: "q" + target (a task to claim), "e" + server (ended)

SCHEMA = (
    "CREATE TABLE contact_schema (version integer NOT NULL)",
    """CREATE TABLE contact_servers (
    id text PRIMARY KEY,  -- the run prefix of the server's task ids
    heartbeat timestamptz NOT NULL  -- by the database's clock
    )""",
    """CREATE TABLE contact_tasks (
    seq bigserial PRIMARY KEY,  -- submission order
    id text NOT NULL UNIQUE,
    text text NOT NULL,
    target text,  -- the only client that may take it; NULL: any
    fields bytea NOT NULL,  -- further ServerMsg fields, as a serialized ServerMsg
    attempts integer NOT NULL DEFAULT 0,  -- sends that ended without an answer
    recovered boolean NOT NULL DEFAULT false,  -- sent before: any client may answer it
    state text NOT NULL
        CHECK (state IN ('queued', 'claimed', 'relayed', 'ended', 'reporting', 'failed',
                         'cancelled')),
    submitted_by text NOT NULL,  -- the server that reports its outcome
    claimed_by text,  -- the server that holds it ('claimed', 'relayed', 'cancelled')
    client text,  -- who answered or failed it
    answer text,
    error text,  -- the client's reason for failing it
    reason text,  -- why it ended without an answer
    ended_at timestamptz
    )""",
    """CREATE TABLE contact_clients (
    name text PRIMARY KEY,  -- a client's name
    server text NOT NULL,  -- the server its live registration is on
    registration bigint NOT NULL  -- from contact_registrations: a newer one wins
    )""",
    "CREATE SEQUENCE contact_registrations",  # (never reused, unlike a count per name)
    f"""CREATE FUNCTION contact_registered() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', 'r' || NEW.server || ':' || NEW.name);
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER contact_registered AFTER INSERT OR UPDATE ON contact_clients
    FOR EACH ROW EXECUTE FUNCTION contact_registered()""",
    # What a claim reads, oldest first: tasks for any client, and those for names.
    """CREATE INDEX contact_tasks_for_any ON contact_tasks (seq)
    WHERE state = 'queued' AND target IS NULL""",
    "CREATE INDEX contact_tasks_for_names ON contact_tasks (target, seq) WHERE state = 'queued'",
    # Every task queued (new, given back, or of a server that died) and every
    # answer waiting for its submitter wakes the servers. Notifications go
    # out when the transaction commits, each payload once.
    f"""CREATE FUNCTION contact_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.state = 'queued' THEN
            PERFORM pg_notify('{CHANNEL}', 'q' || coalesce(NEW.target, ''));
        ELSIF NEW.state = 'ended' THEN
            PERFORM pg_notify('{CHANNEL}', 'e' || NEW.submitted_by);
        ELSIF NEW.state = 'relayed' THEN
            PERFORM pg_notify('{CHANNEL}', 'a' || NEW.claimed_by);
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER contact_notify AFTER INSERT OR UPDATE OF state, submitted_by
    ON contact_tasks FOR EACH ROW EXECUTE FUNCTION contact_notify()""",
    """CREATE INDEX contact_tasks_held ON contact_tasks (claimed_by)
    WHERE state IN ('claimed', 'relayed', 'cancelled')""",
    """CREATE INDEX contact_tasks_ended ON contact_tasks (submitted_by)
    WHERE state IN ('ended', 'reporting')""",
    "CREATE INDEX contact_tasks_failed ON contact_tasks (seq) WHERE state = 'failed'",
)
TABLES = ("contact_schema", "contact_servers", "contact_tasks", "contact_clients")

INSERT = """INSERT INTO contact_tasks (id, text, target, fields, state, submitted_by)
    VALUES ($1, $2, $3, $4, 'queued', $5) ON CONFLICT (id) DO NOTHING"""
# Writes about a claimed task hold only while this server still holds it
# (it may have been taken for dead, and the task claimed by another).
FINISHED = """DELETE FROM contact_tasks WHERE id = $1
    AND (state = 'queued' OR state = 'reporting' AND submitted_by = $2 OR claimed_by = $2)"""
FAILED = """UPDATE contact_tasks SET state = 'failed', attempts = $3, reason = $4,
    ended_at = now(), claimed_by = NULL WHERE id = $1
    AND (state = 'queued' OR state = 'reporting' AND submitted_by = $2 OR claimed_by = $2)"""
PRUNE_FAILED = """DELETE FROM contact_tasks WHERE state = 'failed' AND seq <
    (SELECT seq FROM contact_tasks WHERE state = 'failed' ORDER BY seq DESC OFFSET $1 LIMIT 1)"""
# An answer heard here for a task another server submitted, kept for it.
# Also if the task was queued again meanwhile (this server was taken for
# dead): it has its answer, and is not done again.
ENDED = """UPDATE contact_tasks SET state = 'ended', attempts = $3, client = $4, answer = $5,
    error = $6, reason = $7, ended_at = now(), claimed_by = NULL
    WHERE id = $1 AND (state = 'queued' OR state IN ('claimed', 'relayed') AND claimed_by = $2)"""
# An answer heard here for a task another server holds (the client's calls
# are spread over servers by a per-call balancer): kept for that server.
RELAYED = """UPDATE contact_tasks SET state = 'relayed', client = $2, answer = $3, error = $4
    WHERE id = $1 AND state = 'claimed' AND claimed_by <> $5"""
# Read, not taken: a reply lost on the way is read again. Each settles its
# task here, whose own write ends the row; those (ids $2) are not read again.
RELAYED_HERE = """SELECT id, client, answer, error, attempts FROM contact_tasks
    WHERE state = 'relayed' AND claimed_by = $1 AND NOT id = ANY($2::text[])"""
# A relayed answer that did not settle its task (not its holder's): dropped.
RELAYED_DROPPED = """UPDATE contact_tasks SET state = 'claimed'
    WHERE id = $1 AND state = 'relayed' AND claimed_by = $2"""

REQUEUED = "UPDATE contact_tasks SET attempts = $3 WHERE id = $1 AND claimed_by = $2"
# (One given back with an answer relayed to it meanwhile goes to its submitter.)
GIVEN_BACK = """UPDATE contact_tasks
    SET state = CASE state WHEN 'relayed' THEN 'ended' ELSE 'queued' END,
        claimed_by = NULL, attempts = $3, recovered = recovered OR $4
    WHERE id = $1 AND state IN ('claimed', 'relayed') AND claimed_by = $2"""
# A claim (or a take of answers to report) that committed while its
# connection failed, its reply lost, left rows this server does not know it
# has: after such a failure, the tasks claimed here and the answers taken
# for reporting here that it neither holds nor has a write pending for go
# back (tasks to the queue, answers to be reported).
UNHELD_GIVEN_BACK = """UPDATE contact_tasks
    SET state = CASE state WHEN 'claimed' THEN 'queued' ELSE 'ended' END, claimed_by = NULL
    WHERE (claimed_by = $1 AND state IN ('claimed', 'relayed')
           OR submitted_by = $1 AND state = 'reporting')
        AND NOT id = ANY($2::text[])
    RETURNING state"""
# The session of a lost claiming connection, ended: a statement it was
# running (a claim that timed out) must not commit after the give-back.
LOST_SESSIONS_ENDED = """SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE pid = ANY($1::int[]) AND application_name = $2 AND pid <> pg_backend_pid()"""
CANCELLED = """UPDATE contact_tasks SET state = 'cancelled'
    WHERE id = $1 AND state = 'claimed' AND claimed_by <> $2"""
# (Also one another server answered, its answer not yet reported here: dropped.)
CANCELLED_QUEUED = """DELETE FROM contact_tasks WHERE id = $1
    AND (state IN ('queued', 'cancelled') OR state = 'ended' AND submitted_by = $2)"""
WITHDRAWN = "DELETE FROM contact_tasks WHERE id = $1 AND state = 'cancelled'"
# The writes that end a task's row here, or hand it on: while one is pending,
# the row is this server's no more (not read again, not given back).
SETTLING = frozenset({FINISHED, FAILED, ENDED, GIVEN_BACK, RELAYED_DROPPED})
# The oldest $2 tasks for any client, in order from their index.
CLAIM_FOR_ANY = """UPDATE contact_tasks t SET state = 'claimed', claimed_by = $1
    FROM (SELECT seq FROM contact_tasks WHERE state = 'queued' AND target IS NULL
          ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED) c
    WHERE t.seq = c.seq
    RETURNING t.seq, t.id, t.text, t.target, t.fields, t.attempts, t.recovered, t.submitted_by"""
# The oldest $3 tasks for the names $2 or (at most $4 of them) for any
# client, each kind read in order from its own index (one scan with an OR
# read every queued task);
# a name's only while its registration is on this server, so that a task
# for it never goes to a session another server's newer one replaced.
# Rows locked and not among the oldest $3 are let go as the statement ends.
CLAIM = """WITH for_any AS (
        SELECT seq FROM contact_tasks WHERE state = 'queued' AND target IS NULL
        ORDER BY seq LIMIT $4 FOR UPDATE SKIP LOCKED),
    for_names AS (
        SELECT seq FROM contact_tasks WHERE state = 'queued' AND target = ANY($2::text[])
            AND EXISTS (SELECT 1 FROM contact_clients c WHERE c.name = target AND c.server = $1)
        ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED)
    UPDATE contact_tasks t SET state = 'claimed', claimed_by = $1
    FROM (SELECT seq FROM for_any UNION ALL SELECT seq FROM for_names ORDER BY seq LIMIT $3) c
    WHERE t.seq = c.seq
    RETURNING t.seq, t.id, t.text, t.target, t.fields, t.attempts, t.recovered, t.submitted_by"""
# The answers waiting for this server, taken (state 'reporting') so that
# each is reported once; the row goes once its report is done.
ENDED_HERE = """UPDATE contact_tasks SET state = 'reporting'
    WHERE seq IN (SELECT seq FROM contact_tasks WHERE state = 'ended' AND submitted_by = $1
                  ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING seq, id, text, target, attempts, client, answer, error, reason"""
LEAVE = "DELETE FROM contact_servers WHERE id = $1"
REGISTER_NAME = """INSERT INTO contact_clients VALUES ($1, $2, nextval('contact_registrations'))
    ON CONFLICT (name) DO UPDATE SET server = $2, registration = EXCLUDED.registration
    RETURNING registration"""
UNREGISTER_NAME = """DELETE FROM contact_clients
    WHERE name = $1 AND server = $2 AND registration = $3"""
HEARTBEAT = "UPDATE contact_servers SET heartbeat = now() WHERE id = $1"
REGISTER = """INSERT INTO contact_servers VALUES ($1, now())
    ON CONFLICT (id) DO UPDATE SET heartbeat = now()"""
STILL_MINE = """SELECT id FROM contact_tasks WHERE submitted_by = $1 AND id = ANY($2::text[])
    AND state IN ('queued', 'claimed', 'relayed', 'ended')"""
LIVE = "NOT EXISTS (SELECT 1 FROM contact_servers s WHERE s.id = {column})"
REGISTERED_ELSEWHERE = f"""SELECT 1 FROM contact_clients c WHERE name = $1 AND server <> $2
    AND NOT {LIVE.format(column="c.server")}"""
SILENT = "SELECT id FROM contact_servers WHERE heartbeat < now() - $1 * interval '1 second'"
# Each connection of a server names it (APPLICATION and its id, as
# application_name), so that the server that declares it dead can end its
# sessions first: one paused in the middle of a statement (between a
# prepare and its execution, say) is not idle, so IDLE_IN_TRANSACTION_MS
# never ends it, and its row locks would hold the reaper up for as long as
# the pause lasts. Only sessions of this database and of the same database
# user: those any server of the fleet may end without a superuser.
APPLICATION = "contact"
CUT_OFF = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
    WHERE datname = current_database() AND usename = current_user AND pid <> pg_backend_pid()
    AND application_name = ANY($1::text[])"""
# Those cut off are buried, also one that beat meanwhile: it finds itself
# forgotten at its next heartbeat, as any server taken for dead.
BURY = "DELETE FROM contact_servers WHERE id = ANY($1::text[]) RETURNING id"
ORPHANS_REQUEUED = f"""UPDATE contact_tasks
    SET state = 'queued', claimed_by = NULL, recovered = true
    WHERE state = 'claimed' AND {LIVE.format(column="claimed_by")} RETURNING target"""
# An answer relayed to a server that died has its answer: for its submitter.
ORPHANS_RELAYED = f"""UPDATE contact_tasks SET state = 'ended', claimed_by = NULL, ended_at = now()
    WHERE state = 'relayed' AND {LIVE.format(column="claimed_by")}"""
ORPHANS_UNREGISTERED = f"DELETE FROM contact_clients WHERE {LIVE.format(column='server')}"
ORPHANS_CANCELLED = (
    f"DELETE FROM contact_tasks WHERE state = 'cancelled' AND {LIVE.format(column='claimed_by')}"
)
ORPHANS_ADOPTED = f"""UPDATE contact_tasks SET submitted_by = $1, state = 'ended'
    WHERE state IN ('ended', 'reporting') AND {LIVE.format(column="submitted_by")}"""
QUEUED_TARGETS = """SELECT DISTINCT target FROM contact_tasks
    WHERE state = 'queued' AND target IS NOT NULL LIMIT $1"""
COUNT_SERVERS = "SELECT count(*) FROM contact_servers"
# The names with the most tasks queued, for stats (read from their index).
QUEUED_FOR_NAMES = """SELECT target, count(*) AS queued FROM contact_tasks
    WHERE state = 'queued' AND target IS NOT NULL GROUP BY target ORDER BY queued DESC LIMIT $1"""
# (Two counts, each read from its claim's index.)
COUNT_QUEUED = """SELECT
    (SELECT count(*) FROM contact_tasks WHERE state = 'queued' AND target IS NULL) AS for_any,
    (SELECT count(*) FROM contact_tasks WHERE state = 'queued' AND target IS NOT NULL)
        AS for_names"""
# The ids a server of the fleet issues: its run prefix (8 hex digits), a
# dash, a number; a result for one not held here is late, not unknown.
FLEET_ID = re.compile(r"[0-9a-f]{8}-[0-9]{1,20}")


def runs_of(
    ops: list[tuple[str, tuple[object, ...]]],
) -> list[tuple[str, list[tuple[object, ...]]]]:
    """`ops` in runs of one statement, in order: each run is one executemany."""
    runs: list[tuple[str, list[tuple[object, ...]]]] = []
    for sql, params in ops:
        if runs and runs[-1][0] is sql:
            runs[-1][1].append(params)
        else:
            runs.append((sql, [params]))
    return runs


def storable(text: str | None) -> str | None:
    """`text` as PostgreSQL can keep it: a NUL character it cannot (the only
    one); an answer with one is kept with U+FFFD in its place."""
    return text if text is None or "\x00" not in text else text.replace("\x00", "\ufffd")


def where(url: str) -> str:
    """The database of `url` as a log line may show it: no password."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    return (
        f"{parts.username + '@' if parts.username else ''}{host}:{parts.port or 5432}{parts.path}"
    )


class PostgresQueue(MemoryQueue):
    """A queue in a PostgreSQL database, shared by every server started on
    it: `start` connects (QueueError, in one line, if it cannot), and
    `close` gives back what this server held and lets go."""

    def __init__(
        self,
        url: str,
        *,
        dead_after: float = DEAD_AFTER_SECONDS,
        max_attempts: int | None = MAX_ATTEMPTS,
        max_queued: int | None = MAX_QUEUED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:  # imported here: only --queue needs it (requirements-postgres.txt)
            self._driver: Any = importlib.import_module("asyncpg")
        except ImportError:
            raise QueueError(
                "--queue needs the asyncpg driver: pip install -r requirements-postgres.txt"
            ) from None
        # What a lost or refused connection raises, and a wait that gave up
        # (InternalClientError: asyncpg, of a connection the database ended
        # in the middle of an operation).
        self._failures: tuple[type[Exception], ...] = (
            OSError,
            asyncio.TimeoutError,
            self._driver.PostgresError,
            self._driver.InterfaceError,
            self._driver.InternalClientError,
        )
        if urllib.parse.urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise QueueError(f"--queue takes a postgresql://USER@HOST:PORT/DB URL, not {url!r}")
        if not dead_after > HEARTBEAT_SECONDS:
            raise ValueError(f"dead_after must be more than {HEARTBEAT_SECONDS} s (the heartbeat)")
        super().__init__(max_attempts=max_attempts, max_queued=max_queued, clock=clock)
        self.url, self.dead_after = url, dead_after
        self.run = secrets.token_hex(4)  # this server's id in the fleet, and its ids' prefix
        self._dispatcher: Dispatching | None = None  # bound before start
        # One statement at a time on a connection: registrations take turns
        # (each a round trip: a storm of 2,000 is registered in a second or two).
        self._registrar = asyncio.Lock()
        self._broken: str | None = None  # a chore failed (a bug): said until the end
        self._beating_since: float | None = None  # since when heartbeats get through
        self._last_beat = 0.0  # when the last heartbeat began
        self._taken_for_dead = False  # found so, and not yet handled
        # asyncpg connections, one per chore (WRITER, CLAIMER, BEATER,
        # LISTENER), so that none waits for another's round trip; each made
        # again when needed after it was lost. (A pool would reset each
        # connection on every release: a query more per transaction.)
        self._connections: dict[str, Any] = {}
        self._chores: list[asyncio.Task[None]] = []
        self._trouble: str | None = None
        # Writes not yet committed, in order, and the future of their commit.
        self._ops: list[tuple[str, tuple[object, ...]]] = []
        self._committing: list[tuple[str, tuple[object, ...]]] = []  # (in the transaction on)
        self._batch: asyncio.Future[None] | None = None
        self._wrote = asyncio.Event()  # there are writes to commit
        self._drained = asyncio.Event()  # every write so far is committed
        # Claims: the names that found nothing here, whether any client did,
        # and whether the last claim found the database empty (then only a
        # notification or the poll claims again).
        self._wanted: set[str] = set()
        self._want_any = False
        self._empty = False
        # Whether the last claim for any client found fewer than it asked
        # for, and how many servers the fleet had at the last heartbeat:
        # claims for busy clients defer only when both say so.
        self._scarce = True
        self._servers = 1
        self._claim_wanted = asyncio.Event()
        self._last_claim = 0.0  # when the last claim began (time.monotonic)
        self._polling = False  # the next round polls
        self._claims_unsure = False  # a claim failed: it may have committed unheard
        self._lost_claimers: set[int] = set()  # backends of claiming connections lost, not yet gone
        self._cancelled: dict[str, None] = {}  # the newest CANCELS_REMEMBERED (see cancel)
        self._poll_timer: asyncio.TimerHandle | None = None
        self._held_since: dict[str, float] = {}  # claimed tasks here, untaken: since when
        self._submitter: dict[str, str] = {}  # claimed tasks here submitted elsewhere: by whom
        self._in_database = 0  # tasks queued fleet-wide, as last counted (plus those put since)
        self._for_any = 0  # of those, for any client, as last counted
        self._for_names: dict[str, int] = {}  # and for the names with the most

    # -- starting --

    async def start(self) -> None:
        """Connect, check or make the schema, and join the fleet."""
        try:
            await asyncio.wait_for(self._join(), CONNECT_SECONDS)
        except self._failures as err:
            await self._let_go()
            why = str(err) or type(err).__name__
            if isinstance(err, asyncio.TimeoutError):
                why = f"no answer within {CONNECT_SECONDS:.0f} s"
            raise QueueError(f"cannot use the database {where(self.url)}: {why}") from None
        loop = asyncio.get_running_loop()
        for chore in (self._writing(), self._claiming(), self._beating()):
            self._chores.append(loop.create_task(chore))
            self._chores[-1].add_done_callback(self._chore_ended)
        log.info(
            "fleet database %s: joined as server %s (dead after %.0f s of silence)",
            where(self.url),
            self.run,
            self.dead_after,
        )

    async def _join(self) -> None:
        """Connect, check (or make) the schema, say this server is alive, listen."""
        db = await self._connected(BEATER)
        await self._check_or_create(db)
        await db.execute(REGISTER, self.run)
        self._beating_since = self._last_beat = time.monotonic()  # (that was a heartbeat)
        self._servers = await db.fetchval(COUNT_SERVERS)
        await self._listen()

    async def _connected(self, chore: str) -> Any:
        """The connection of `chore`, made (again) if it has none open."""
        db = self._connections.get(chore)
        if db is None or db.is_closed():
            if chore == CLAIMER and db is not None:  # lost: a claim may have committed unheard
                self._claimer_lost(db)
            # Each attempt gives up after CONNECT_SECONDS, and each statement
            # after QUERY_SECONDS. A claim or a heartbeat lost with the
            # database's machine is only redone: they do not wait for its disk.
            settings = {
                "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION_MS}",
                "application_name": f"{APPLICATION} {self.run}",  # (see CUT_OFF)
            }
            if chore != WRITER:
                settings["synchronous_commit"] = "off"
            db = await self._driver.connect(
                self.url,
                timeout=CONNECT_SECONDS,
                command_timeout=QUERY_SECONDS,
                server_settings=settings,
            )
            self._connections[chore] = db
        return db

    async def _listen(self) -> None:
        """LISTEN on a connection of its own (a pooled one would be handed
        to other work), made again once it was lost."""
        listener = self._connections.get(LISTENER)
        if listener is None or listener.is_closed():
            listener = await self._connected(LISTENER)
            await listener.add_listener(CHANNEL, self._heard)

    def _chore_ended(self, chore: asyncio.Task[None]) -> None:
        """A chore ends only when cancelled at close: a failure is a bug, said
        loudly, and the queue is in trouble from then on."""
        if not chore.cancelled() and (failure := chore.exception()) is not None:
            log.critical("the fleet's %s failed", chore.get_coro(), exc_info=failure)
            self._broken = f"a bug: {failure!r} (see the log)"
            writer = self._chores[0]
            if chore is writer and self._batch is not None and not self._batch.done():
                self._batch.set_exception(QueueError(self._broken))  # (nobody will write it)

    async def _check_or_create(self, db: Any) -> None:
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            found = {
                row[0]
                for row in await db.fetch(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema() AND table_name = ANY($1::text[])",
                    list(TABLES),
                )
            }
            if not found:
                for statement in SCHEMA:
                    await db.execute(statement)
                await db.execute("INSERT INTO contact_schema VALUES ($1)", VERSION)
                log.info("fleet database %s: tables made (schema %d)", where(self.url), VERSION)
                return
            version = None
            if "contact_schema" in found:
                version = await db.fetchval("SELECT max(version) FROM contact_schema")
            if version != VERSION or found != set(TABLES):
                raise QueueError(
                    f"the database {where(self.url)} has contact tables of a schema this "
                    f"server does not know (version {version}; it knows {VERSION})"
                )

    # -- what the interface asks --

    def bind(self, dispatcher: Dispatching) -> None:
        super().bind(dispatcher)
        self._dispatcher = dispatcher

    def _bound(self) -> Dispatching:
        assert self._dispatcher is not None, "bind the queue to its dispatcher first"
        return self._dispatcher

    def head(self, name: str | None) -> Task | None:
        task = super().head(name)
        if task is None and not self.closed:  # a client here has room: claim for it
            if name is not None:
                self._wanted.add(name)
            self._want_any = True
            if not self._empty:
                self._claim_wanted.set()
        return task

    def take(self, task: Task, name: str) -> None:
        super().take(task, name)
        self._held_since.pop(task.id, None)

    def release(self, task: Task, charged: bool) -> bool:
        kept = super().release(task, charged)
        if kept:
            self._held_since[task.id] = self._clock()
        return kept

    async def register(self, name: str) -> int:
        """Record that NAME is connected here: the server of its older
        session, if another, hears it and ends that session. Raises
        QueueError if the database cannot be reached."""
        async with self._registrar:  # (a failed connection is dropped before the next turn)
            try:
                db = await self._connected(REGISTRAR)
                registration: int = await db.fetchval(REGISTER_NAME, name, self.run)
            except self._failures as err:
                raise self._in_trouble(err, REGISTRAR) from None
        return registration

    async def registered_elsewhere(self, name: str) -> bool:
        """Whether NAME's live registration is on another server of the fleet."""
        async with self._registrar:
            try:
                db = await self._connected(REGISTRAR)
                return await db.fetchval(REGISTERED_ELSEWHERE, name, self.run) is not None
            except self._failures as err:
                raise self._in_trouble(err, REGISTRAR) from None

    def settle(
        self, name: str, task_id: str, text: str, error: str = ""
    ) -> tuple[Outcome, Task | None]:
        """An answer for a task another server holds goes to that server
        (a per-call balancer sent the client's call here)."""
        if task_id in self._tasks or not FLEET_ID.fullmatch(task_id):
            return super().settle(name, task_id, text, error)
        answer = None if error else storable(text)  # (a failure has no answer)
        self._write(RELAYED, task_id, name, answer, storable(error or None), self.run)
        return Outcome.DUPLICATE, None  # (here it is no more than late)

    def unregister(self, name: str, registration: int) -> None:
        self._write(UNREGISTER_NAME, name, self.run, registration)

    def queued(self) -> int:
        """Tasks waiting here, and fleet-wide in the database (as last counted)."""
        return super().queued() + self._in_database

    def queued_by_target(self, names: int) -> dict[str | None, int]:
        """Those claimed here, and the fleet's as counted at the last heartbeat."""
        counts = Counter(super().queued_by_target(names))
        counts[None] += self._for_any
        counts.update(self._for_names)  # (adds)
        return {None: counts.pop(None), **dict(counts.most_common(names))}

    def trouble(self) -> str | None:
        return self._broken or self._trouble

    def kept(self) -> str:
        if (trouble := self.trouble()) is not None:
            return f" (perhaps NOT kept: {trouble})"
        return " (kept in the database, for the fleet)"

    def cancel(self, task_id: str) -> Task | None:
        task = super().cancel(task_id)
        if task is not None or (outcome := self._outcomes.pop(task_id, None)) is None:
            return task
        # Submitted here, held in the database or by another server: withdrawn
        # there (the other server's client is not told: its answer is dropped).
        task = Task(id=task_id, text="")
        fail(outcome, self._failure(TaskCancelledError, task, "was cancelled", "cancelled"))
        self._write(CANCELLED, task_id, self.run)
        self._write(CANCELLED_QUEUED, task_id, self.run)
        # An answer on its way (relayed to its holder, not yet ended) passes
        # those by: remembered, it is dropped when it comes.
        self._cancelled[task_id] = None
        if len(self._cancelled) > CANCELS_REMEMBERED:
            del self._cancelled[next(iter(self._cancelled))]
        return task

    def stop(self) -> None:
        super().stop()
        self._claim_wanted.set()  # (the claimer sees it is closed, and ends)

    async def close(self) -> None:
        """Give back every task held here, fail the outcomes still awaited,
        commit what is pending, leave the fleet and let go."""
        self.stop()
        while self._handing_on:  # each runs on the next turn; none can begin once stopped
            await asyncio.sleep(0)
        for task in self.unfinished():
            self._give_back(task)
        self._fail_outcomes(f"the server closed first{self.kept()}")
        if self._chores:  # (joined the fleet: leave it)
            self._write(LEAVE, self.run)
            try:
                await asyncio.wait_for(self._drained.wait(), CLOSE_SECONDS)
            except asyncio.TimeoutError:
                log.error(
                    "the database %s took no writes for %.0f s: the last ones are lost",
                    where(self.url),
                    CLOSE_SECONDS,
                )
        await self._let_go()

    def _fail_outcomes(self, why: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Fail every outcome still awaited here but those of `keep`:
        TaskNotAnsweredError, `why`."""
        for task_id in [task_id for task_id in self._outcomes if task_id not in keep]:
            failure = TaskNotAnsweredError(f"task {task_id} not answered here: {why}")
            fail(self._outcomes.pop(task_id), failure)

    async def _let_go(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.cancel()
        for chore in self._chores:
            chore.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)
        for db in self._connections.values():
            with contextlib.suppress(Exception):  # (one that is lost: nothing to close)
                await asyncio.wait_for(db.close(), RETRY_MAX_SECONDS)

    # -- what the queue keeps --

    def _queued_level(self, task: Task) -> int:
        """Always INFO: a client of another server may take the task, and
        only that server logs its "sent to" line."""
        return logging.INFO

    def _queued_new(self, task: Task) -> None:
        """A task put here is in the database, for whichever server claims it."""
        self._log_queued(task)
        self._counted_in_database(task.target, 1)

    def _counted_in_database(self, target: str | None, change: int) -> None:
        """Keep the counts of the last heartbeat up to date with the tasks
        this server put in, and claimed back (the others' come with the next)."""
        self._in_database = max(0, self._in_database + change)
        if target is None:
            self._for_any = max(0, self._for_any + change)
        elif (count := self._for_names.get(target, 0) + change) > 0:
            self._for_names[target] = count
        else:
            self._for_names.pop(target, None)

    def _kept(self, task: Task) -> asyncio.Future[None]:
        if "\x00" in task.text:  # (a failed INSERT would fail its whole batch)
            raise QueueError("a task for a fleet cannot hold a NUL character (PostgreSQL text)")
        fields = contact_pb2.ServerMsg(**task.fields).SerializeToString()
        batch = self._write(INSERT, task.id, task.text, task.target, fields, self.run)
        return batch

    def _requeued(self, task: Task) -> None:
        self._write(REQUEUED, task.id, self.run, task.attempts)

    def _forget(self, task: Task, outcome: str | TaskNotAnsweredError) -> None:
        self._held_since.pop(task.id, None)
        if isinstance(outcome, (str, TaskCancelledError)):
            self._write(FINISHED, task.id, self.run)
        else:
            self._write(FAILED, task.id, self.run, task.attempts, storable(outcome.reason))
            self._write(PRUNE_FAILED, KEEP_FAILED)

    def _end(self, task: Task, client: str, outcome: str | TaskNotAnsweredError) -> None:
        """Report here a task submitted here (or whose server is gone: then
        the reaper hands it here); hand another server's back to it."""
        submitter = self._submitter.pop(task.id, self.run)
        if submitter == self.run:
            super()._end(task, client, outcome)
            return
        answer = storable(outcome) if isinstance(outcome, str) else None
        error = storable(getattr(outcome, "error", None))
        reason = None if isinstance(outcome, str) else storable(outcome.reason)
        log.debug("task %s ended at %s: reported by server %s", task.id, client, submitter)
        self._write(ENDED, task.id, self.run, task.attempts, client, answer, error, reason)
        self._write(WITHDRAWN, task.id)  # (withdrawn meanwhile: the row goes)

    def _was_issued(self, task_id: str) -> bool:
        """Another server's ids are the fleet's: a result for one not held
        here is late (answered already, or taken back)."""
        if task_id.startswith(f"{self.run}-"):
            return super()._was_issued(task_id)
        return FLEET_ID.fullmatch(task_id) is not None

    def _give_back(self, task: Task) -> None:
        """Put a task claimed here and not taken back in the database, queued."""
        self._remove(task)
        self._held_since.pop(task.id, None)
        self._submitter.pop(task.id, None)
        self._write(GIVEN_BACK, task.id, self.run, task.attempts, bool(task.given_to))

    # -- batched writes: one transaction at a time --

    def _write(self, sql: str, *params: object) -> asyncio.Future[None]:
        self._ops.append((sql, params))
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
            self._batch.add_done_callback(lambda batch: batch.cancelled() or batch.exception())
        self._drained.clear()
        self._wrote.set()
        return self._batch

    async def _writing(self) -> None:
        """Commit the pending writes, one transaction at a time, at most every
        BATCH_SECONDS."""
        while True:
            await self._wrote.wait()
            started = time.monotonic()
            await self._flush()
            await asyncio.sleep(max(0.0, started + BATCH_SECONDS - time.monotonic()))

    async def _flush(self) -> None:
        """Commit until nothing is pending, one transaction at a time. A
        failed transaction is tried again after a backoff, without its new
        tasks: their submitters are told (a task is queued once it is
        committed, or not at all)."""
        backoff = RETRY_SECONDS
        while self._ops:
            ops, batch = self._ops, self._batch
            self._ops, self._batch = [], None
            self._wrote.clear()
            self._committing = ops
            try:
                await self._commit(ops)
            except self._failures as err:
                failure = self._in_trouble(err, WRITER)
                if batch is not None and not batch.done():
                    batch.set_exception(failure)
                self._ops[:0] = [op for op in ops if op[0] is not INSERT]
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, RETRY_MAX_SECONDS)
                continue
            finally:
                self._committing = []
            if batch is not None and not batch.done():
                batch.set_result(None)
        self._drained.set()

    async def _commit(self, ops: list[tuple[str, tuple[object, ...]]]) -> None:
        """One transaction of `ops`, in order, each run of one statement in
        one go. Only new tasks wait for the disk: the rest (answers, tasks
        given back) is undone by a power loss of the database's machine at
        worst, which repeats those tasks rather than losing any."""
        write_held_lines()  # answers are in the log before their rows leave
        db = await self._connected(WRITER)
        async with db.transaction():
            if not any(sql is INSERT for sql, _ in ops):
                await db.execute("SET LOCAL synchronous_commit TO off")
            for sql, rows in runs_of(ops):
                await db.executemany(sql, rows)

    def _in_trouble(self, err: Exception, *chores: str) -> QueueError:
        """Say once that the database cannot be reached (health says it until
        a heartbeat gets through); return that as an error for submitters.
        The connections of `chores` are made anew for their next try: one
        that failed may be lost, or left in the middle of an operation."""
        for chore in chores:
            if (db := self._connections.pop(chore, None)) is not None:
                if chore == CLAIMER:
                    self._claimer_lost(db)
                db.terminate()
        failure = QueueError(f"the database {where(self.url)} cannot be reached: {err}")
        if self._trouble is None:
            log.error("%s; trying again", failure)
        self._trouble = str(failure)
        return failure

    # -- claiming --

    def _heard(self, connection: object, pid: int, channel: str, payload: str) -> None:
        """A notification: a task was queued (for a target, or any), an
        answer waits for this server, or a client registered somewhere."""
        if self.closed:
            return
        if payload.startswith("e"):
            if payload[1:] == self.run:
                self._report_ended_soon()
            return
        if payload.startswith("a"):
            if payload[1:] == self.run:
                self._relayed_waiting = True
                self._claim_wanted.set()
            return
        if payload.startswith("r"):
            server, _, name = payload[1:].partition(":")
            if server != self.run:
                self._bound().moved(name)  # its session here, if any, ends: replaced
            return
        self._empty = False
        self._ready(payload[1:] or None)  # the dispatcher asks `head`: a claim, if it has room

    def _report_ended_soon(self) -> None:
        self._claim_wanted.set()
        self._ended_waiting = True

    _ended_waiting = True  # at start: answers may wait from an earlier life
    _relayed_waiting = False

    async def _claiming(self) -> None:
        """Claim what this server's clients asked for, report answers that
        wait for it, and give back what none of them took; a poll at
        POLL_SECONDS stands in for lost notifications."""
        self._poll_due()
        while not self.closed:
            await self._claim_wanted.wait()
            # Under load, claims begin at most every BATCH_SECONDS: room
            # freed by several answers is filled by one claim, not one each.
            began = time.monotonic()
            await asyncio.sleep(max(0.0, self._last_claim + BATCH_SECONDS - began))
            self._last_claim = time.monotonic()
            self._claim_wanted.clear()
            if self.closed:
                return
            try:
                if self._claims_unsure:
                    await self._give_back_unheld()
                if self._polling:
                    self._polling = False
                    await self._poll()
                await self._claim_round()
            except self._failures as err:
                self._in_trouble(err, CLAIMER)
                self._ended_waiting = self._relayed_waiting = True  # (asked again)
                await asyncio.sleep(RETRY_SECONDS)

    async def _claim_round(self) -> None:
        if self._relayed_waiting:  # first: a task given back below may have its answer
            self._relayed_waiting = False
            await self._complete_relayed()
        self._give_back_unwanted()
        if self._ended_waiting:
            self._ended_waiting = False
            await self._report_ended()
        if not (self._want_any or self._wanted):
            self._empty = False  # (the poll: claim again on the next request)
            return
        names, self._wanted, self._want_any = sorted(self._wanted), set(), False
        if (defer := self._deferral()) > 0:
            if names:  # a name's own tasks wait for nobody
                await self._claim(names, for_any=False)
            await asyncio.sleep(defer)
            if self.closed:
                return
            names = []
        await self._claim(names, for_any=True)

    def _deferral(self) -> float:
        """How long to let idler clients of other servers claim first."""
        if self._servers < 2 or not self._scarce:
            return 0.0  # alone, or work enough for every client
        load = self._bound().lightest()
        return 0.0 if not load else min(DEFER_MAX_SECONDS, load * DEFER_PER_TASK_SECONDS)

    async def _claim(self, names: list[str], *, for_any: bool) -> None:
        """Claim what fits this server's room: tasks for `names`, and, if
        `for_any`, for any client."""
        room = min(CLAIM_BATCH, self._bound().room() - super().queued())
        if room <= 0:  # what is here already fills every window
            return
        claimer = await self._connected(CLAIMER)
        if names:
            rows = await claimer.fetch(CLAIM, self.run, names, room, room if for_any else 0)
        else:  # (the planner reads the simpler statement better)
            rows = await claimer.fetch(CLAIM_FOR_ANY, self.run, room)
        self._empty = len(rows) < room
        if for_any:
            self._scarce = self._empty
        for row in sorted(rows, key=lambda row: row["seq"]):
            if self.closed:  # claimed as it closed: back at once
                self._write(GIVEN_BACK, row["id"], self.run, row["attempts"], False)
            else:
                self._adopt(row)
        if not self._empty:
            self._claim_wanted.set()

    def _poll_due(self) -> None:
        """Poll on the next round, and again POLL_SECONDS later."""
        self._polling = True
        self._claim_wanted.set()
        self._poll_timer = asyncio.get_running_loop().call_later(POLL_SECONDS, self._poll_due)

    async def _poll(self) -> None:
        """What notifications would have said: answers may wait for this
        server, and tasks for any client or for these names are queued."""
        self._ended_waiting = self._relayed_waiting = True
        self._empty = False
        claimer = await self._connected(CLAIMER)
        targets = await claimer.fetch(QUEUED_TARGETS, POLL_TARGETS)
        self._ready(None)  # the dispatcher asks `head` for its clients with room
        for row in targets:
            self._ready(row["target"])

    def _adopt(self, row: Any) -> None:
        """A task this server claimed: into its local lines, for its clients
        (unless it holds it still: it was queued again while this server
        was taken for dead, and claimed back)."""
        if row["id"] in self._tasks:
            return
        message = contact_pb2.ServerMsg.FromString(row["fields"])
        task = Task(
            id=row["id"],
            text=row["text"],
            target=row["target"],
            fields={field.name: value for field, value in message.ListFields()},
            attempts=row["attempts"],
            suspect=row["attempts"] > 0,
            recovered=row["recovered"],
        )
        if row["submitted_by"] != self.run:
            self._submitter[task.id] = row["submitted_by"]
        elif task.id in self._outcomes:
            self._counted_in_database(task.target, -1)
        self._held_since[task.id] = self._clock()
        self._enqueue(task)

    def _claimer_lost(self, db: Any) -> None:
        """The claiming connection is lost: what it claimed or took last may
        have committed unheard. The next round (the poll's, at the latest)
        settles that first."""
        self._claims_unsure = True
        self._lost_claimers.add(db.get_server_pid())

    def _being_settled(self) -> set[str]:
        """The tasks settled here whose rows a write still has to end: in
        the writer's hands, or handed on first."""
        ops = (*self._committing, *self._ops)
        return self._handing_on | {str(params[0]) for sql, params in ops if sql in SETTLING}

    async def _give_back_unheld(self) -> None:
        """Give back what the database says this server has and it does not
        know of (UNHELD_GIVEN_BACK): neither held here nor being settled.
        First the lost connection's session ends, if it has not."""
        claimer = await self._connected(CLAIMER)
        name = f"{APPLICATION} {self.run}"
        lost = await claimer.fetch(LOST_SESSIONS_ENDED, list(self._lost_claimers), name)
        self._lost_claimers = {row["pid"] for row in lost}
        if self._lost_claimers:
            return  # (signalled: looked at again next round)
        known = self._tasks.keys() | self._being_settled()
        rows = await claimer.fetch(UNHELD_GIVEN_BACK, self.run, list(known))
        self._claims_unsure = False
        if ended := sum(row["state"] == "ended" for row in rows):
            self._report_ended_soon()
        if rows:
            line = "a connection failed as it took tasks: %d queued again, %d answers to report"
            log.warning(line, len(rows) - ended, ended)

    def _give_back_unwanted(self) -> None:
        """Claimed tasks no client here took for HOLD_SECONDS go back."""
        if not self._held_since:
            return
        old = self._clock() - HOLD_SECONDS
        for task_id, since in list(self._held_since.items()):
            task = self._tasks.get(task_id)
            if since <= old and task is not None and task.holder is None:
                self._give_back(task)

    async def _complete_relayed(self) -> None:
        """Answers other servers heard for tasks held here: as if heard here
        (the client's window slot here is freed)."""
        claimer = await self._connected(CLAIMER)
        for row in await claimer.fetch(RELAYED_HERE, self.run, list(self._being_settled())):
            task_id = row["id"]
            if task_id not in self._tasks:  # lost track of here: the answer goes to the submitter
                self._write(GIVEN_BACK, task_id, self.run, row["attempts"], False)
                continue
            self._bound().complete(row["client"], task_id, row["answer"], row["error"] or "")
            if task_id in self._tasks:  # (not settled by it)
                self._write(RELAYED_DROPPED, task_id, self.run)

    async def _report_ended(self) -> None:
        """Report the answers other servers received for tasks submitted here
        (each row taken once: its state is 'reporting' until it goes)."""
        rows = await (await self._connected(CLAIMER)).fetch(ENDED_HERE, self.run, CLAIM_BATCH)
        for row in sorted(rows, key=lambda row: row["seq"]):  # (RETURNING has no order)
            if row["id"] in self._cancelled:  # cancelled here as it was answered: dropped
                del self._cancelled[row["id"]]
                self._write(FINISHED, row["id"], self.run)
                continue
            task = Task(row["id"], row["text"], row["target"], attempts=row["attempts"])
            client = row["client"] or ""
            outcome: str | TaskNotAnsweredError
            if row["answer"] is not None:
                outcome = row["answer"]
            elif row["error"] is not None:
                outcome = client_failure(task, client, row["error"])
            else:
                reason = row["reason"] or "ended"
                outcome = self._failure(TaskFailedError, task, f"failed: {reason}", reason)
            super()._end(task, client, outcome)
        if len(rows) == CLAIM_BATCH:
            self._report_ended_soon()

    # -- heartbeats --

    async def _beating(self) -> None:
        """Say this server is alive; declare dead those silent too long."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._beat()
                await self._listen()  # (the poll stands in meanwhile)
            except self._failures as err:
                self._in_trouble(err, BEATER, LISTENER)
                self._beating_since = None
                continue
            if self._trouble is not None:
                log.warning("the database %s can be reached again", where(self.url))
                self._trouble = None
                self._empty = False
                self._claim_wanted.set()

    async def _beat(self) -> None:
        """One heartbeat, and the reaper's round: servers silent for
        `dead_after` are deleted (only by a server that has itself beaten
        for that long: the first one back after an outage of the database
        does not take the others, not back yet, for dead), their sessions
        ended first (CUT_OFF); the tasks of servers that are gone are queued
        again, their answers adopted."""
        now = time.monotonic()
        if self._beating_since is None or now - self._last_beat > STALLED_SECONDS:
            self._beating_since = now  # (a stall that raised nothing counts too)
        self._last_beat = now
        reaping = now - self._beating_since >= self.dead_after
        db = await self._connected(BEATER)
        # The heartbeat commits on its own: a reaper's round held up never
        # makes this server look silent.
        if await db.execute(HEARTBEAT, self.run) == "UPDATE 0":
            await db.execute(REGISTER, self.run)
            self._taken_for_dead = True  # (kept until handled: a failure below may come first)
        if self._taken_for_dead:
            still = await db.fetch(STILL_MINE, self.run, list(self._outcomes))
            self._forgotten({row["id"] for row in still})
            self._taken_for_dead = False
        silent = [row["id"] for row in await db.fetch(SILENT, self.dead_after)] if reaping else []
        if silent:
            await db.execute(CUT_OFF, [f"{APPLICATION} {server}" for server in silent])
        async with db.transaction():
            dead = [row["id"] for row in await db.fetch(BURY, silent)] if silent else []
            # What servers that are gone (declared dead, or left cleanly) left.
            requeued = await db.fetch(ORPHANS_REQUEUED)
            await db.execute(ORPHANS_RELAYED)
            await db.execute(ORPHANS_CANCELLED)
            await db.execute(ORPHANS_UNREGISTERED)
            adopted = await db.execute(ORPHANS_ADOPTED, self.run)
            queued = await db.fetchrow(COUNT_QUEUED)
            self._for_any = queued["for_any"]
            self._in_database = queued["for_any"] + queued["for_names"]
            names = await db.fetch(QUEUED_FOR_NAMES, STATS_NAMES)
            self._for_names = {row["target"]: row["queued"] for row in names}
            self._servers = await db.fetchval(COUNT_SERVERS)
        for server in dead:
            log.warning("server %s declared dead: no heartbeat for %.0f s", server, self.dead_after)
        if requeued:
            log.warning("%d tasks of servers that are gone queued again", len(requeued))
        if adopted != "UPDATE 0":
            self._report_ended_soon()
        self._let_in()

    def _forgotten(self, still_mine: set[str]) -> None:
        """This server was taken for dead (its event loop or its database
        stalled past `dead_after`): the others queued its tasks again,
        adopted its answers and forgot its clients' registrations. Its
        sessions end (their clients register again), what it held goes,
        and the handles of its tasks whose answers another server adopted
        fail (`still_mine`: those it will report itself)."""
        log.error(
            "this server was taken for dead by the fleet (no heartbeat for %.0f s): its"
            " tasks were queued again; its clients register again",
            self.dead_after,
        )
        self._bound().forget_sessions()
        for task in self.unfinished():
            self._give_back(task)  # (written only where this server still holds it)
        self._fail_outcomes(
            "this server was taken for dead by the fleet, which reports it", keep=still_mine
        )
