"""Seeing inside a server: reflection, `stats()` and `clients()`, Prometheus
metrics and the status page (docs/operations.md), with real client
processes; the page in a real browser (headless Chromium)."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from contact import CLIENT_ID_KEY, contact_pb2, contact_pb2_grpc
from contact.server import stats
from contact.server.stats import RATE_SLOT_SECONDS, RATE_SLOTS, RECENT_FAILURES, RefusalCounter
from contact.server.status import MAX_REQUESTS
from contact.waits import within
from contact_server import ContactServer
from tests.installed import required
from tests.processes import Process, start_client, start_server

CHROMIUM_HINT = "chromium is not installed: apt-get install chromium (Debian)"


def fetch(url: str) -> tuple[int, str, str]:
    """GET `url`: its status, content type and body (an HTTP error's too)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_reflection_lists_the_service_and_a_call_made_from_its_descriptors_works(
    processes: list[Process],
) -> None:
    server, port = start_server()
    processes.append(server)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "contact.Contact" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("contact.Contact").FindMethodByName("getTask")
        request = message_factory.GetMessageClass(method.input_type)
        reply = message_factory.GetMessageClass(method.output_type)
        get_task = channel.unary_stream(
            "/contact.Contact/getTask",
            request_serializer=request.SerializeToString,
            response_deserializer=reply.FromString,
        )
        stream = get_task(request(), metadata=((CLIENT_ID_KEY, "reflected"),))
        server.wait_for(r"client reflected connected")
        server.type("@reflected found by reflection")
        message = next(stream)
        assert message.task == "found by reflection"  # (a class made from the descriptors)
        stream.cancel()


def test_no_reflection_turns_it_off(processes: list[Process]) -> None:
    server, port = start_server("--no-reflection")
    processes.append(server)
    with (
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_metrics_port_in_use_is_one_line_and_exit_1(processes: list[Process]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Process("server", "contact_server.py", "--port", "0", "--metrics-port", str(port))
        processes.append(server)
        assert server.exit_code(10) == 1
    assert f"ERROR cannot serve metrics on 127.0.0.1:{port}: " in server.lines[-1]
    assert "Traceback" not in server.output


def test_stats_clients_and_metrics_match_two_probes_and_five_answered_tasks(
    processes: list[Process],
) -> None:
    async def scenario() -> None:
        async with ContactServer(port=0, grace=0, metrics_port=0) as server:
            began = time.time()
            for name in ("probe1", "probe2"):
                processes.append(await asyncio.to_thread(start_client, name, server.port))
            answers = await asyncio.gather(*(server.ask(f"task {n}") for n in range(5)))
            assert sorted(answers) == [f"TASK {n}" for n in range(5)]
            waiting = [await server.submit(f"for nobody {n}", "nobody") for n in range(2)]
            assert waiting[0].cancel()
            await refused_once(server.port)
            await left_holding_a_task(server, processes)

            stats = server.stats()
            assert (stats.clients, stats.queued, stats.in_flight) == (2, 2, 0)
            assert (stats.queued_for_any, stats.queued_for) == (0, {"nobody": 1, "gone": 1})
            assert (stats.submitted, stats.answered, stats.failed, stats.cancelled) == (8, 5, 0, 1)
            assert {code: n for code, n in stats.refused.items() if n} == {"INVALID_ARGUMENT": 1}
            assert {why: n for why, n in stats.requeued.items() if n} == {"left": 1}
            assert sum(stats.durations) == 5
            # Submit times go as each task is answered, or with its outcome
            # (the cancelled task's goes with its handle): two are left.
            assert len(server._submitted_at) == 3
            del waiting[0]
            gc.collect()
            assert len(server._submitted_at) == 2
            clients = server.clients()
            assert [client.name for client in clients] == ["probe1", "probe2"]
            assert sum(client.answered for client in clients) == 5
            for client in clients:
                assert re.fullmatch(r"ipv4:127\.0\.0\.1:\d+", client.address), client.address
                assert (client.window, client.in_flight) == (4, 0)
                assert began <= client.connected_since <= client.last_heard <= time.time()

            base = f"http://127.0.0.1:{server.metrics_port}"
            status, kind, text = await asyncio.to_thread(fetch, base + "/metrics")
            assert status == 200 and kind.startswith("text/plain"), (status, kind)
            metrics = metrics_of(text)
            assert {name: n for name, n in metrics.items() if n} == {
                "contact_clients_connected": 2,
                "contact_tasks_queued": 2,
                "contact_tasks_submitted_total": 8,
                "contact_tasks_total{outcome=answered}": 5,
                "contact_tasks_total{outcome=cancelled}": 1,
                "contact_requeues_total{reason=left}": 1,
                "contact_calls_refused_total{code=INVALID_ARGUMENT}": 1,
                "contact_task_answer_seconds_count": 5,
            }
            # Every outcome, reason and code has its series from the start.
            assert metrics["contact_tasks_total{outcome=failed}"] == 0
            assert metrics["contact_requeues_total{reason=lease_expired}"] == 0
            assert metrics["contact_calls_refused_total{code=UNKNOWN}"] == 0
            status, kind, text = await asyncio.to_thread(fetch, base + "/status.json")
            assert (status, kind) == (200, "application/json")
            shown = json.loads(text)
            assert [client["name"] for client in shown["clients"]] == ["probe1", "probe2"]
            assert shown["stats"]["answered"] == 5
            status, kind, text = await asyncio.to_thread(fetch, base + "/")
            assert status == 200 and kind.startswith("text/html") and "status.json" in text
            assert (await asyncio.to_thread(fetch, base + "/nothing"))[0] == 404

    asyncio.run(scenario())


async def left_holding_a_task(server: ContactServer, processes: list[Process]) -> None:
    """A client named gone takes a task for it, hangs, and is killed: the
    task is queued again for it (requeued: left)."""
    gone = await asyncio.to_thread(start_client, "gone", server.port)
    processes.append(gone)
    gone.freeze()
    await server.submit("held when it died", "gone")
    await until(lambda: server.stats().in_flight == 1)
    gone.send(signal.SIGKILL)
    await until(lambda: server.stats().requeued["left"] == 1)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `condition()`, looked at every 10 ms on the server's loop
    (asyncio.TimeoutError after `timeout` seconds)."""

    async def looked_at() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await within(looked_at(), timeout)


async def refused_once(port: int) -> None:
    """One call the server refuses: getTask with a name against the rule."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream("/contact.Contact/getTask")(
            b"", metadata=((CLIENT_ID_KEY, "no spaces allowed"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# What metrics_of keeps: each sample's name, with its label if it has one.
KEPT = re.compile(r"contact_(clients|tasks|requeues|calls_refused|task_answer_seconds_count)")


def metrics_of(text: str) -> dict[str, float]:
    """The samples of `text` (Prometheus's text format, parsed by
    prometheus-client's own parser) that KEPT names, by name{label=value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sample.labels.items())
            name = sample.name + (f"{{{labels}}}" if labels else "")
            if KEPT.match(name) and not name.endswith("_created"):
                samples[name] = sample.value
    return samples


def test_the_status_page_in_a_browser_shows_the_clients_and_a_changing_count(
    processes: list[Process], tmp_path: Path
) -> None:
    chromium = required(shutil.which("chromium") or shutil.which("chromium-browser"), CHROMIUM_HINT)
    server, port = start_server("--metrics-port", "0")
    processes.append(server)
    metrics_port = server.wait_for(r"status page at http://127\.0\.0\.1:(\d+)/")[1]
    page = f"http://127.0.0.1:{metrics_port}/"
    for name in ("alice", "bob"):
        processes.append(start_client(name, port))
    server.type(*(f"first {n}" for n in range(3)))
    server.wait_for(r"result from", count=3)
    first = answered_on(browse(chromium, page, "--dump-dom"))
    server.type(*(f"second {n}" for n in range(4)))
    server.wait_for(r"result from", count=7)
    dom = browse(chromium, page, "--dump-dom")
    assert "alice" in dom and "bob" in dom
    assert (first, answered_on(dom)) == (3, 7)
    shot = tmp_path / "status.png"
    browse(chromium, page, f"--screenshot={shot}", "--window-size=412,915")
    assert shot.read_bytes().startswith(b"\x89PNG")


# How long the browser's clock may run for the page's first refresh (it
# stands still while the page waits for the server).
BROWSER_BUDGET_MS = 3000


def browse(chromium: str, url: str, *args: str) -> str:
    """Open `url` in headless Chromium, let its scripts run, and return
    what it printed (with --dump-dom, the page as it then stood)."""
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--virtual-time-budget={BROWSER_BUDGET_MS}", *args, url],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def answered_on(dom: str) -> int:
    """The page's count of answered tasks."""
    found = re.search(r'<b id="answered">(\d+)</b>', dom)
    assert found, dom
    return int(found[1])


class Crashing(contact_pb2_grpc.ContactServicer):  # type: ignore[misc]
    """rpcs that end badly, each its own way."""

    async def getTask(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        yield contact_pb2.ServerMsg(id="1", task="one")
        raise ValueError("a bug in a streaming handler")

    async def tellResult(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused")

    async def sendStatus(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        yield contact_pb2.Result(ret="hello")
        await asyncio.Event().wait()  # until the client hangs up


def test_the_refusal_counter_counts_aborts_and_crashes_not_hang_ups() -> None:
    async def scenario() -> Counter[str]:
        refused: Counter[str] = Counter()
        server = grpc.aio.server(interceptors=[RefusalCounter(refused)])
        contact_pb2_grpc.add_ContactServicer_to_server(Crashing(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contact_pb2_grpc.ContactStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as crashed:
                async for _ in stub.getTask(contact_pb2.Empty()):
                    pass
            assert crashed.value.code() == grpc.StatusCode.UNKNOWN
            with pytest.raises(grpc.aio.AioRpcError) as aborted:
                await stub.tellResult(iter([contact_pb2.Result(id="1")]))
            assert aborted.value.code() == grpc.StatusCode.PERMISSION_DENIED
            hung_up = stub.sendStatus(iter([contact_pb2.ClientMsg(msg="hi")]))
            assert (await hung_up.read()).ret == "hello"
            hung_up.cancel()
        await server.stop(1)  # (the hung-up call's end is seen by then)
        return refused

    assert asyncio.run(scenario()) == {"UNKNOWN": 1, "PERMISSION_DENIED": 1}


def test_the_rate_counts_answers_per_slot_and_the_failures_keep_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1_000_000.0]  # (a slot's start)
    monkeypatch.setattr(stats, "time", SimpleNamespace(time=lambda: now[0]))
    tally = stats.Tally()
    first = int(now[0]) // RATE_SLOT_SECONDS
    for _ in range(10):
        tally.answered()
    now[0] += RATE_SLOT_SECONDS + 0.5
    for _ in range(5):
        tally.answered()
    now[0] += 3 * RATE_SLOT_SECONDS  # two slots with none, and one still filling
    rate = tally.rate()
    assert len(rate) == RATE_SLOTS
    assert rate[-4:] == [
        (first * RATE_SLOT_SECONDS, 10 / RATE_SLOT_SECONDS),
        ((first + 1) * RATE_SLOT_SECONDS, 5 / RATE_SLOT_SECONDS),
        ((first + 2) * RATE_SLOT_SECONDS, 0.0),
        ((first + 3) * RATE_SLOT_SECONDS, 0.0),
    ]
    assert sum(answers for _, answers in rate[:-4]) == 0
    now[0] += RATE_SLOTS * RATE_SLOT_SECONDS  # the whole chart later: all gone
    assert [answers for _, answers in tally.rate()] == [0.0] * RATE_SLOTS

    for n in range(RECENT_FAILURES + 5):
        tally.failed(f"t{n}", "bob" if n % 2 else None, f"why {n}")
    assert [failure.task_id for failure in tally.failures] == [
        f"t{n}" for n in range(5, RECENT_FAILURES + 5)
    ]
    last = RECENT_FAILURES + 4
    assert tally.failures[-1] == stats.Failure(
        now[0], f"t{last}", "bob" if last % 2 else None, f"why {last}"
    )
    assert tally.outcomes["failed"] == RECENT_FAILURES + 5


def test_the_page_answers_its_own_names_only_and_a_flood_gets_503(
    processes: list[Process],
) -> None:
    server, _ = start_server("--metrics-port", "0")
    processes.append(server)
    port = int(server.wait_for(r"status page at http://127\.0\.0\.1:(\d+)/")[1])
    assert asked(port, "/status.json", "127.0.0.1").startswith("HTTP/1.0 200")
    assert asked(port, "/status.json", "localhost").startswith("HTTP/1.0 200")
    # A name that is not this server's: a page rebound to this address.
    assert asked(port, "/status.json", "evil.example").startswith("HTTP/1.0 403")
    assert asked(port, "/", "evil.example").startswith("HTTP/1.0 403")
    assert asked(port, "/metrics", "evil.example").startswith("HTTP/1.0 200")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_REQUESTS)]
    try:
        for connection in idle:  # each holds a thread, its request never finished
            connection.sendall(b"GET / HTTP/1.1\r\n")
        assert asked(port, "/metrics", "127.0.0.1").startswith("HTTP/1.1 503")
    finally:
        for connection in idle:
            connection.close()
    assert asked(port, "/metrics", "127.0.0.1", tries=50).startswith("HTTP/1.0 200")


def asked(port: int, path: str, host: str, tries: int = 1) -> str:
    """The raw HTTP reply to GET `path` with this Host header; up to `tries`
    times while the reply is a 503 (a slot freed a moment later)."""
    for _ in range(tries):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            reply = b"".join(iter(lambda: connection.recv(65536), b"")).decode()
        if not reply.startswith("HTTP/1.1 503"):
            break
        time.sleep(0.05)  # (a slot is freed as its thread ends: nothing to wait on from here)
    return reply
