"""The contact server: pushes tasks to the clients that dialled in, and hears
their answers back.

    python contact_server.py [--host 127.0.0.1] [--port 50051] [--journal FILE]
                             [--tls-cert FILE --tls-key FILE [--client-ca FILE]]

Type one task per line: `TEXT` goes to any connected client, `@NAME TEXT`
only to the client registered as NAME. Ctrl-C (or SIGTERM) stops it.

Read it top-down: `ContactServicer` is the article's three rpcs, each a thin
translation to the gRPC-free `Router` (contact/router.py); `ContactServer`
is the server you can use from your own code (submit a task, await its
answer); `main` is the command line, feeding it typed lines.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
from collections.abc import AsyncIterator
from logging import INFO
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from contact import CLIENT_ID_KEY, cli, contact_pb2, contact_pb2_grpc
from contact.journal import SYNC, SYNC_MODES, Journal, JournalError
from contact.logtext import REPEATS, Quoted
from contact.metadata import client_name, refuse_malformed, requested_window
from contact.options import SERVER_OPTIONS
from contact.router import (
    MAX_ATTEMPTS,
    REPLACED,
    SHUTDOWN,
    TASK_TIMEOUT_SECONDS,
    Outcome,
    Router,
    Task,
)
from contact.sessions import end_calls, owned_by, registration
from contact.signals import stop_event
from contact.stdin import read_tasks
from contact.tls import listen, warn_if_exposed

log = logging.getLogger("contact.server")

# Defaults of the command line and of ContactServer.
PORT = 50051
MAX_IN_FLIGHT = 32  # unanswered tasks per client: enough to hide a round trip
GRACE_SECONDS = 3.0  # open calls get this long to finish at shutdown
HOUSEKEEPING_SECONDS = 0.5  # how often leases are checked (how late one may run out)


class ContactServicer(contact_pb2_grpc.ContactServicer):
    """The three rpcs, each a thin translation between gRPC and the Router."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self.calls: set[asyncio.Task[Any]] = set()  # open tellResult and sendStatus calls

    async def getTask(
        self, request: contact_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[contact_pb2.ServerMsg]:
        """Registration: keep the stream open and push each task down it."""
        name = await client_name(context)
        window = await requested_window(context)
        if self._router.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        session = self._router.connect(name, window)
        log.info("client %s connected from %s", name, context.peer())
        try:
            # Echoing the name tells the client its registration was accepted.
            await context.send_initial_metadata(((CLIENT_ID_KEY, name),))
            while (task := await session.next_task()) is not None:
                yield contact_pb2.ServerMsg(task=task.text, id=task.id, **task.fields)
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
        """The client's answers, one per task, each naming its task by id."""
        name = await client_name(context)
        session = await registration(self._router, name, context)
        try:
            async with owned_by(session, context, self.calls):  # ends with its registration
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
        """The client's own messages; each one is answered."""
        name = await client_name(context)
        session = await registration(self._router, name, context)
        try:
            async with owned_by(session, context, self.calls):  # ends with its registration
                async for status in request_iterator:
                    REPEATS.log(
                        log, INFO, "status", name, "status from %s: %s", name, Quoted(status.msg)
                    )
                    yield contact_pb2.Result(
                        ret=f"{len(session.in_flight)} of your tasks in flight, "
                        f"{self._router.queued()} queued"
                    )
        except DecodeError as err:
            await refuse_malformed(context, name, err)


class TaskNotAnsweredError(Exception):
    """The task will never be answered; the message says why."""


class TaskFailedError(TaskNotAnsweredError):
    """The task was sent too many times without an answer (it may be what
    kills the clients that take it)."""


class ContactServer:
    """The server as an async context manager: started on entry, shut down
    gracefully on exit (as Ctrl-C does on the command line).

        async with ContactServer(port=0) as server:
            answer = await server.ask("hello")

    With `journal` (a file name), every unfinished task is kept in that file
    (contact/journal.py): a server started again on it, after a crash or a
    clean stop, queues them again. Entering raises JournalError if the file
    cannot be used.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = PORT,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        task_timeout: float | None = TASK_TIMEOUT_SECONDS,
        max_attempts: int | None = MAX_ATTEMPTS,
        grace: float = GRACE_SECONDS,
        credentials: grpc.ServerCredentials | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_sync: str = SYNC,
    ) -> None:
        self.host, self.port, self.grace = host, port, grace
        self._credentials = credentials
        self._journal_file, self._journal_sync = journal, journal_sync
        self._journal: Journal | None = None  # open while the server runs
        self._router = Router(
            max_in_flight,
            self._answered,
            task_timeout=task_timeout,
            max_attempts=max_attempts,
            on_failed=self._failed,
            on_requeued=self._requeued,
        )
        self._answers: dict[str, asyncio.Future[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it runs on, once started

    @property
    def closed(self) -> bool:
        """Whether the server has begun shutting down (it takes no more tasks)."""
        return self._router.closed

    async def submit(
        self, text: str, target: str | None = None, **fields: Any
    ) -> asyncio.Future[str]:
        """Queue a task (for `target` only, if given; `fields` fill more
        ServerMsg fields) and return a future of the first accepted answer's
        text, which raises TaskNotAnsweredError if the server closes first.

        It returns once the task is queued: with a journal, once it is
        committed there, so that no crash from then on loses it (it raises
        JournalError if that failed). Tasks submitted together share one
        commit, so submit many at once with asyncio.gather."""
        if {"task", "id"} & fields.keys():
            raise ValueError("the fields task and id are the server's to fill")
        contact_pb2.ServerMsg(**fields)  # a field the proto lacks: fail here, not at sending
        task = self._router.new_task(text, target, **fields)
        if self._journal is not None:
            await self._journal.added(task)
        answer = asyncio.get_running_loop().create_future()
        if self._router.closed:  # it closed while the task was being written
            answer.set_exception(self._not_answered(task))
        else:
            self._answers[task.id] = answer
            self._router.queue(task)
        return answer

    async def ask(self, text: str, target: str | None = None, **fields: Any) -> str:
        """`submit` a task and wait for its answer."""
        return await (await self.submit(text, target, **fields))

    def submit_threadsafe(
        self, text: str, target: str | None = None, **fields: Any
    ) -> concurrent.futures.Future[str]:
        """`submit`, from any thread other than the server's event loop's."""
        if self._loop is None:
            raise RuntimeError("the server is not running")
        return asyncio.run_coroutine_threadsafe(self.ask(text, target, **fields), self._loop)

    def _answered(self, task: Task, name: str, text: str) -> None:
        log.info("task %s result from %s: %s", task.id, name, Quoted(text))
        self._settle(task, text)
        if self._journal is not None:  # only now: a crash before this repeats the task
            self._journal.answered(task)

    def _failed(self, task: Task, reason: str) -> None:
        self._settle(task, TaskFailedError(f"task {task.id} failed: {reason}"))
        if self._journal is not None:
            self._journal.failed(task, reason)

    def _requeued(self, task: Task) -> None:
        if self._journal is not None:
            self._journal.requeued(task)  # its attempts count survives a restart

    def _not_answered(self, task: Task) -> TaskNotAnsweredError:
        kept = "" if self._journal is None else " (it stays in the journal for the next start)"
        return TaskNotAnsweredError(f"the server closed before task {task.id} was answered{kept}")

    def _settle(self, task: Task, outcome: str | Exception) -> None:
        """Hand the submitter of `task` its answer, or why there is none."""
        answer = self._answers.pop(task.id, None)
        if answer is None or answer.done():  # recovered from a journal, or nobody waits
            return
        if isinstance(outcome, Exception):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            self._router.expire_leases()
            REPEATS.flush(log)

    async def __aenter__(self) -> ContactServer:
        if self._journal_file is not None:  # its unfinished tasks go first, before any client
            journal = self._journal = Journal(self._journal_file, self._journal_sync)
            self._router.resume(journal.run, journal.earlier_runs, journal.recovered)
        self._server = grpc.aio.server(options=SERVER_OPTIONS)  # needs a running loop
        self._servicer = ContactServicer(self._router)
        contact_pb2_grpc.add_ContactServicer_to_server(self._servicer, self._server)
        try:
            self.port = listen(self._server, self.host, self.port, self._credentials)
        except OSError:
            await self._close_journal()
            raise
        await self._server.start()
        self._loop = asyncio.get_running_loop()
        self._housekeeper = asyncio.create_task(self._housekeeping())
        warn_if_exposed(self.host, self._credentials)
        tls = "" if self._credentials is None else " with TLS"
        log.info("listening on %s:%d%s", self.host, self.port, tls)
        return self

    async def _close_journal(self) -> None:
        if self._journal is not None:
            await self._journal.close()  # commits what is pending: answers that just came
            self._journal = None

    async def __aexit__(self, *exc_info: object) -> None:
        log.info(
            "shutting down: tasks queued: %d, in flight: %d; open calls get %.0f s to finish",
            self._router.queued(),
            self._router.in_flight(),
            self.grace,
        )
        self._housekeeper.cancel()
        self._router.close()  # every getTask call ends: UNAVAILABLE
        await end_calls(self._servicer.calls, self.grace)  # answers on their way still land
        await self._server.stop(self.grace)
        unanswered = self._router.unfinished()
        for task in unanswered:
            self._settle(task, self._not_answered(task))
        kept = " (kept in the journal for the next start)" if self._journal and unanswered else ""
        await self._close_journal()
        log.info("stopped; tasks never answered: %d%s", len(unanswered), kept)


# --- The command line: tasks typed on standard input ---------------------------


async def serve(args: argparse.Namespace, credentials: grpc.ServerCredentials | None) -> int:
    """Serve until SIGINT or SIGTERM, feeding typed lines in as tasks."""
    stop = stop_event()
    server = ContactServer(
        args.host,
        args.port,
        max_in_flight=args.max_in_flight,
        task_timeout=args.task_timeout or None,
        max_attempts=args.max_attempts,
        grace=args.grace,
        credentials=credentials,
        journal=args.journal,
        journal_sync=args.journal_sync,
    )
    typed: set[asyncio.Task[None]] = set()  # lines being queued (a reference keeps each alive)

    def submit(text: str, target: str | None) -> None:
        queuing = asyncio.ensure_future(queue_line(server, text, target))
        typed.add(queuing)
        queuing.add_done_callback(typed.discard)

    try:
        async with server:
            log.info("type a task per line (TEXT or @NAME TEXT)")
            read_tasks(asyncio.get_running_loop(), submit)
            await stop.wait()
    except (OSError, JournalError) as err:
        log.error("%s", err)
        return 1
    return 0


async def queue_line(server: ContactServer, text: str, target: str | None) -> None:
    """Submit a typed task. Its answer is logged when it comes; nobody here waits for it."""
    if server.closed:
        log.warning("ignored input line: the server is shutting down")
        return
    try:
        answer = await server.submit(text, target)
    except JournalError as err:
        log.error("task not queued: %s", err)
        return
    answer.add_done_callback(lambda answer: answer.exception())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    option = parser.add_argument
    option("--host", default="127.0.0.1", help="address to listen on")
    option("--port", type=int, default=PORT, help="port (0: any free port)")
    option("--max-in-flight", type=cli.positive_int, default=MAX_IN_FLIGHT, metavar="TASKS")
    option("--task-timeout", type=cli.seconds, default=TASK_TIMEOUT_SECONDS, help="0: none")
    option("--max-attempts", type=cli.positive_int, default=MAX_ATTEMPTS, help="sends per task")
    option("--grace", type=cli.positive_float, default=GRACE_SECONDS, metavar="SECONDS")
    option("--journal", metavar="FILE", help="keep unfinished tasks in this SQLite file")
    option("--journal-sync", choices=SYNC_MODES, default=SYNC, help="full: survive power loss")
    cli.add_common_arguments(parser, server=True)
    args = parser.parse_args()
    credentials = cli.server_tls(parser, args)
    cli.start_logging(args)
    return asyncio.run(serve(args, credentials))


if __name__ == "__main__":
    raise SystemExit(main())
