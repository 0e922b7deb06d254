"""The contact client: dials in to the server, receives the tasks it pushes,
answers each with a handler, and reports back.

    python contact_client.py [--server localhost:50051] [--name NAME]

One connection carries the article's three calls: getTask (registration;
the server pushes tasks down it), tellResult (answers go up it) and
sendStatus (a status line every few seconds, each answered). While the
server is away it retries with capped, jittered backoff; Ctrl-C (or
SIGTERM) stops it at once; `--help` lists the rest. From your own code:

    asyncio.run(run(my_handler, server="localhost:50051", name="worker-1"))
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable

import grpc

from contact import (
    ACCEPTS_CANCEL_KEY,
    BATCHES_ANSWERS_KEY,
    CLIENT_ID_KEY,
    MAX_IN_FLIGHT_KEY,
    REPORTS_START_KEY,
    cli,
    contact_pb2,
    contact_pb2_grpc,
    default_client_name,
)
from contact.client import streams
from contact.client.handler import Handler
from contact.client.work import CONCURRENCY, MAX_BACKOFF, PREFETCH, SERVER, STATUS_EVERY, Work
from contact.logtext import counted
from contact.options import client_channel
from contact.signals import on_stop_signal

log = logging.getLogger("contact.client")


def handle_task(task: contact_pb2.ServerMsg) -> str:
    """The work for one task: return the answer, or raise to fail the task.
    Pass your own to `run`: a plain function runs in a worker thread, so it
    may block or take long; an `async def` runs on the event loop, and must
    not block it."""
    return task.task.upper()


class RefusedError(Exception):
    """The server refused this client for good (a bad name, a takeover, ...)."""


# --- One connection: the three calls ---------------------------------------------


async def one_connection(
    channel: grpc.aio.Channel, name: str, work: Work, registered: Callable[[], None]
) -> None:
    """Serve the server over `channel` until it fails (raise why), or until
    `work` reaches its task limit (return)."""
    stub = contact_pb2_grpc.ContactStub(channel)
    metadata = ((CLIENT_ID_KEY, name),)
    # getTask: register, and ask for up to a window of tasks at a time.
    tasks = stub.getTask(
        contact_pb2.Empty(),
        metadata=(
            *metadata,
            (MAX_IN_FLIGHT_KEY, str(work.window)),
            (ACCEPTS_CANCEL_KEY, "1"),
            (REPORTS_START_KEY, "1"),
            (BATCHES_ANSWERS_KEY, "1"),
        ),
    )
    try:
        work.connection_began(await streams.confirm_registration(tasks, name))
        registered()
        results = stub.tellResult(metadata=metadata)  # tellResult: one stream of answers
        status = stub.sendStatus(metadata=metadata)  # sendStatus: status lines, each answered
        # getTask's reads and tellResult's writes run in tasks of their own,
        # not cancelled in the middle of one while the connection is of use:
        # that cancels the call, and would lose getTask's status (why the
        # connection ended) or whether an answer went. hang_up ends them.
        reader = streams.apart(receive_tasks(tasks, work))
        writer = streams.apart(send_answers(results, work))
        try:
            await streams.first_to_finish(
                asyncio.shield(reader),
                asyncio.shield(writer),
                watch_results(results, work),
                report_status(status, work),
                then=work.connection_ended,  # at once, even if cancelled
            )
            # The task limit is reached and every answer written.
            await results.done_writing()
            # Returns once the server has read every answer; one that never
            # says so is not waited for long.
            await streams.answered(results, "the last answers")
        except (grpc.aio.AioRpcError, streams.StreamEndedError) as err:
            await work.last_write_settled(writer)  # the answer on its way may be the last
            reason = None if work.done() else await streams.registration_failure(tasks)
            if not work.done():  # (the last answer's write may have ended meanwhile)
                raise (reason or err) from None
            log.warning("the server did not confirm the last answers (%s)", err)
        finally:
            await streams.hang_up(results, status, also=(reader, writer))
    finally:
        tasks.cancel()
        work.connection_ended()


async def receive_tasks(tasks: grpc.aio.UnaryStreamCall, work: Work) -> None:
    """Start work on every task the server pushes, as soon as it arrives."""
    while (task := await tasks.read()) is not grpc.aio.EOF:
        work.start(task)
    await streams.ended(tasks, "task")


async def send_answers(results: grpc.aio.StreamUnaryCall, work: Work) -> None:
    """Send each answer (and the tasks begun) as it is ready; return once
    the task limit is reached, or the connection is over."""
    while await work.message_ready():
        try:
            await results.write(work.next_message())
        except asyncio.InvalidStateError:  # the server has ended the stream
            await streams.ended(results, "result")
        work.written()


async def watch_results(results: grpc.aio.StreamUnaryCall, work: Work) -> None:
    """Notice at once when the server ends tellResult: a write racing that
    end can wait for ever (seen with grpcio 1.85), so do not rely on it."""
    await results.code()
    if not work.done():
        await streams.ended(results, "result")


async def report_status(status: grpc.aio.StreamStreamCall, work: Work) -> None:
    """Send a status line every `work.status_every` seconds; log each answer."""
    while True:
        line = contact_pb2.ClientMsg(msg=f"alive, {counted(work.answered, 'task')} answered")
        try:
            await status.write(line)
        except asyncio.InvalidStateError:  # the server has ended the stream
            await streams.ended(status, "status")
        ack = await streams.answered(status.read(), "a status line")
        if ack is grpc.aio.EOF:
            await streams.ended(status, "status")
        log.debug("server acknowledged status: %s", ack.ret)
        await asyncio.sleep(work.status_every)


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
    delivery this is) and returns the answer, `concurrency` tasks at once:
    on the loop if an `async def`, else in threads; if it raises, the task
    fails with TaskError. Each run() has a connection of its own: many can share a process."""
    name = name or default_client_name()
    work = Work(handler, concurrency, concurrency + prefetch, max_tasks, status_every)
    delays, outage = streams.backoff(max_backoff), False  # an outage is said once, not per retry

    def registered() -> None:
        nonlocal delays, outage
        log.info("registered with %s as %s", server, name)
        if log.isEnabledFor(logging.DEBUG):  # all_tasks() walks every client's tasks
            log.debug("%d asyncio tasks alive", len(asyncio.all_tasks()))
        delays, outage = streams.backoff(max_backoff), False

    try:
        while True:
            try:
                async with client_channel(server, credentials) as channel:
                    await one_connection(channel, name, work, registered)
                log.info("answered %s; exiting", counted(work.answered, "task"))
                return
            except grpc.aio.AioRpcError as err:
                if err.code() in streams.FINAL_CODES:
                    raise RefusedError(f"{err.code().name}: {err.details()}") from None
                problem = f"{err.code().name}: {err.details()}"
            except streams.StreamEndedError as err:
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
    tuning = cli.client_tuning(args)
    main_task = asyncio.current_task()
    assert main_task is not None
    on_stop_signal(main_task.cancel)
    try:
        await run(handle_task, args.server, args.name, credentials=credentials, **tuning)
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
    parser.add_argument("--server", default=SERVER, help="the server's host:port")
    parser.add_argument("--name", type=cli.client_name, help="its name (default: HOST-PID)")
    cli.add_client_tuning(parser)
    cli.add_common_arguments(parser, server=False)
    args = parser.parse_args()
    credentials = cli.client_tls(parser, args)
    cli.start_logging(args)
    return asyncio.run(run_until_signal(args, credentials))


if __name__ == "__main__":
    raise SystemExit(main())
