"""ContactServer used from code, in this process: what `submit` promises
when no client answers, and the mistakes it refuses at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from contact import BATCHES_ANSWERS_KEY, CLIENT_ID_KEY, contact_pb2, contact_pb2_grpc
from contact.server.core import Server
from contact_server import ContactServer, TaskNotAnsweredError


def test_a_task_unanswered_at_shutdown_raises_for_its_submitter(store: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            answer = await server.submit("nobody will answer this")
            targeted = await server.submit("nor this", target="absent")
        with pytest.raises(TaskNotAnsweredError, match="the server closed before task"):
            await answer
        with pytest.raises(TaskNotAnsweredError):
            await targeted

    asyncio.run(scenario())


def test_a_field_the_proto_lacks_is_refused_when_submitted(store: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            with pytest.raises(ValueError, match="no_such_field"):
                await server.submit("text", no_such_field="x")
            with pytest.raises(ValueError, match="the server's to fill"):
                await server.submit("text", id="mine")
            assert server._queue.queued() == 0

    asyncio.run(scenario())


def test_submit_before_start_and_after_shutdown_is_refused(store: dict[str, Any]) -> None:
    server = ContactServer(port=0, grace=0, **store)
    with pytest.raises(RuntimeError, match="not running"):
        server.submit_threadsafe("too early")

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="not running"):
            await server.submit("too early")
        async with server:  # (nothing was queued: it starts as usual)
            assert server._queue.queued() == 0
        with pytest.raises(RuntimeError, match="closed"):
            await server.submit("too late")

    asyncio.run(scenario())


def test_a_server_class_without_servicer_is_refused_before_it_opens_anything() -> None:
    with pytest.raises(TypeError, match="has no servicer"):
        Server(port=0)


def test_a_busy_port_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0) as first:
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port}"):
                async with ContactServer(port=first.port):
                    pass

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())


def test_answers_batched_in_one_message_each_count(store: dict[str, Any]) -> None:
    """A client that asks for batches (as contact_client.py does) hears the
    echo, and every answer in one message's `more` lands as if sent alone."""

    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, **store) as server:
            handles = [await server.submit(f"task {n}") for n in range(3)]
            metadata = ((CLIENT_ID_KEY, "batcher"),)
            target = f"127.0.0.1:{server.port}"
            async with grpc.aio.insecure_channel(target) as channel:
                stub = contact_pb2_grpc.ContactStub(channel)
                tasks = stub.getTask(
                    contact_pb2.Empty(), metadata=(*metadata, (BATCHES_ANSWERS_KEY, "1"))
                )
                echoed = dict(await tasks.initial_metadata())
                assert echoed.get(BATCHES_ANSWERS_KEY) == "1"
                sent = [await tasks.read() for _ in handles]
                answers = [contact_pb2.Result(id=task.id, ret=task.task.upper()) for task in sent]
                results = stub.tellResult(metadata=metadata)
                await results.write(contact_pb2.Result(id=answers[0].id, ret=answers[0].ret,
                                                       more=answers[1:]))  # fmt: skip
                done = await asyncio.wait_for(asyncio.gather(*handles), 5)
                assert done == ["TASK 0", "TASK 1", "TASK 2"]
                await results.done_writing()
                assert await results.code() is grpc.StatusCode.OK
                tasks.cancel()

    asyncio.run(scenario())
