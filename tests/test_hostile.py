"""Hostile input against every method of a real server process. Each attempt
gets a gRPC error status, the server keeps serving everyone else, and the
task queued before the attack is still delivered afterwards."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import pytest

from contact import CLIENT_ID_KEY, MAX_MESSAGE_BYTES, contact_pb2, contact_pb2_grpc
from tests.calls import GET, STATUS, TELL, expected_for, send_raw
from tests.processes import Process


@pytest.fixture
def guarded(
    server: tuple[Process, int], client: Callable[..., Process]
) -> tuple[Process, int, Callable[[], None]]:
    """A server with a live bystander client and a task queued for `keeper`
    (not yet connected); call the returned check once the attack is over."""
    srv, port = server
    bystander = client("bystander", port)
    srv.type("@keeper kept safe")
    srv.wait_for(r"queued for keeper")

    def still_serving() -> None:
        srv.type("still served")
        srv.wait_for(r"result from bystander: 'STILL SERVED'$")
        client("keeper", port)
        srv.wait_for(r"result from keeper: 'KEPT SAFE'$")
        assert bystander.popen.poll() is None and srv.popen.poll() is None

    return srv, port, still_serving


@pytest.mark.parametrize("method", [GET, TELL, STATUS])
def test_random_bytes(guarded: tuple[Process, int, Callable[[], None]], method: str) -> None:
    _, port, still_serving = guarded
    rng = random.Random(f"random bytes {method}")
    samples = [rng.randbytes(rng.randint(1, 64)) for _ in range(25)]

    async def attack() -> list[tuple[grpc.StatusCode, grpc.StatusCode]]:
        return [(await send_raw(port, method, raw), expected_for(method, raw)) for raw in samples]

    outcomes = asyncio.run(attack())
    assert [got for got, _ in outcomes] == [want for _, want in outcomes]
    assert sum(want is not grpc.StatusCode.OK for _, want in outcomes) > 10  # mostly garbage
    still_serving()


@pytest.mark.parametrize("method", [TELL, STATUS])
def test_truncated_messages(guarded: tuple[Process, int, Callable[[], None]], method: str) -> None:
    _, port, still_serving = guarded
    whole = (
        contact_pb2.Result(id="abc-1", ret="a full answer").SerializeToString()
        if method == TELL
        else contact_pb2.ClientMsg(msg="a full status line").SerializeToString()
    )

    async def attack() -> list[tuple[grpc.StatusCode, grpc.StatusCode]]:
        cuts = [whole[:n] for n in range(1, len(whole))]
        return [(await send_raw(port, method, raw), expected_for(method, raw)) for raw in cuts]

    outcomes = asyncio.run(attack())
    assert [got for got, _ in outcomes] == [want for _, want in outcomes]
    assert grpc.StatusCode.INVALID_ARGUMENT in {want for _, want in outcomes}
    still_serving()


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        (TELL, b"\x0a\x02\xff\xfe"),  # Result.ret
        (TELL, b"\x12\x03a\xc3\x28"),  # Result.id
        (STATUS, b"\x0a\x01\x80"),  # ClientMsg.msg
    ],
    ids=["result-ret", "result-id", "status-msg"],
)
def test_invalid_utf8_in_a_string_field(
    guarded: tuple[Process, int, Callable[[], None]], method: str, raw: bytes
) -> None:
    srv, port, still_serving = guarded
    assert asyncio.run(send_raw(port, method, raw)) is grpc.StatusCode.INVALID_ARGUMENT
    srv.wait_for(r"WARNING refused a call from .*: malformed message from attacker: .*bad UTF-8")
    still_serving()


@pytest.mark.parametrize("method", [GET, TELL, STATUS])
def test_a_message_over_the_size_limit(
    guarded: tuple[Process, int, Callable[[], None]], method: str
) -> None:
    _, port, still_serving = guarded
    raw = b"\x0a" + b"\xff\xff\x3f" + b"x" * MAX_MESSAGE_BYTES  # one string field, too long
    assert asyncio.run(send_raw(port, method, raw)) is grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving()


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("n" * 65, grpc.StatusCode.INVALID_ARGUMENT),
        ("n" * 7000, grpc.StatusCode.INVALID_ARGUMENT),
        ("n" * 20000, grpc.StatusCode.RESOURCE_EXHAUSTED),  # over gRPC core's hard metadata limit
        ("-leading-dash", grpc.StatusCode.INVALID_ARGUMENT),
        ("semi;colon", grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["65-chars", "7000-chars", "20000-chars", "leading-dash", "semicolon"],
)
def test_a_bad_name_is_refused_on_every_method(
    guarded: tuple[Process, int, Callable[[], None]], name: str, status: grpc.StatusCode
) -> None:
    srv, port, still_serving = guarded
    for method in (GET, TELL, STATUS):
        # Sending no message: the name is checked before any is read.
        assert asyncio.run(send_raw(port, method, None, name=name)) is status, method
    if status is grpc.StatusCode.INVALID_ARGUMENT:
        srv.wait_for(r"WARNING refused a call from .*'client-id' must be", count=3)
    still_serving()


@pytest.mark.parametrize("name", ["tab\there", "bell\x07", "new\nline", "caf\u00e9"])
def test_a_name_with_control_or_non_ascii_characters_never_registers(
    guarded: tuple[Process, int, Callable[[], None]], name: str
) -> None:
    srv, port, still_serving = guarded
    code = asyncio.run(send_raw(port, GET, None, name=name))
    # gRPC itself refuses such a header value (INTERNAL, before it is sent).
    assert code is not grpc.StatusCode.CANCELLED  # CANCELLED would mean it registered
    assert srv.count(r"connected from") == 1  # only the bystander
    still_serving()


def test_a_flood_of_registrations_and_takeovers(
    guarded: tuple[Process, int, Callable[[], None]],
) -> None:
    srv, port, still_serving = guarded
    flood = 300

    async def attack() -> tuple[int, int]:
        # Each registration on a connection of its own, as separate clients
        # have: one connection carries at most 100 calls at once.
        own = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own) for _ in range(flood)
        ]
        calls = [
            contact_pb2_grpc.ContactStub(channel).getTask(
                contact_pb2.Empty(), metadata=((CLIENT_ID_KEY, f"flood-{i}"),)
            )
            for i, channel in enumerate(channels)
        ]
        echoed = await asyncio.gather(*(call.initial_metadata() for call in calls))
        registered = sum(md.get(CLIENT_ID_KEY, "").startswith("flood-") for md in echoed)
        for call in calls:
            call.cancel()
        await asyncio.gather(*(channel.close() for channel in channels))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contact_pb2_grpc.ContactStub(channel)
            twins = []
            for _ in range(50):  # each registration under one name replaces the last
                twin = stub.getTask(contact_pb2.Empty(), metadata=((CLIENT_ID_KEY, "twin"),))
                await twin.initial_metadata()
                twins.append(twin)
            codes = [await asyncio.wait_for(twin.code(), 5) for twin in twins[:-1]]
            twins[-1].cancel()
            return registered, codes.count(grpc.StatusCode.ABORTED)

    registered, replaced = asyncio.run(attack())
    assert (registered, replaced) == (flood, 49)
    # Said at most 5 a second for one host, and then counted: every one is told.
    srv.wait_for_total(r"client (flood-\d+|twin) disconnected", "disconnect", flood + 50)
    still_serving()


def test_a_batch_inside_a_batched_answer_is_refused(
    guarded: tuple[Process, int, Callable[[], None]],
) -> None:
    srv, port, still_serving = guarded
    inner = contact_pb2.Result(id="x-2", more=[contact_pb2.Result(id="x-3")])
    nested = contact_pb2.Result(id="x-1", ret="a", more=[inner]).SerializeToString()
    assert asyncio.run(send_raw(port, TELL, nested)) is grpc.StatusCode.INVALID_ARGUMENT
    srv.wait_for(r"an answer batched by attacker carries a batch of its own")
    still_serving()


def test_a_client_cannot_finish_a_task_held_by_another(
    guarded: tuple[Process, int, Callable[[], None]], client: Callable[..., Process]
) -> None:
    srv, port, still_serving = guarded
    holder = client("holder", port)
    holder.freeze()
    srv.type("@holder yours only")
    job = srv.wait_for(r"task (\S+) sent to holder").group(1)
    forged = contact_pb2.Result(id=job, ret="stolen").SerializeToString()
    assert asyncio.run(send_raw(port, TELL, forged)) is grpc.StatusCode.PERMISSION_DENIED
    srv.wait_for(rf"result for task {job} refused: attacker was never given it")
    holder.thaw()
    srv.wait_for(rf"task {job} result from holder: 'YOURS ONLY'$")
    assert srv.count("stolen") == 0
    still_serving()
