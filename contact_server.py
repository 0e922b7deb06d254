"""The contact server: pushes tasks typed on its standard input to the clients
that dialled in, and logs the results they send back.

    python contact_server.py [--host 127.0.0.1] [--port 50051]
                             [--tls-cert FILE --tls-key FILE [--client-ca FILE]]

Type one task per line: `TEXT` goes to any connected client, `@NAME TEXT`
only to the client registered as NAME. Ctrl-C (or SIGTERM) stops it.

The file has three parts: `Router`, the queue and routing with no gRPC in it
(import it, test it, or replace it with a broker); `ContactServicer`, the thin
gRPC layer over it; and `serve`, which wires them to a port and to stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import ipaddress
import logging
import os
import secrets
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from contact import (
    CLIENT_ID_KEY,
    CLIENT_NAME,
    CLIENT_NAME_RULE,
    MAX_MESSAGE_BYTES,
    MAX_TEXT_BYTES,
    contact_pb2,
    contact_pb2_grpc,
)

log = logging.getLogger("contact.server")

# Non-default gRPC options, each chosen for long-lived push streams:
#
# grpc.keepalive_time_ms / grpc.keepalive_timeout_ms: ping every client after
#   15 s without traffic and drop its connection if the ping is not answered
#   within 10 s, so a client that died silently (power loss, network cut) is
#   noticed within about 25 s and its tasks go to someone else. The default is
#   one ping every two hours.
# grpc.http2.ping_timeout_ms: current gRPC core waits this long (default one
#   minute) for any ping's answer, keepalive pings included, before it drops
#   the connection; keepalive_timeout_ms alone does not shorten that wait.
#   (Measured here: without it a frozen client went unnoticed for over 40 s.)
# grpc.http2.max_pings_without_data = 0: keep pinging while no task flows; by
#   default gRPC stops after two pings with no data in between, which would
#   stop keepalive on exactly the idle streams it is meant to watch.
# grpc.http2.min_recv_ping_interval_without_data_ms: clients ping every 15 s
#   (see contact_client.py); accept pings as often as every 10 s, so they are
#   never answered with GOAWAY "too_many_pings" (the default minimum is 5 min).
# grpc.max_receive_message_length / grpc.max_send_message_length: an explicit
#   cap, so an oversized message is refused with RESOURCE_EXHAUSTED.
# grpc.so_reuseport = 0: gRPC sets SO_REUSEPORT by default, so a second server
#   on a busy port would start "successfully" and share it; fail instead.
#
# There is deliberately no grpc.max_connection_age: it would cut the
# long-lived getTask streams.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


class Quoted:
    """Text from outside, quoted for a log line: control characters escaped,
    so a client cannot forge log lines, and very long texts cut. The work is
    done only if the line is written, so a quiet server does not pay for it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        if len(self.text) > 200:
            return f"{self.text[:200]!r}... ({len(self.text)} characters)"
        return repr(self.text)


# --- Routing: no gRPC below this line until ContactServicer -------------------


@dataclass(eq=False)
class Task:
    """One unit of work, from the moment it is typed until a result arrives."""

    id: str
    text: str
    target: str | None = None  # the only client that may take it; None: any
    holder: Session | None = None  # the client it is in flight at, if any
    given_to: set[str] = field(default_factory=set)  # every client it was sent to


class Session:
    """One registered client: the tasks in flight at it, oldest first, and the
    part of them still waiting to be written to its stream (the outbox)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight: dict[str, Task] = {}
        self.outbox: deque[Task] = deque()
        self.ended: str | None = None  # why the session ended, once it has
        self._wakeup = asyncio.Event()

    async def next_task(self) -> Task | None:
        """Wait for the next task to write to this client; None once ended."""
        while self.ended is None:
            if self.outbox:
                return self.outbox.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()
        return None

    def _push(self, task: Task) -> None:
        self.outbox.append(task)
        self._wakeup.set()

    def _end(self, reason: str) -> None:
        self.ended = reason
        self._wakeup.set()


class Outcome(enum.Enum):
    """What became of a result."""

    ACCEPTED = "accepted"  # the first result for a live task: it is finished
    DUPLICATE = "duplicate"  # the task was already finished by an earlier result
    UNKNOWN = "unknown"  # no task of this server ever had this id
    NOT_GIVEN = "not given"  # a live task that was never sent to this client


# Why a session ended.
LEFT, REPLACED, SHUTDOWN = "left", "replaced", "shutdown"


class Router:
    """The work queue: assigns each task to exactly one connected client and
    takes it back when that client leaves without answering.

    - A task for any client goes to the one with the fewest tasks in flight
      (ties: the one whose load changed longest ago, so equals take turns);
      a task for NAME waits for NAME.
    - No client has more than `max_in_flight` unanswered tasks; the rest wait,
      in order, and tasks taken back from a departed client go to the front.
    - A task is finished by the first result from a client it was sent to.

    Everything lives in memory: delivery is at-least-once while the process
    runs. All methods are synchronous and must be called from one thread
    (the event loop's); `Session.next_task` is the only one that waits.
    """

    def __init__(self, max_in_flight: int = 32) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self.closed = False
        self._run = secrets.token_hex(3)  # keeps ids unique across restarts
        self._issued = 0
        self._tasks: dict[str, Task] = {}  # every unfinished task, by id
        self._queue: deque[Task] = deque()  # tasks for any client, waiting
        self._waiting: dict[str, deque[Task]] = {}  # tasks for one client, waiting
        self._sessions: dict[str, Session] = {}  # connected clients, by name
        # Connected clients by how many tasks they have in flight (only loads
        # some client has); each bucket keeps the order its clients arrived
        # in, so the least loaded client is the first of the lowest bucket,
        # found without a scan of every client.
        self._by_load: dict[int, dict[Session, None]] = {}

    # -- what the servicer calls --

    def submit(self, text: str, target: str | None = None) -> Task:
        """Add a task; it is sent at once if a client has room."""
        if self.closed:
            raise RuntimeError("the router is closed")
        self._issued += 1
        task = Task(id=f"{self._run}-{self._issued}", text=text, target=target)
        self._tasks[task.id] = task
        log.info("task %s queued for %s: %s", task.id, target or "any client", Quoted(text))
        if target is None:
            self._queue.append(task)
            self._spread()
        else:
            self._waiting.setdefault(target, deque()).append(task)
            if target in self._sessions:
                self._fill(self._sessions[target])
        return task

    def connect(self, name: str) -> Session:
        """Register a client; an older session under the same name is ended
        (REPLACED) and its unanswered tasks are taken back."""
        if self.closed:
            raise RuntimeError("the router is closed")
        old = self._sessions.get(name)
        if old is not None:
            self.disconnect(old, REPLACED)
        session = Session(name)
        self._sessions[name] = session
        self._by_load.setdefault(0, {})[session] = None
        self._fill(session)
        return session

    def disconnect(self, session: Session, reason: str = LEFT) -> None:
        """End a session and queue its unanswered tasks again, at the front.
        Safe to call more than once."""
        if session.ended is not None:
            return
        session._end(reason)
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]
            self._unplace(session)
        for task in reversed(list(session.in_flight.values())):
            task.holder = None
            log.info("task %s requeued (%s %s)", task.id, session.name, reason)
            if task.target is None:
                self._queue.appendleft(task)
            else:
                self._waiting.setdefault(task.target, deque()).appendleft(task)
        session.in_flight.clear()
        session.outbox.clear()
        self._spread()

    def complete(self, name: str, task_id: str, text: str) -> Outcome:
        """Record the result `text` that client `name` sent for task `task_id`."""
        task = self._tasks.get(task_id)
        if task is None:
            outcome = Outcome.DUPLICATE if self._was_issued(task_id) else Outcome.UNKNOWN
            log.info("%s result for task %s from %s ignored", outcome.value, Quoted(task_id), name)
            return outcome
        if name not in task.given_to:
            log.warning("result for task %s refused: %s was never given it", task_id, name)
            return Outcome.NOT_GIVEN
        del self._tasks[task_id]
        log.info("task %s result from %s: %s", task_id, name, Quoted(text))
        holder = task.holder
        if holder is not None:
            self._move(holder, len(holder.in_flight) - 1)
            del holder.in_flight[task_id]
            if task in holder.outbox:  # answered by an earlier holder before this one saw it
                holder.outbox.remove(task)
            self._fill(holder)
        else:
            self._waiting_line(task).remove(task)
            self._forget_empty_line(task.target)
        return Outcome.ACCEPTED

    def close(self) -> None:
        """Refuse new work and end every session (SHUTDOWN), taking back their
        unanswered tasks: all unfinished tasks are then in the queue."""
        self.closed = True
        for session in list(self._sessions.values()):
            self.disconnect(session, SHUTDOWN)

    # -- counts, for logs and status answers --

    def queued(self) -> int:
        """How many tasks wait for a client."""
        return len(self._queue) + sum(len(line) for line in self._waiting.values())

    def in_flight(self, name: str | None = None) -> int:
        """How many tasks are sent and unanswered, at `name` or at anyone."""
        if name is not None:
            session = self._sessions.get(name)
            return len(session.in_flight) if session else 0
        return len(self._tasks) - self.queued()

    # -- internals --

    def _unplace(self, session: Session) -> None:
        """Take `session` out of the bucket of its current load."""
        bucket = self._by_load[len(session.in_flight)]
        del bucket[session]
        if not bucket:
            del self._by_load[len(session.in_flight)]

    def _move(self, session: Session, load: int) -> None:
        """Put `session` at the end of the bucket for `load` tasks in flight;
        call it before changing `session.in_flight`, whose size says where it is now."""
        self._unplace(session)
        self._by_load.setdefault(load, {})[session] = None

    def _assign(self, task: Task, session: Session) -> None:
        self._move(session, len(session.in_flight) + 1)
        task.holder = session
        task.given_to.add(session.name)
        session.in_flight[task.id] = task
        session._push(task)

    def _fill(self, session: Session) -> None:
        """Give `session` work up to its limit: its own waiting tasks first."""
        own = self._waiting.get(session.name)
        while len(session.in_flight) < self.max_in_flight:
            if own:
                self._assign(own.popleft(), session)
            elif self._queue:
                self._assign(self._queue.popleft(), session)
            else:
                break
        self._forget_empty_line(session.name)

    def _spread(self) -> None:
        """Hand waiting tasks for any client to the least loaded ones."""
        while self._queue:
            loads = [load for load in self._by_load if load < self.max_in_flight]
            if not loads:
                return  # every client is full
            self._assign(self._queue.popleft(), next(iter(self._by_load[min(loads)])))

    def _waiting_line(self, task: Task) -> deque[Task]:
        return self._queue if task.target is None else self._waiting[task.target]

    def _forget_empty_line(self, name: str | None) -> None:
        if name is not None and not self._waiting.get(name, True):
            del self._waiting[name]

    def _was_issued(self, task_id: str) -> bool:
        run, _, number = task_id.rpartition("-")
        return (
            run == self._run
            and number.isascii()
            and number.isdigit()
            and len(number) <= 20  # int() refuses strings of thousands of digits
            and 0 < int(number) <= self._issued
        )


# --- gRPC ---------------------------------------------------------------------


class ContactServicer(contact_pb2_grpc.ContactServicer):
    """The three rpcs, each a thin translation between gRPC and the Router."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def getTask(
        self, request: contact_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[contact_pb2.ServerMsg]:
        name = await client_name(context)
        if self._router.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        session = self._router.connect(name)
        log.info("client %s connected from %s", name, context.peer())
        try:
            # Echoing the name tells the client its registration was accepted.
            await context.send_initial_metadata(((CLIENT_ID_KEY, name),))
            while (task := await session.next_task()) is not None:
                yield contact_pb2.ServerMsg(task=task.text, id=task.id)
                log.info("task %s sent to %s", task.id, name)
        finally:
            # Reached however the stream ends: client exit or crash, keepalive
            # timeout, takeover or shutdown. Unanswered tasks go back.
            self._router.disconnect(session)
            log.info("client %s disconnected (%s)", name, session.ended)
        if session.ended == REPLACED:
            await context.abort(
                grpc.StatusCode.ABORTED, f"a newer client registered as {name} replaced this one"
            )
        if session.ended == SHUTDOWN:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    async def tellResult(
        self,
        request_iterator: AsyncIterator[contact_pb2.Result],
        context: grpc.aio.ServicerContext,
    ) -> contact_pb2.Empty:
        name = await client_name(context)
        try:
            async for result in request_iterator:
                if self._router.complete(name, result.id, result.ret) is Outcome.NOT_GIVEN:
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"task {result.id} was never given to {name}",
                    )
        except DecodeError as err:
            await refuse_malformed(context, name, err)
        return contact_pb2.Empty()

    async def sendStatus(
        self,
        request_iterator: AsyncIterator[contact_pb2.ClientMsg],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[contact_pb2.Result]:
        name = await client_name(context)
        try:
            async for status in request_iterator:
                log.info("status from %s: %s", name, Quoted(status.msg))
                yield contact_pb2.Result(
                    ret=f"{self._router.in_flight(name)} of your tasks in flight, "
                    f"{self._router.queued()} queued"
                )
        except DecodeError as err:
            await refuse_malformed(context, name, err)


async def client_name(context: grpc.aio.ServicerContext) -> str:
    """The caller's name from the `client-id` metadata; refuse the call
    with INVALID_ARGUMENT when it is missing or malformed, and with
    PERMISSION_DENIED when it is not the name of the caller's certificate."""
    names = [value for key, value in context.invocation_metadata() or () if key == CLIENT_ID_KEY]
    if len(names) != 1:
        await refuse(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"send exactly one '{CLIENT_ID_KEY}' metadata value with the client's name",
        )
    name = names[0]
    if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
        await refuse(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"'{CLIENT_ID_KEY}' must be {CLIENT_NAME_RULE}",
        )
    # Under mutual TLS a client may only use the name its certificate carries.
    certified = context.auth_context().get("x509_common_name")
    if certified is not None and name.encode() not in certified:
        await refuse(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            f"'{CLIENT_ID_KEY}' {name} is not the name in the client certificate",
        )
    return name


async def refuse(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, problem: str
) -> NoReturn:
    """Log why a call is refused, and end it with `code`."""
    log.warning("refused a call from %s: %s", context.peer(), problem)
    await context.abort(code, problem)
    raise AssertionError("context.abort returned")  # it always raises


async def refuse_malformed(context: grpc.aio.ServicerContext, name: str, err: DecodeError) -> None:
    """End a call whose client sent bytes that are not a valid message
    (grpc's default would be UNKNOWN and a traceback in the log)."""
    await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed message from {name}: {err}")


# --- Standard input: one task per line ----------------------------------------


def parse_task(line: str) -> tuple[str | None, str]:
    """Split a typed line into (target, text); raise ValueError if it is no task."""
    line = line.strip()
    target = None
    if line.startswith("@"):
        target, _, line = line[1:].partition(" ")
        line = line.strip()
        if not CLIENT_NAME.fullmatch(target):
            raise ValueError(f"@{target}: a client name is {CLIENT_NAME_RULE}")
        if not line:
            raise ValueError(f"@{target} has no task text; write @NAME TEXT")
    if len(line.encode()) > MAX_TEXT_BYTES:
        raise ValueError(f"a task is at most {MAX_TEXT_BYTES} bytes")
    return target, line


def split_lines(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """Cut a byte stream into lines. A line longer than `limit` is yielded
    only once, cut short but still over the limit, so that the caller refuses
    it while memory stays bounded."""
    pending = b""
    skipping = False  # inside a line that was already yielded as too long
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not skipping:
                yield line
            skipping = False
        if len(pending) > limit:
            if not skipping:
                yield pending
            pending, skipping = b"", True
    if pending and not skipping:
        yield pending


def read_stdin(loop: asyncio.AbstractEventLoop, on_line: Callable[[str], None]) -> None:
    """Read standard input in a daemon thread and hand each line to the loop.

    It reads file descriptor 0 with os.read, not sys.stdin: a daemon thread
    blocked inside sys.stdin's buffered reader makes Python abort at exit.
    """

    def chunks() -> Iterator[bytes]:
        while chunk := os.read(0, 65536):
            yield chunk

    def run() -> None:
        try:
            for line in split_lines(chunks(), MAX_TEXT_BYTES + 100):
                loop.call_soon_threadsafe(on_line, line.decode("utf-8", "replace"))
            loop.call_soon_threadsafe(log.info, "end of standard input; still serving")
        except (OSError, RuntimeError):
            pass  # stdin is closed or unreadable, or the loop has stopped: no more tasks

    threading.Thread(target=run, name="stdin", daemon=True).start()


# --- Running the server -------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext. With
    `client_ca`, clients must present a certificate signed by it (mutual TLS)."""
    if cert is None or key is None:
        return None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


async def serve(
    host: str,
    port: int,
    max_in_flight: int,
    grace: float,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Serve until SIGINT or SIGTERM, then shut down gracefully; return the exit code."""
    stop = signal_event(signal.SIGINT, signal.SIGTERM)
    router = Router(max_in_flight)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    contact_pb2_grpc.add_ContactServicer_to_server(ContactServicer(router), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        log.error("cannot listen on %s: %s", address, err)
        return 1
    await server.start()
    if credentials is None and not is_loopback(host):
        log.warning(
            "!!! listening on %s WITHOUT TLS: anyone who can reach this port can read every "
            "task and register under any name. Use --tls-cert and --tls-key. !!!",
            host,
        )
    log.info(
        "listening on %s:%d%s; type a task per line (TEXT or @NAME TEXT)",
        host,
        bound,
        "" if credentials is None else " with TLS",
    )

    def on_line(line: str) -> None:
        try:
            target, text = parse_task(line)
        except ValueError as err:
            log.warning("ignored input line: %s", err)
            return
        if not text:
            return
        if router.closed:
            log.warning("ignored input line: the server is shutting down")
            return
        router.submit(text, target)

    read_stdin(asyncio.get_running_loop(), on_line)
    await stop.wait()

    log.info(
        "shutting down: tasks queued: %d, in flight: %d; open calls get %.0f s to finish",
        router.queued(),
        router.in_flight(),
        grace,
    )
    router.close()
    await server.stop(grace)
    log.info("stopped; tasks never answered: %d", router.queued())
    return 0


def signal_event(*signals: signal.Signals) -> asyncio.Event:
    """An event set when one of `signals` arrives, instead of the default of
    dying with a traceback (SIGINT) or without cleanup (SIGTERM)."""
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, arrived.set)
    return arrived


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50051, help="port (0: any free port)")
    parser.add_argument(
        "--max-in-flight", type=int, default=32, help="most unanswered tasks per client"
    )
    parser.add_argument(
        "--grace", type=float, default=3.0, help="seconds open calls get at shutdown"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument("--tls-cert", type=Path, help="the server's certificate (PEM): use TLS")
    parser.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    parser.add_argument(
        "--client-ca", type=Path, help="accept only clients with a certificate from this CA"
    )
    args = parser.parse_args()
    if args.max_in_flight < 1:
        parser.error("--max-in-flight must be at least 1")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        parser.error("--client-ca needs --tls-cert and --tls-key")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        credentials = server_credentials(args.tls_cert, args.tls_key, args.client_ca)
    except OSError as err:
        parser.error(f"cannot read a TLS file: {err}")
    return asyncio.run(serve(args.host, args.port, args.max_in_flight, args.grace, credentials))


if __name__ == "__main__":
    raise SystemExit(main())
