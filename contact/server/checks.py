"""The servicer's checks of each call.

- What every call must carry in its metadata: the caller's name
  (`client-id`) and, on getTask, the window it asks for (`max-in-flight`).
  A call that fails a check, or that carries a malformed message (or a
  batch of answers inside a batch), is ended with a clear status and a log
  line saying why.
- getTask's registration: recorded with the queue (in a fleet, its
  database), and accepted in the initial metadata the client waits for.
- Which registration a call belongs to: a client's tellResult and
  sendStatus calls belong to its registration (its getTask call). Without
  one they are refused, and when it ends (the client left, a newer client
  took its name, the server shuts down) the server ends them itself, with a
  status that says why, instead of leaving them to gRPC to cancel when the
  shutdown grace runs out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from contact import (
    BATCHES_ANSWERS_KEY,
    CLIENT_ID_KEY,
    CLIENT_NAME,
    CLIENT_NAME_RULE,
    MAX_IN_FLIGHT_KEY,
    REPORTS_START_KEY,
    contact_pb2,
)
from contact.logtext import REPEATS
from contact.queue.base import QueueError
from contact.queue.dispatcher import FORGOTTEN, REPLACED, SHUTDOWN, Dispatcher, Session
from contact.tls import certified_name_mismatch

log = logging.getLogger("contact.metadata")

# A window is a decimal integer of 1 or more; 20 digits is far beyond any
# real window and keeps int() away from huge strings.
WINDOW = re.compile(r"[0-9]{1,20}")


async def client_name(context: grpc.aio.ServicerContext) -> str:
    """The caller's name from `client-id`; refuse the call with
    INVALID_ARGUMENT when it is missing or malformed, and with
    PERMISSION_DENIED when it is not the name of the caller's certificate."""
    names = values(context, CLIENT_ID_KEY)
    if len(names) != 1:
        await refuse(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"send exactly one '{CLIENT_ID_KEY}' metadata value with the client's name",
        )
    name = names[0]
    if not CLIENT_NAME.fullmatch(name):
        await refuse(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"'{CLIENT_ID_KEY}' must be {CLIENT_NAME_RULE}",
        )
    # Under mutual TLS a client may only use the name its certificate carries.
    if certified_name_mismatch(context.auth_context(), name):
        await refuse(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            f"'{CLIENT_ID_KEY}' {name} is not the name in the client certificate",
        )
    return name


async def requested_window(context: grpc.aio.ServicerContext) -> int | None:
    """How many tasks at once the caller asked for in `max-in-flight`, or
    None if it did not say; refuse the call if the value is malformed."""
    windows = values(context, MAX_IN_FLIGHT_KEY)
    if not windows:
        return None
    if len(windows) > 1 or not WINDOW.fullmatch(windows[0]) or int(windows[0]) < 1:
        await refuse(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"'{MAX_IN_FLIGHT_KEY}' must be one decimal integer of 1 or more",
        )
    return int(windows[0])


def says_yes(context: grpc.aio.ServicerContext, key: str) -> bool:
    """Whether the caller set the flag `key` (`accepts-cancel: 1`, say)."""
    return values(context, key) == ["1"]


def peer_host(peer: str) -> str:
    """The caller's host, without its port (`ipv4:127.0.0.1:5000` ->
    `ipv4:127.0.0.1`): what log limits count by, since a new connection
    is a new port."""
    return peer.rsplit(":", 1)[0]


def values(context: grpc.aio.ServicerContext, key: str) -> list[str]:
    """Every text value the call carries under `key`."""
    return [
        value
        for k, value in context.invocation_metadata() or ()
        if k == key and isinstance(value, str)
    ]


async def refuse(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, problem: str
) -> NoReturn:
    """Log why a call is refused, and end it with `code`."""
    peer = context.peer()
    REPEATS.log(
        log,
        logging.WARNING,
        "refused",
        peer_host(peer),
        "refused a call from %s: %s",
        peer,
        problem,
    )
    await context.abort(code, problem)
    raise AssertionError("context.abort returned")  # it always raises


async def refuse_malformed(context: grpc.aio.ServicerContext, name: str, err: DecodeError) -> None:
    """End a call whose client sent bytes that are not a valid message
    (grpc's default would be UNKNOWN and a traceback in the log)."""
    await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed message from {name}: {err}")


# How a call that belonged to an ended registration ends, by why it ended.
ENDINGS = {
    SHUTDOWN: (grpc.StatusCode.UNAVAILABLE, "the server is shutting down"),
    REPLACED: (grpc.StatusCode.ABORTED, "a newer client registered as {name} replaced this one"),
    FORGOTTEN: (grpc.StatusCode.UNAVAILABLE, "the server rejoined its fleet: register again"),
}
LEFT_ENDING = (grpc.StatusCode.FAILED_PRECONDITION, "the registration of {name} ended")


async def answers_in(
    message: contact_pb2.Result, name: str, context: grpc.aio.ServicerContext
) -> tuple[contact_pb2.Result, ...]:
    """The answers one tellResult message carries: itself, and those batched
    in its `more`; refuse the call if one of those carries a batch too."""
    if not message.more:
        return (message,)
    if any(batched.more for batched in message.more):
        await refuse(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"an answer batched by {name} carries a batch of its own",
        )
    return (message, *message.more)


async def register(dispatcher: Dispatcher, name: str, context: grpc.aio.ServicerContext) -> int:
    """Record NAME's registration with the queue (a fleet's database: its
    older session on another server ends); UNAVAILABLE if it cannot."""
    try:
        return await dispatcher.queue.register(name)
    except QueueError as err:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot register {name}: {err}")
        raise  # (abort raises)


def accepted(session: Session, context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """getTask's initial metadata. Echoing the name tells the client its
    registration was accepted; echoing reports-start, that its reports of
    starts are heard; batches-answers, that answers may come several to a
    message."""
    echo: tuple[tuple[str, str], ...] = ((CLIENT_ID_KEY, session.name),)
    if session.reports_start:
        echo += ((REPORTS_START_KEY, "1"),)
    if says_yes(context, BATCHES_ANSWERS_KEY):
        echo += ((BATCHES_ANSWERS_KEY, "1"),)
    return echo


async def registration(
    dispatcher: Dispatcher, name: str, context: grpc.aio.ServicerContext
) -> Session:
    """The live session of `name`; refuse the call if it has none. In a
    fleet, a registration on another server will do (a per-call balancer
    spreads a client's calls): a stand-in session then, that never ends and
    holds nothing here; its answers go to the server holding their tasks."""
    session = dispatcher.session(name)
    if session is None and await registered_elsewhere(dispatcher, name, context):
        return Session(name, window=0)
    if session is None:
        await refuse(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{name} is not registered: call getTask first, and keep it open",
        )
    assert session is not None
    return session


async def registered_elsewhere(
    dispatcher: Dispatcher, name: str, context: grpc.aio.ServicerContext
) -> bool:
    try:
        return await dispatcher.queue.registered_elsewhere(name)
    except QueueError as err:
        await refuse(context, grpc.StatusCode.UNAVAILABLE, f"cannot look {name} up: {err}")
        raise  # (refuse raises)


@contextlib.asynccontextmanager
async def owned_by(
    session: Session, context: grpc.aio.ServicerContext, calls: set[asyncio.Task[Any]]
) -> AsyncIterator[None]:
    """Run the body of a call until it ends, or until `session` ends: then
    end the call with the status for why the session ended. At shutdown the
    call is left open (it is in `calls`) so that answers on their way still
    land; the server ends what is left of them when its grace runs out."""
    handler = asyncio.current_task()
    assert handler is not None

    def end_call() -> None:
        if session.ended != SHUTDOWN:  # at shutdown, end_calls says when
            handler.cancel()

    forget = session.when_ended(end_call)
    calls.add(handler)
    try:
        yield
    except asyncio.CancelledError:
        if session.ended is None:
            raise  # cancelled by gRPC itself (the client went away): not ours to answer
        if hasattr(handler, "uncancel"):  # Python 3.11+: this cancellation is handled
            handler.uncancel()
        code, details = ENDINGS.get(session.ended, LEFT_ENDING)
        await context.abort(code, details.format(name=session.name))
    finally:
        forget()
        calls.discard(handler)


async def end_calls(calls: set[asyncio.Task[Any]], grace: float) -> None:
    """At shutdown: give the calls `grace` seconds to end by themselves (a
    client that sees its registration end hangs up), then end the rest."""
    if calls:
        _, left = await asyncio.wait(set(calls), timeout=grace)
        for call in left:
            call.cancel()  # owned_by ends it with UNAVAILABLE
        if left:
            await asyncio.wait(left, timeout=grace)
