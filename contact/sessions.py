"""A client's tellResult and sendStatus calls belong to its registration
(its getTask call): without one they are refused, and when it ends (the
client left, a newer client took its name, the server shuts down) the
server ends them itself, with a status that says why, instead of leaving
them to gRPC to cancel when the shutdown grace runs out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from contact.metadata import refuse
from contact.router import REPLACED, SHUTDOWN, Router, Session

# How a call that belonged to an ended registration ends, by why it ended.
ENDINGS = {
    SHUTDOWN: (grpc.StatusCode.UNAVAILABLE, "the server is shutting down"),
    REPLACED: (grpc.StatusCode.ABORTED, "a newer client registered as {name} replaced this one"),
}
LEFT_ENDING = (grpc.StatusCode.FAILED_PRECONDITION, "the registration of {name} ended")


async def registration(router: Router, name: str, context: grpc.aio.ServicerContext) -> Session:
    """The live session of `name`; refuse the call if it has none."""
    session = router.session(name)
    if session is None:
        await refuse(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{name} is not registered: call getTask first, and keep it open",
        )
    assert session is not None
    return session


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
