"""Seeing inside a server: reflection, `stats()` and `clients()`, Prometheus
metrics and the status page (docs/operations.md), with real client
processes; the page in a real browser (headless Chromium)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from contact import CLIENT_ID_KEY
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

            stats = server.stats()
            assert (stats.clients, stats.queued, stats.in_flight) == (2, 1, 0)
            assert (stats.queued_for_any, stats.queued_for) == (0, {"nobody": 1})
            assert (stats.submitted, stats.answered, stats.failed, stats.cancelled) == (7, 5, 0, 1)
            assert stats.refused == {"INVALID_ARGUMENT": 1}
            assert sum(stats.durations) == 5
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
            assert metrics_of(text) == {
                "contact_clients_connected": 2,
                "contact_tasks_queued": 1,
                "contact_tasks_in_flight": 0,
                "contact_tasks_submitted_total": 7,
                "contact_tasks_total{outcome=answered}": 5,
                "contact_tasks_total{outcome=failed}": 0,
                "contact_tasks_total{outcome=cancelled}": 1,
                "contact_calls_refused_total{code=INVALID_ARGUMENT}": 1,
                "contact_task_answer_seconds_count": 5,
            }
            status, kind, text = await asyncio.to_thread(fetch, base + "/status.json")
            assert (status, kind) == (200, "application/json")
            shown = json.loads(text)
            assert [client["name"] for client in shown["clients"]] == ["probe1", "probe2"]
            assert shown["stats"]["answered"] == 5
            status, kind, text = await asyncio.to_thread(fetch, base + "/")
            assert status == 200 and kind.startswith("text/html") and "status.json" in text
            assert (await asyncio.to_thread(fetch, base + "/nothing"))[0] == 404

    asyncio.run(scenario())


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
KEPT = re.compile(r"contact_(clients|tasks|calls_refused|task_answer_seconds_count)")


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
