"""Helpers for the client's long-lived streams: telling why the server ended
one, hanging up politely, and running the streams side by side."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Coroutine
from typing import Any, NoReturn, TypeVar

import grpc

from contact.tasks import retrieved

# How long the server gets to acknowledge our half-close before we cancel:
# cancelling a call the server has not finished makes grpc.aio log a
# traceback there, but we never wait longer than this to leave.
HANG_UP_SECONDS = 1.0


T = TypeVar("T")


class StreamEndedError(Exception):
    """The server ended a stream without an error, or stopped answering; reconnect."""


async def answered_within(answer: Awaitable[T], seconds: float, what: str) -> T:
    """Await the server's `answer` to `what`, for at most `seconds`: a server
    that accepts a call but never answers it is as good as gone."""
    try:
        return await asyncio.wait_for(answer, seconds)
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


async def hang_up(*calls: grpc.aio.Call) -> None:
    """End our outgoing streams politely: half-close each and give the server
    HANG_UP_SECONDS to finish it, then cancel whatever is left."""

    async def finish(call: grpc.aio.Call) -> None:
        # Best effort on a call we are leaving anyway: if it already failed,
        # grpc raises AioRpcError, InvalidStateError or its private
        # ExecuteBatchError here, all meaning "already over".
        with contextlib.suppress(Exception):
            await call.done_writing()
            await call.code()

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(finish(call) for call in calls)), HANG_UP_SECONDS)
    for call in calls:
        call.cancel()


async def first_to_finish(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines together until one returns or raises; cancel the
    rest. If one returned and another raised in the same instant, return."""
    running = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    for task in running:  # one that fails while the others are cancelled is no news
        task.add_done_callback(retrieved)
    try:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        failures = [error for finished in done if (error := finished.exception())]
        if len(failures) == len(done):
            raise failures[0]
    finally:
        for task in running:
            task.cancel()
        # Bounded: a coroutine stuck inside a gRPC write may not end when
        # cancelled; it ends with its call, which the caller is closing.
        await asyncio.wait(running, timeout=HANG_UP_SECONDS)
