"""Helpers for the client's long-lived streams: confirming the registration,
telling why the server ended a stream, hanging up politely, running the
streams side by side, the bounded wait for an answer (`answered`, on
contact/waits.py's `within`), and when to retry a lost connection."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import grpc

from contact import CLIENT_ID_KEY
from contact.logtext import retrieved
from contact.waits import within

# How long the server gets to acknowledge our half-close before we cancel:
# cancelling a call the server has not finished makes grpc.aio log a
# traceback there, but we never wait longer than this to leave.
HANG_UP_SECONDS = 1.0
# A live server answers registration and status lines within milliseconds;
# one that has not answered in this long is stuck (while gRPC core may still
# answer its pings): treat it as unavailable, and retry.
ANSWER_WITHIN_SECONDS = 5.0
# When a call fails, how long to wait for getTask's own status (which says
# why: shutdown, takeover) before reporting the failure as it came.
REGISTRATION_STATUS_SECONDS = 0.25


# The first wait before a retry; it doubles up to the client's --max-backoff.
INITIAL_BACKOFF_SECONDS = 0.25

# Status codes that retrying will not cure: the client stops and says why.
FINAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,  # the server refused our name or window
        grpc.StatusCode.PERMISSION_DENIED,  # a name our certificate does not carry
        grpc.StatusCode.UNIMPLEMENTED,  # not a contact server
        grpc.StatusCode.ABORTED,  # another client registered under our name
    }
)


T = TypeVar("T")


class StreamEndedError(Exception):
    """The server ended a stream without an error, or stopped answering; reconnect."""


async def answered(answer: Awaitable[T], what: str, seconds: float = ANSWER_WITHIN_SECONDS) -> T:
    """Await the server's `answer` to `what`, for at most `seconds`: a server
    that accepts a call but never answers it is as good as gone."""
    try:
        return await within(answer, seconds)
    except asyncio.TimeoutError:
        raise StreamEndedError(f"no answer to {what} in {seconds:.0f} s") from None


async def failure_of(call: grpc.aio.Call, stream: str) -> Exception:
    """Why the server has ended `call`: its error as AioRpcError, or
    StreamEndedError if it ended the `stream` without one."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        return StreamEndedError(f"the server ended the {stream} stream")
    error: Exception = grpc.aio.AioRpcError(
        code, await call.initial_metadata(), await call.trailing_metadata(), await call.details()
    )
    return error


async def ended(call: grpc.aio.Call, stream: str) -> NoReturn:
    """Raise why the server has ended `call` (see failure_of)."""
    raise await failure_of(call, stream)


async def hang_up(*calls: grpc.aio.Call, also: Sequence[asyncio.Future[Any]] = ()) -> None:
    """End our outgoing streams politely: half-close each and give the server
    HANG_UP_SECONDS to finish it; then, even if cancelled meanwhile, cancel
    whatever is left of them, and the tasks `also`."""

    async def finish(call: grpc.aio.Call) -> None:
        # Best effort on a call we are leaving anyway: if it already failed,
        # grpc raises AioRpcError, InvalidStateError or its private
        # ExecuteBatchError here, all meaning "already over".
        with contextlib.suppress(Exception):
            await call.done_writing()
            await call.code()

    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await within(asyncio.gather(*(finish(call) for call in calls)), HANG_UP_SECONDS)
    finally:
        for left in (*calls, *also):
            left.cancel()
        if also:  # bounded: cancelled at a gRPC read or write, a task ends at once
            await asyncio.wait(also, timeout=HANG_UP_SECONDS)


def apart(coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run `coroutine` in a task of its own, whose error is no news if
    nobody awaits it (it was given up on)."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(retrieved)
    return task


async def first_to_finish(
    *coroutines: Awaitable[None], then: Callable[[], None] | None = None
) -> None:
    """Run the coroutines together until one returns or raises; call `then`
    at once (even if cancelled), and cancel the rest. If one returned and
    another raised in the same instant, return."""
    running = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    for task in running:  # one that fails while the others are cancelled is no news
        task.add_done_callback(retrieved)
    try:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        failures = [error for finished in done if (error := finished.exception())]
        if len(failures) == len(done):
            raise failures[0]
    finally:
        if then is not None:
            then()
        for task in running:
            task.cancel()
        # Bounded: a coroutine stuck inside a gRPC write may not end when
        # cancelled; it ends with its call, which the caller is closing.
        await asyncio.wait(running, timeout=HANG_UP_SECONDS)


async def confirm_registration(tasks: grpc.aio.UnaryStreamCall, name: str) -> grpc.aio.Metadata:
    """Wait until the server accepts our getTask call, which it shows by
    echoing our name in the initial metadata (returned); raise its refusal
    otherwise."""
    echoed = await answered(tasks.initial_metadata(), "getTask")
    if echoed is None or echoed.get(CLIENT_ID_KEY) != name:
        # A refusal ends the call at once (read raises it as AioRpcError);
        # anything else is no registration, and is not waited for long.
        await answered(tasks.read(), "getTask")
        raise StreamEndedError("the server sent no registration")
    return echoed


async def registration_failure(tasks: grpc.aio.UnaryStreamCall) -> Exception | None:
    """When one call fails, the others often fail with it (a shutdown, a
    takeover), each with its own status; getTask's says why. Its error, if
    it ended with one, given a moment to arrive."""
    try:
        code = await within(asyncio.shield(tasks.code()), REGISTRATION_STATUS_SECONDS)
    except asyncio.TimeoutError:
        return None
    return None if code == grpc.StatusCode.OK else await failure_of(tasks, "task")


def backoff(cap: float, initial: float = INITIAL_BACKOFF_SECONDS) -> Iterator[float]:
    """Delays before each retry: doubling from `initial` up to `cap`, each
    scaled by a random 0.5-1.0 so that many clients do not retry in step."""
    delay = min(initial, cap)
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)
