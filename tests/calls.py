"""Calls a real contact client never makes, sent with grpc directly: the
raw material of the tests that check what the server refuses."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from contact import CLIENT_ID_KEY, contact_pb2

GET, TELL, STATUS = "getTask", "tellResult", "sendStatus"
REQUEST_TYPE: dict[str, type[Message]] = {
    GET: contact_pb2.Empty,
    TELL: contact_pb2.Result,
    STATUS: contact_pb2.ClientMsg,
}
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def parses(method: str, raw: bytes) -> bool:
    try:
        REQUEST_TYPE[method].FromString(raw)
        return True
    except DecodeError:
        return False


async def send_raw(
    port: int,
    method: str,
    raw: bytes | None,
    name: str | None = "attacker",
    registered: bool = True,
) -> grpc.StatusCode:
    """Send `raw` as the request of `method` (None: open the stream and send
    nothing) under `name` (None: no `client-id` at all); the status the call
    ends with (a getTask that registers is ended by us: CANCELLED). For
    tellResult and sendStatus, `registered` first registers `name` with a
    getTask call that stays open meanwhile, as a real client does."""
    metadata = () if name is None else ((CLIENT_ID_KEY, name),)
    path = f"/contact.Contact/{method}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=UNLIMITED) as channel:
        registration: Any = None
        if registered and method != GET and name is not None:
            registration = channel.unary_stream(f"/contact.Contact/{GET}")(b"", metadata=metadata)
            await registration.initial_metadata()
        call: Any
        if method == GET:
            call = channel.unary_stream(path)(raw or b"", metadata=metadata)
            # The server echoes the name only to a client it registered.
            if (await call.initial_metadata()).get(CLIENT_ID_KEY) is not None:
                call.cancel()
        else:
            kind = channel.stream_unary if method == TELL else channel.stream_stream
            call = kind(path)(metadata=metadata)
            # The server may end the call before reading (a refused name).
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                if raw is not None:
                    await call.write(raw)
                await call.done_writing()
        code: grpc.StatusCode = await asyncio.wait_for(call.code(), 5)
        if registration is not None:
            registration.cancel()
            await registration.code()  # ended before the channel closes
        return code


def expected_for(method: str, raw: bytes) -> grpc.StatusCode:
    """What a well-behaved server answers to `raw`, judged by parsing it here."""
    if parses(method, raw):
        answers = contact_pb2.Result.FromString(raw).more if method == TELL else []
        if any(batched.more for batched in answers):
            return grpc.StatusCode.INVALID_ARGUMENT  # a batch in a batch
        return grpc.StatusCode.CANCELLED if method == GET else grpc.StatusCode.OK
    return grpc.StatusCode.UNKNOWN if method == GET else grpc.StatusCode.INVALID_ARGUMENT
