"""Servers that behave as a different implementation of the proto might, run
as a process of their own (a gRPC server in the test process would share it
with every other test's calls):

    python tests/fake_server.py KIND

KIND is ends-getTask, ends-tellResult or ends-sendStatus (ends that stream
without an error), older (a server from before `reports-start`: it sends a
task every 0.1 s and prints each Result it gets), never-answers (accepts
getTask, says nothing), no-echo (sends getTask's headers without the
client's name, then nothing), floods
(pushes tasks of 8 KiB as fast as it can, whatever the window) or
keeps-results (sends 3 tasks, and never ends tellResult). It prints
`listening on 127.0.0.1:PORT`, then a line per getTask call.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from contact import CLIENT_ID_KEY, contact_pb2, contact_pb2_grpc


class EndsStreamsEarly(contact_pb2_grpc.ContactServicer):  # type: ignore[misc]
    """Registers clients, then ends the stream named `ends` without an error."""

    def __init__(self, ends: str) -> None:
        self.ends = ends

    async def getTask(self, request: Any, context: Any) -> AsyncIterator[contact_pb2.ServerMsg]:
        print("getTask call", flush=True)
        name = dict(context.invocation_metadata())[CLIENT_ID_KEY]
        await context.send_initial_metadata(((CLIENT_ID_KEY, name),))
        for number in range(1 if self.ends == "getTask" else 600):  # a minute of work
            yield contact_pb2.ServerMsg(task="a task", id=f"x-{number}")
            await asyncio.sleep(0.1)

    async def tellResult(self, request_iterator: Any, context: Any) -> contact_pb2.Empty:
        if self.ends != "tellResult":
            async for result in request_iterator:
                print(f"result id={result.id!r} started={list(result.started)}", flush=True)
        return contact_pb2.Empty()

    async def sendStatus(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[contact_pb2.Result]:
        async for _ in request_iterator:
            yield contact_pb2.Result(ret="ack")
            if self.ends == "sendStatus":
                return


class NeverAnswers(contact_pb2_grpc.ContactServicer):  # type: ignore[misc]
    """Accepts getTask calls, and then says nothing at all."""

    async def getTask(self, request: Any, context: Any) -> AsyncIterator[contact_pb2.ServerMsg]:
        print("getTask call", flush=True)
        await asyncio.Event().wait()
        yield contact_pb2.ServerMsg()  # never reached


class Misbehaves(EndsStreamsEarly):
    """Registers clients (or seems to), then breaks the protocol as `kind` says."""

    def __init__(self, kind: str) -> None:
        super().__init__("nothing")
        self.kind = kind

    async def getTask(self, request: Any, context: Any) -> AsyncIterator[contact_pb2.ServerMsg]:
        print("getTask call", flush=True)
        name = dict(context.invocation_metadata())[CLIENT_ID_KEY]
        echo = ("x-not-the-name", "1") if self.kind == "no-echo" else (CLIENT_ID_KEY, name)
        await context.send_initial_metadata((echo,))
        if self.kind == "floods":
            for number in range(100_000):
                yield contact_pb2.ServerMsg(task="x" * 8192, id=f"flood-{number}")
        if self.kind == "keeps-results":
            for number in range(3):
                yield contact_pb2.ServerMsg(task="a task", id=f"x-{number}")
        await asyncio.Event().wait()

    async def tellResult(self, request_iterator: Any, context: Any) -> contact_pb2.Empty:
        async for _ in request_iterator:
            pass
        if self.kind == "keeps-results":
            print("tellResult closed by the client; never answering", flush=True)
            await asyncio.Event().wait()
        return contact_pb2.Empty()


async def serve(kind: str) -> None:
    server = grpc.aio.server()
    servicer: contact_pb2_grpc.ContactServicer
    if kind == "never-answers":
        servicer = NeverAnswers()
    elif kind.startswith("ends-"):
        servicer = EndsStreamsEarly(kind[5:])
    elif kind == "older":
        servicer = EndsStreamsEarly("nothing")
    else:
        servicer = Misbehaves(kind)
    contact_pb2_grpc.add_ContactServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
