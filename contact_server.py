"""The contact server: pushes tasks to the clients that dialled in, and hears
their answers back.

    python contact_server.py [--host 127.0.0.1] [--port 50051] [--journal FILE]
    python contact_server.py --queue postgresql://USER@HOST:PORT/DB   (one of a fleet)

Type one task per line: `TEXT` goes to any connected client, `@NAME TEXT`
only to the client registered as NAME. Ctrl-C (or SIGTERM) stops it.
`--help` lists the limits, timeouts and TLS options.

Read it top-down: `ContactServicer` is the article's three rpcs, each a thin
translation to the gRPC-free `Dispatcher` (contact/queue/dispatcher.py: which
client gets which task of the queue); `ContactServer` is the server you can
use from your own code (contact/server/core.py: submit a task, get a handle
to await its answer); `main` is the command line, feeding it typed lines.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator
from logging import DEBUG, INFO
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from contact import (
    ACCEPTS_CANCEL_KEY,
    REPORTS_START_KEY,
    cli,
    contact_pb2,
    contact_pb2_grpc,
    one_line_error,
    text_problem,
)
from contact.logtext import REPEATS, Quoted
from contact.queue.base import (
    NewTask,
    Outcome,
    QueueError,
    QueueFullError,
    Task,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    TaskNotAnsweredError,
)
from contact.queue.dispatcher import Dispatcher
from contact.server import checks
from contact.server.core import PORT, Server
from contact.server.handles import Answer, TaskHandle, ThreadsafeHandle
from contact.server.typed import read_tasks

__all__ = [  # what code that uses the server imports from here
    "Answer",
    "ContactServer",
    "NewTask",
    "QueueFullError",
    "TaskCancelledError",
    "TaskError",
    "TaskFailedError",
    "TaskHandle",
    "TaskNotAnsweredError",
    "ThreadsafeHandle",
]

log = logging.getLogger("contact.server")


class ContactServicer(contact_pb2_grpc.ContactServicer):
    """The three rpcs, each a thin translation between gRPC and the Dispatcher."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self.calls: set[asyncio.Task[Any]] = set()  # open tellResult and sendStatus calls

    async def getTask(
        self, request: contact_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[contact_pb2.ServerMsg]:
        """Registration: keep the stream open and push each task down it."""
        name = await checks.client_name(context)
        window = await checks.requested_window(context)
        if self._dispatcher.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        # (in a fleet: recorded in its database, ending NAME's session elsewhere)
        registration = await checks.register(self._dispatcher, name, context)
        peer = context.peer()
        session = self._dispatcher.connect(
            name,
            window,
            accepts_cancel=checks.says_yes(context, ACCEPTS_CANCEL_KEY),
            reports_start=checks.says_yes(context, REPORTS_START_KEY),
            peer=peer,
        )
        host = checks.peer_host(peer)  # lines are limited by host: a reconnect storm is brief
        REPEATS.log(log, INFO, "connect", host, "client %s connected from %s", name, peer)
        try:
            await context.send_initial_metadata(checks.accepted(session, context))
            while (task := await session.next_task()) is not None:
                if task.cancelled:
                    log.info("task %s withdrawn from %s", task.id, name)
                else:
                    log.info("task %s sent to %s: %s", task.id, name, Quoted(task.text))
                yield message_for(task)
        finally:
            # Reached however the stream ends: client exit or crash, keepalive
            # timeout, takeover or shutdown. Unanswered tasks go back.
            self._dispatcher.disconnect(session)
            self._dispatcher.queue.unregister(name, registration)
            line = "client %s disconnected (%s)"
            REPEATS.log(log, INFO, "disconnect", host, line, name, session.ended)
        if session.ended in checks.ENDINGS:  # replaced (ABORTED), or shut down (UNAVAILABLE)
            code, details = checks.ENDINGS[session.ended]
            await context.abort(code, details.format(name=name))

    async def tellResult(
        self,
        request_iterator: AsyncIterator[contact_pb2.Result],
        context: grpc.aio.ServicerContext,
    ) -> contact_pb2.Empty:
        """The client's answers, one per task (several to a message from a
        client that batches them), each naming its task by id, and the tasks
        it has begun (if it reports that)."""
        name = await checks.client_name(context)
        session = await checks.registration(self._dispatcher, name, context)
        try:
            async with checks.owned_by(session, context, self.calls):  # ends with its registration
                async for message in request_iterator:
                    for result in await checks.answers_in(message, name, context):
                        if result.started:
                            self._dispatcher.started(session, result.started)
                            if not result.id:  # only that
                                continue
                        if problem := text_problem(result.ret):
                            await checks.refuse(
                                context,
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"the answer to task {Quoted(result.id)} from {name}: {problem}",
                            )
                        error = one_line_error(result.error)
                        outcome = self._dispatcher.complete(name, result.id, result.ret, error)
                        if outcome is Outcome.NOT_GIVEN:
                            await context.abort(
                                grpc.StatusCode.PERMISSION_DENIED,
                                f"task {result.id} was never given to {name}",
                            )
        except DecodeError as err:
            await checks.refuse_malformed(context, name, err)
        return contact_pb2.Empty()

    async def sendStatus(
        self,
        request_iterator: AsyncIterator[contact_pb2.ClientMsg],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[contact_pb2.Result]:
        """The client's own messages; each one is answered."""
        name = await checks.client_name(context)
        session = await checks.registration(self._dispatcher, name, context)
        try:
            async with checks.owned_by(session, context, self.calls):  # ends with its registration
                async for status in request_iterator:
                    session.heard()
                    if log.isEnabledFor(DEBUG):  # not at INFO: idle clients would fill the terminal
                        line = Quoted(status.msg)
                        REPEATS.log(log, DEBUG, "status", name, "status from %s: %s", name, line)
                    yield contact_pb2.Result(
                        ret=f"{len(session.in_flight)} of your tasks in flight, "
                        f"{self._dispatcher.queued()} queued"
                    )
        except DecodeError as err:
            await checks.refuse_malformed(context, name, err)


def message_for(task: Task) -> contact_pb2.ServerMsg:
    """What getTask writes for `task`: the task, or the notice that it was withdrawn."""
    if task.cancelled:
        return contact_pb2.ServerMsg(id=task.id, cancelled=True)
    return contact_pb2.ServerMsg(task=task.text, id=task.id, attempt=task.attempts, **task.fields)


class ContactServer(Server):
    """The server to use from your own code, with these rpcs: `async with
    ContactServer(port=0) as server`, then `await server.ask("hello")`
    (contact/server/core.py has the rest)."""

    servicer = ContactServicer


# --- The command line: tasks typed on standard input ---------------------------


async def serve(args: argparse.Namespace, credentials: grpc.ServerCredentials | None) -> int:
    """Serve until SIGINT or SIGTERM, feeding typed lines in as tasks."""
    tuning = cli.server_tuning(args)
    server = ContactServer(args.host, args.port, credentials=credentials, **tuning)
    try:
        async with server:
            gc.freeze()  # what start-up made: the collector's passes skip it from now on
            log.info("type a task per line (TEXT or @NAME TEXT)")
            read_tasks(asyncio.get_running_loop(), functools.partial(queue_lines, server))
            await server.serve_until_stopped()
    except (OSError, QueueError) as err:
        log.error("%s", err)
        return 1
    return 0


async def queue_lines(server: ContactServer, tasks: list[NewTask]) -> None:
    """Submit the tasks of typed lines, together; their answers are logged as they come."""
    try:
        await server.submit_many(tasks)  # with a full queue, waits: reading stops meanwhile
    except ValueError as err:
        log.warning("ignored input lines: %s", err)
    except QueueError as err:  # every line, once the journal or database is lost: said briefly
        for _ in tasks:
            REPEATS.log(log, logging.ERROR, "not queued", "stdin", "task not queued: %s", err)
    except RuntimeError as err:  # lines read as it stops: said briefly, however many
        for _ in tasks:
            REPEATS.log(log, logging.WARNING, "ignored", "stdin", "ignored input line: %s", err)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=PORT, help="port (0: any free port)")
    parser.add_argument(
        "--journal", metavar="FILE", help="keep unfinished tasks in this SQLite file"
    )
    parser.add_argument(
        "--queue", metavar="URL", help="keep tasks in this PostgreSQL database, with a fleet"
    )
    cli.add_server_tuning(parser)
    cli.add_common_arguments(parser, server=True)
    args = parser.parse_args()
    if args.journal and args.queue:
        parser.error("--journal or --queue, not both")
    credentials = cli.server_tls(parser, args)
    cli.start_logging(args)
    return asyncio.run(serve(args, credentials))


if __name__ == "__main__":
    raise SystemExit(main())
