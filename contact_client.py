"""The contact client: dials in to the server, receives the tasks it pushes,
answers each with a handler, and reports back.

    python contact_client.py [--server localhost:50051] [--name NAME] [--concurrency N]
                             [--ca FILE [--cert FILE --key FILE]]

One connection carries the article's three calls: getTask (registration;
the server pushes tasks down it), tellResult (answers go up it, each naming
its task) and sendStatus (a status line every few seconds, each answered).
When the server is away, the client retries with capped, jittered backoff
until it is back. Ctrl-C (or SIGTERM) stops it at once.

Use it from your own code without editing this file:

    asyncio.run(run(my_handler, server="localhost:50051", name="worker-1"))
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections import deque
from collections.abc import Callable

import grpc

from contact import (
    ACCEPTS_CANCEL_KEY,
    CLIENT_ID_KEY,
    MAX_IN_FLIGHT_KEY,
    REPORTS_START_KEY,
    WITHDRAWN,
    cli,
    contact_pb2,
    contact_pb2_grpc,
    default_client_name,
)
from contact.handler import Handler, handler_pool
from contact.logtext import Quoted, counted
from contact.options import client_channel
from contact.retry import FINAL_CODES, backoff
from contact.signals import on_stop_signal
from contact.streams import (
    StreamEndedError,
    answered_within,
    ended,
    failure_of,
    first_to_finish,
    hang_up,
)
from contact.tasks import retrieved

log = logging.getLogger("contact.client")

# Defaults of the command line and of run().
SERVER = "localhost:50051"
CONCURRENCY = 1  # tasks worked on at once, each in a thread of its own
PREFETCH = 3  # tasks held ready beyond those: hides the round trip for fast tasks
STATUS_EVERY = 5.0  # seconds between status lines
MAX_BACKOFF = 10.0  # the longest wait between retries, seconds
# A live server answers registration and status lines within milliseconds;
# one that has not answered in this long is stuck (while gRPC core may still
# answer its pings): treat it as unavailable, and retry.
ANSWER_WITHIN_SECONDS = 5.0
# When a call fails, how long to wait for getTask's own status (which says
# why: shutdown, takeover) before reporting the failure as it came.
REGISTRATION_STATUS_SECONDS = 0.25


def handle_task(task: contact_pb2.ServerMsg) -> str:
    """The work for one task: return the answer, or raise to fail the task.
    Pass your own to `run`: a plain function runs in a worker thread, so it
    may block or take long; an `async def` runs on the event loop."""
    return task.task.upper()


class RefusedError(Exception):
    """The server refused this client for good (a bad name, a takeover, ...)."""


class Work:
    """The client's work, across reconnections: the handlers, the tasks they
    are on, and answers not yet sent."""

    def __init__(
        self, handler: Handler, concurrency: int, window: int, max_tasks: int | None
    ) -> None:
        self.handlers = handler_pool(handler, concurrency, self._finished, self._started)
        self.window = window  # the most tasks we ask the server for at once
        self.running: set[str] = set()  # ids of the tasks being worked on, or waiting to be
        self.held: set[str] = set()  # ids this registration gave us, not yet answered
        # The server leases each task from when we begin it (it echoed
        # reports-start): the ids begun, to tell it with the next message.
        self.reports_start = False
        self.begun: list[str] = []
        self.unsent: deque[contact_pb2.Result] = deque()
        self.answer_ready = asyncio.Event()
        self.answered = 0  # answers and failures sent
        self.max_tasks = max_tasks  # return once this many are answered; None: never

    def done(self) -> bool:
        """Whether the task limit is reached: every answer it asks for is written."""
        return self.max_tasks is not None and self.answered >= self.max_tasks

    def connection_ended(self) -> None:
        """The tasks the connection gave us that have not started are the
        server's again (it sends them to someone, maybe us, anew), and the
        next registration's window starts empty."""
        for task_id in self.handlers.drop_waiting():
            self.running.discard(task_id)
        self.held.clear()
        self.reports_start, self.begun = False, []

    def start(self, message: contact_pb2.ServerMsg) -> None:
        """Work on a task unless it is already running (the server sent it
        again after a reconnect), or stop one the server withdrew."""
        if message.cancelled:
            self.withdraw(message.id)
        elif message.id in self.held:  # sent again while running, after it was withdrawn
            self._started(message)  # (its new lease runs from now)
        else:
            if len(self.held) >= self.window:  # memory is ours to protect
                raise StreamEndedError(f"the server sent more than the {self.window} tasks asked")
            self.held.add(message.id)
            if message.id not in self.running:
                self.running.add(message.id)
                self.handlers.submit(message)
            else:  # still running from the last connection: it began long ago
                self._started(message)

    def withdraw(self, task_id: str) -> None:
        """The server no longer wants an answer to `task_id`: stop it if we
        can. Either way a Result for it goes back, which the server ignores
        but for freeing the task's place in our window."""
        if task_id not in self.running:
            return  # answered already
        how = self.handlers.withdraw(task_id)
        if how is None:
            how = "it runs to the end (a thread cannot be stopped); the server ignores its answer"
        else:
            self.running.discard(task_id)
            self.held.discard(task_id)
            self._send(contact_pb2.Result(id=task_id, error=WITHDRAWN))
        log.info("task %s withdrawn by the server: %s", task_id, how)

    def _started(self, task: contact_pb2.ServerMsg) -> None:
        if self.reports_start and task.id in self.held:
            self.begun.append(task.id)
            self.answer_ready.set()

    def _finished(self, task: contact_pb2.ServerMsg, result: contact_pb2.Result) -> None:
        self.running.discard(task.id)
        self.held.discard(task.id)
        if result.error:
            log.warning("task %s: %s failed: %s", task.id, Quoted(task.task), Quoted(result.error))
        else:
            log.info("task %s: %s -> %s", task.id, Quoted(task.task), Quoted(result.ret))
        self._send(result)

    def next_message(self) -> contact_pb2.Result:
        """The first unsent answer, carrying the ids begun since the last
        message (alone, if no answer is ready): one message for an answer
        and the start of the next task."""
        if not self.unsent:
            self.unsent.append(contact_pb2.Result())
        self.unsent[0].started.extend(self.begun)
        self.begun.clear()
        return self.unsent[0]

    def written(self, writing: asyncio.Future[None]) -> None:
        """The first unsent message's write has ended: forget it if it went
        out (a lost connection keeps it, to send on the next)."""
        if not writing.cancelled() and writing.exception() is None:
            sent = self.unsent.popleft()
            self.answered += bool(sent.id) and sent.error != WITHDRAWN  # answers only

    def _send(self, result: contact_pb2.Result) -> None:
        self.unsent.append(result)
        self.answer_ready.set()


# --- One connection: the three calls ---------------------------------------------


async def one_connection(
    channel: grpc.aio.Channel,
    name: str,
    window: int,
    work: Work,
    status_every: float,
    registered: Callable[[], None],
) -> None:
    """Serve the server over `channel` until it fails (raise why), or until
    `work` reaches its task limit (return)."""
    stub = contact_pb2_grpc.ContactStub(channel)
    metadata = ((CLIENT_ID_KEY, name),)
    # getTask: register, and ask for up to `window` tasks at a time.
    tasks = stub.getTask(
        contact_pb2.Empty(),
        metadata=(
            *metadata,
            (MAX_IN_FLIGHT_KEY, str(window)),
            (ACCEPTS_CANCEL_KEY, "1"),
            (REPORTS_START_KEY, "1"),
        ),
    )
    try:
        echoed = await confirm_registration(tasks, name)
        work.reports_start = echoed.get(REPORTS_START_KEY) == "1"  # (older servers do not)
        registered()
        results = stub.tellResult(metadata=metadata)  # tellResult: one stream of answers
        status = stub.sendStatus(metadata=metadata)  # sendStatus: status lines, each answered
        try:
            await first_to_finish(
                receive_tasks(tasks, work),
                send_answers(results, work),
                watch_results(results, work),
                report_status(status, work, status_every),
            )
            # The task limit is reached and every answer written.
            await results.done_writing()
            # Returns once the server has read every answer; one that never
            # says so is not waited for long.
            await answered_within(results, ANSWER_WITHIN_SECONDS, "the last answers")
        except (grpc.aio.AioRpcError, StreamEndedError) as err:
            reason = None if work.done() else await registration_failure(tasks)
            if not work.done():  # (the last answer's write may have ended meanwhile)
                raise (reason or err) from None
            log.warning("the server did not confirm the last answers (%s)", err)
        finally:
            await hang_up(results, status)
    finally:
        tasks.cancel()
        work.connection_ended()


async def confirm_registration(tasks: grpc.aio.UnaryStreamCall, name: str) -> grpc.aio.Metadata:
    """Wait until the server accepts our getTask call, which it shows by
    echoing our name in the initial metadata (returned); raise its refusal
    otherwise."""
    echoed = await answered_within(tasks.initial_metadata(), ANSWER_WITHIN_SECONDS, "getTask")
    if echoed is None or echoed.get(CLIENT_ID_KEY) != name:
        # A refusal ends the call at once (read raises it as AioRpcError);
        # anything else is no registration, and is not waited for long.
        await answered_within(tasks.read(), ANSWER_WITHIN_SECONDS, "getTask")
        raise StreamEndedError("the server sent no registration")
    return echoed


async def registration_failure(tasks: grpc.aio.UnaryStreamCall) -> Exception | None:
    """When one call fails, the others often fail with it (a shutdown, a
    takeover), each with its own status; getTask's says why. Its error, if
    it ended with one, given a moment to arrive."""
    try:
        code = await asyncio.wait_for(asyncio.shield(tasks.code()), REGISTRATION_STATUS_SECONDS)
    except asyncio.TimeoutError:
        return None
    return None if code == grpc.StatusCode.OK else await failure_of(tasks, "task")


async def receive_tasks(tasks: grpc.aio.UnaryStreamCall, work: Work) -> None:
    """Start work on every task the server pushes, as soon as it arrives."""
    # Each read is shielded: if another call fails first, cancelling this
    # reader must not cancel getTask, whose own status says why (see above).
    while True:
        read = asyncio.ensure_future(tasks.read())
        read.add_done_callback(retrieved)  # if abandoned, its error is already known
        if (task := await asyncio.shield(read)) is grpc.aio.EOF:
            break
        work.start(task)
    await ended(tasks, "task")


async def send_answers(results: grpc.aio.StreamUnaryCall, work: Work) -> None:
    """Send each answer (and the tasks begun) as it is ready; return once
    the task limit is reached."""
    while not work.done():
        while not (work.unsent or work.begun):
            work.answer_ready.clear()
            await work.answer_ready.wait()
        # Shielded, its bookkeeping in a callback: a write that completes as
        # another call's failure cancels this coroutine still counts.
        writing = asyncio.ensure_future(results.write(work.next_message()))
        writing.add_done_callback(work.written)
        try:
            await asyncio.shield(writing)
        except asyncio.InvalidStateError:  # the server has ended the stream
            await ended(results, "result")


async def watch_results(results: grpc.aio.StreamUnaryCall, work: Work) -> None:
    """Notice at once when the server ends tellResult: a write racing that
    end can wait for ever (seen with grpcio 1.85), so do not rely on it."""
    await results.code()
    if not work.done():
        await ended(results, "result")


async def report_status(status: grpc.aio.StreamStreamCall, work: Work, every: float) -> None:
    """Send a status line every `every` seconds and log each answer."""
    while True:
        line = contact_pb2.ClientMsg(msg=f"alive, {counted(work.answered, 'task')} answered")
        try:
            await status.write(line)
        except asyncio.InvalidStateError:  # the server has ended the stream
            await ended(status, "status")
        ack = await answered_within(status.read(), ANSWER_WITHIN_SECONDS, "a status line")
        if ack is grpc.aio.EOF:
            await ended(status, "status")
        log.debug("server acknowledged status: %s", ack.ret)
        await asyncio.sleep(every)


# --- The loop your code calls ------------------------------------------------------


async def run(
    handler: Handler = handle_task,
    server: str = SERVER,
    name: str | None = None,
    *,
    concurrency: int = CONCURRENCY,
    prefetch: int = PREFETCH,
    credentials: grpc.ChannelCredentials | None = None,
    max_tasks: int | None = None,
    status_every: float = STATUS_EVERY,
    max_backoff: float = MAX_BACKOFF,
) -> None:
    """Answer the tasks of `server` with `handler`, reconnecting whenever the
    connection is lost, until `max_tasks` are answered (or forever). Raise
    RefusedError if the server refuses this client for good.

    `handler(task)` gets the whole ServerMsg (`task.attempt` says which
    delivery this is) and returns the answer; a plain function runs in one of
    `concurrency` threads, an `async def` on the loop. If it raises, the task
    fails: its submitter gets TaskError with the message. Each run() has a
    connection of its own, so many can run in one process."""
    name = name or default_client_name()
    window = concurrency + prefetch
    work = Work(handler, concurrency, window, max_tasks)
    delays, outage = backoff(max_backoff), False  # an outage is said once, not per retry

    def registered() -> None:
        nonlocal delays, outage
        log.info("registered with %s as %s", server, name)
        log.debug("%d asyncio tasks alive", len(asyncio.all_tasks()))
        delays, outage = backoff(max_backoff), False

    try:
        while True:
            try:
                async with client_channel(server, credentials) as channel:
                    await one_connection(channel, name, window, work, status_every, registered)
                log.info("answered %s; exiting", counted(work.answered, "task"))
                return
            except grpc.aio.AioRpcError as err:
                if err.code() in FINAL_CODES:
                    raise RefusedError(f"{err.code().name}: {err.details()}") from None
                problem = f"{err.code().name}: {err.details()}"
            except StreamEndedError as err:
                problem = str(err)
            if not outage:
                log.warning(
                    "server %s unavailable (%s); retrying until it is back", server, problem
                )
                outage = True
            await asyncio.sleep(next(delays))
    finally:
        work.handlers.close()  # tasks not started yet are dropped: nobody takes their answers


async def run_until_signal(
    args: argparse.Namespace, credentials: grpc.ChannelCredentials | None
) -> int:
    """The command line: run the client; SIGINT or SIGTERM cancels it wherever it is."""
    main_task = asyncio.current_task()
    assert main_task is not None
    on_stop_signal(main_task.cancel)
    try:
        await run(
            handle_task,
            args.server,
            args.name,
            concurrency=args.concurrency,
            credentials=credentials,
            max_tasks=args.max_tasks,
            status_every=args.status_every,
            max_backoff=args.max_backoff,
        )
        return 0
    except RefusedError as err:
        log.error("the server refused this client: %s", err)
        return 1
    except asyncio.CancelledError:
        log.info("stopped")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    option = parser.add_argument
    option("--server", default=SERVER, help="the server's host:port")
    option("--name", type=cli.client_name, help="the name to register as (default: HOST-PID)")
    option(
        "--concurrency",
        type=cli.positive_int,
        default=CONCURRENCY,
        metavar="N",
        help="tasks worked on at once",
    )
    option("--max-tasks", type=cli.positive_int, metavar="N", help="exit after this many answers")
    option(
        "--status-every",
        type=cli.positive_float,
        default=STATUS_EVERY,
        metavar="SECONDS",
        help="send a status line this often",
    )
    option(
        "--max-backoff",
        type=cli.positive_float,
        default=MAX_BACKOFF,
        metavar="SECONDS",
        help="the longest wait between retries while the server is away",
    )
    cli.add_common_arguments(parser, server=False)
    args = parser.parse_args()
    credentials = cli.client_tls(parser, args)
    cli.start_logging(args)
    return asyncio.run(run_until_signal(args, credentials))


if __name__ == "__main__":
    raise SystemExit(main())
