"""The contact client: dials in to the server, receives the tasks it pushes,
answers each with `handle_task`, and reports back.

    python contact_client.py [--server localhost:50051] [--name NAME]
                             [--ca FILE [--cert FILE --key FILE]]

One connection carries three calls: getTask (registration; the server
pushes tasks down it), tellResult (answers go up it, each naming its task)
and sendStatus (a status line every few seconds, each acknowledged). When the
server is away, the client retries with capped, jittered exponential backoff
until it is back. Ctrl-C (or SIGTERM) stops it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn

import grpc

from contact import (
    CLIENT_ID_KEY,
    CLIENT_NAME,
    CLIENT_NAME_RULE,
    MAX_MESSAGE_BYTES,
    MAX_TEXT_BYTES,
    contact_pb2,
    contact_pb2_grpc,
)

log = logging.getLogger("contact.client")


def handle_task(text: str) -> str:
    """Do the work for one task and return the answer. Replace this with your
    own: it runs in a thread of its own, so it may block or take long."""
    return text.upper()


# Non-default gRPC options of the channel:
#
# grpc.keepalive_time_ms / grpc.keepalive_timeout_ms: ping the server after
#   15 s without traffic and give up on the connection if the ping is not
#   answered within 10 s, so a server that vanished without closing the
#   connection is noticed within about 25 s and the client reconnects.
#   The server accepts pings every 10 s or slower (see contact_server.py);
#   pinging faster than a server allows gets the connection closed with
#   GOAWAY "too_many_pings".
# grpc.http2.ping_timeout_ms: how long current gRPC core really waits for a
#   ping's answer (default one minute); keepalive_timeout_ms alone does not
#   shorten it. See the same option in contact_server.py.
# grpc.http2.max_pings_without_data = 0: keep pinging while no task flows; by
#   default gRPC stops after two pings with no data in between.
# grpc.max_receive_message_length / grpc.max_send_message_length: the same
#   cap as the server's, so neither side sends what the other refuses.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# Status codes that retrying will not cure: stop and say why.
FINAL_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,  # the server refused our name
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,  # not a contact server
    grpc.StatusCode.ABORTED,  # another client registered under our name
}


class StreamEndedError(Exception):
    """The server ended a stream without an error; reconnect."""


class Progress:
    """What this client has done, across reconnections."""

    def __init__(self) -> None:
        self.answered = 0


def answer(text: str) -> str:
    """Run handle_task, turning a crash or an oversized answer into an error
    answer: one bad task must not stop the client or come back forever."""
    try:
        result = handle_task(text)
    except Exception as err:  # any failure of user code becomes the answer
        log.exception("handle_task failed")
        return f"error: {type(err).__name__}: {err}"
    if len(result.encode()) > MAX_TEXT_BYTES:
        return f"error: the answer is longer than {MAX_TEXT_BYTES} bytes"
    return result


async def in_daemon_thread(work: Callable[[str], str], text: str) -> str:
    """Run `work(text)` in a daemon thread: a slow task neither blocks the event
    loop nor, unlike asyncio.to_thread, holds up the exit on Ctrl-C."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()

    def settle(result: str) -> None:
        if not done.done():  # the wait may have been cancelled meanwhile
            done.set_result(result)

    def run() -> None:
        result = work(text)
        with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=run, daemon=True).start()
    return await done


async def ended(call: grpc.aio.Call, stream: str) -> NoReturn:
    """Raise why the server has ended `call`: its error as AioRpcError, or
    StreamEndedError if it ended the `stream` without one."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        raise StreamEndedError(f"the server ended the {stream} stream")
    raise grpc.aio.AioRpcError(
        code, await call.initial_metadata(), await call.trailing_metadata(), await call.details()
    )


async def answer_tasks(
    tasks: grpc.aio.UnaryStreamCall,
    results: grpc.aio.StreamUnaryCall,
    progress: Progress,
    max_tasks: int | None,
) -> None:
    """Answer every task pushed down `tasks` on `results`. Return once
    `max_tasks` are answered and the server has read every answer; raise
    when the connection fails."""
    async for task in tasks:
        result = await in_daemon_thread(answer, task.task)
        log.info("task %s: %r -> %r", task.id, task.task, result)
        try:
            await results.write(contact_pb2.Result(id=task.id, ret=result))
        except asyncio.InvalidStateError:  # the server has ended the stream
            await ended(results, "result")
        progress.answered += 1
        if max_tasks is not None and progress.answered >= max_tasks:
            await results.done_writing()
            await results  # returns once the server has read every answer
            return
    await ended(tasks, "task")


async def report_status(
    status: grpc.aio.StreamStreamCall, progress: Progress, every: float
) -> None:
    """Send a status line every `every` seconds and print each acknowledgement."""
    while True:
        line = contact_pb2.ClientMsg(msg=f"alive, {progress.answered} tasks answered")
        try:
            await status.write(line)
        except asyncio.InvalidStateError:  # the server has ended the stream
            await ended(status, "status")
        ack = await status.read()
        if ack is grpc.aio.EOF:
            await ended(status, "status")
        log.info("server acknowledged status: %s", ack.ret)
        await asyncio.sleep(every)


async def confirm_registration(tasks: grpc.aio.UnaryStreamCall, name: str) -> None:
    """Wait until the server accepts our getTask call, which it shows by
    echoing our name in the initial metadata; raise its refusal otherwise."""
    echoed = await tasks.initial_metadata()
    if echoed is None or echoed.get(CLIENT_ID_KEY) != name:
        await tasks.read()  # raises the refusal as AioRpcError
        raise StreamEndedError("the server sent no registration")


async def hang_up(*calls: grpc.aio.Call) -> None:
    """End our outgoing streams politely: half-close each and give the server
    a second to finish it, then cancel whatever is left. Cancelling a call the
    server has not started handling yet makes grpc.aio log a traceback there."""

    async def finish(call: grpc.aio.Call) -> None:
        # Best effort on a call we are leaving anyway: if it already failed,
        # grpc raises AioRpcError, InvalidStateError or its private
        # ExecuteBatchError here, all meaning "already over".
        with contextlib.suppress(Exception):
            await call.done_writing()
            await call.code()

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(finish(call) for call in calls)), 1.0)
    for call in calls:
        call.cancel()


async def first_to_finish(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines together until one returns or raises; cancel the rest."""
    running = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for finished in done:
            finished.result()  # raises its failure, if any
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def channel_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files, or None for plaintext: trust servers
    whose certificate `ca` signed and, for mutual TLS, present `cert`."""
    if ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def open_channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """A channel to `target` with our options: TLS if there are credentials."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


async def one_connection(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    name: str,
    progress: Progress,
    max_tasks: int | None,
    status_every: float,
    registered: Callable[[], None],
) -> None:
    """Serve the server over one channel until `max_tasks` are answered;
    raise AioRpcError or StreamEndedError when the connection is lost."""
    metadata = ((CLIENT_ID_KEY, name),)
    async with open_channel(target, credentials) as channel:
        stub = contact_pb2_grpc.ContactStub(channel)
        tasks = stub.getTask(contact_pb2.Empty(), metadata=metadata)
        try:
            await confirm_registration(tasks, name)
            registered()
            results = stub.tellResult(metadata=metadata)
            status = stub.sendStatus(metadata=metadata)
            try:
                # Answering ends only when done; status only when the
                # connection failed. Whichever ends first ends both.
                await first_to_finish(
                    answer_tasks(tasks, results, progress, max_tasks),
                    report_status(status, progress, status_every),
                )
            finally:
                await hang_up(results, status)
        finally:
            tasks.cancel()


def backoff(initial: float, cap: float) -> Iterator[float]:
    """Delays before each retry: doubling from `initial` up to `cap`, each
    scaled by a random 0.5-1.0 so that many clients do not retry in step."""
    delay = initial
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)


async def run(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    name: str,
    max_tasks: int | None,
    status_every: float,
    max_backoff: float,
) -> int:
    """Keep a connection to the server until `max_tasks` are answered (or
    forever); return the exit code."""
    progress = Progress()
    delays = backoff(0.25, max_backoff)
    outage = False  # said once per outage, not once per retry

    def registered() -> None:
        nonlocal delays, outage
        log.info("registered with %s as %s", target, name)
        log.debug("%d asyncio tasks alive", len(asyncio.all_tasks()))
        delays, outage = backoff(0.25, max_backoff), False

    while True:
        try:
            await one_connection(
                target, credentials, name, progress, max_tasks, status_every, registered
            )
            log.info("answered %d tasks; exiting", progress.answered)
            return 0
        except grpc.aio.AioRpcError as err:
            if err.code() in FINAL_CODES:
                log.error("the server refused this client: %s: %s", err.code().name, err.details())
                return 1
            problem = f"{err.code().name}: {err.details()}"
        except StreamEndedError as err:
            problem = str(err)
        delay = next(delays)
        if not outage:
            log.warning("server %s unavailable (%s); retrying until it is back", target, problem)
            outage = True
        log.debug("retrying in %.2f s", delay)
        await asyncio.sleep(delay)


async def run_until_signal(
    args: argparse.Namespace, credentials: grpc.ChannelCredentials | None
) -> int:
    """Run the client; SIGINT or SIGTERM cancels it wherever it is."""
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        return await run(
            args.server, credentials, args.name, args.max_tasks, args.status_every, args.max_backoff
        )
    except asyncio.CancelledError:
        log.info("stopped")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="localhost:50051", help="the server's host:port")
    parser.add_argument(
        "--name",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="the name to register under (default: host name and process id)",
    )
    parser.add_argument("--max-tasks", type=int, help="exit after answering this many tasks")
    parser.add_argument(
        "--status-every", type=float, default=5.0, help="seconds between status lines"
    )
    parser.add_argument(
        "--max-backoff", type=float, default=10.0, help="longest wait between retries, seconds"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument("--ca", type=Path, help="use TLS, trusting servers signed by this CA")
    parser.add_argument("--cert", type=Path, help="this client's certificate, for mutual TLS")
    parser.add_argument("--key", type=Path, help="the private key of --cert")
    args = parser.parse_args()
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    if args.cert and not args.ca:
        parser.error("--cert needs --ca")
    if not CLIENT_NAME.fullmatch(args.name):
        parser.error(f"--name must be {CLIENT_NAME_RULE}")
    if args.max_tasks is not None and args.max_tasks < 1:
        parser.error("--max-tasks must be at least 1")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        credentials = channel_credentials(args.ca, args.cert, args.key)
    except OSError as err:
        parser.error(f"cannot read a TLS file: {err}")
    return asyncio.run(run_until_signal(args, credentials))


if __name__ == "__main__":
    raise SystemExit(main())
