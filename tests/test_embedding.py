"""Building on it from code: `pip install .`, many run() clients in one
process (each with a connection of its own), and a terminal that idle
clients leave quiet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.processes import ROOT, Process, start_client, start_server

CLIENTS_IN_ONE_PROCESS = 1000
IDLE_SECONDS = 30.0


@pytest.mark.alone
def test_a_thousand_run_clients_in_one_process_all_register_and_answer(
    processes: list[Process],
) -> None:
    srv, port = start_server()
    processes.append(srv)
    many = Process(
        "many", "tests/many_clients.py", f"127.0.0.1:{port}", str(CLIENTS_IN_ONE_PROCESS)
    )
    processes.append(many)
    many.wait_for(r"registered with .* as many-\d+$", count=CLIENTS_IN_ONE_PROCESS, timeout=40)
    established = [
        connection
        for connection in psutil.Process(srv.pid).net_connections("tcp")
        if connection.status == psutil.CONN_ESTABLISHED and connection.laddr.port == port
    ]
    assert len(established) == CLIENTS_IN_ONE_PROCESS  # a connection of its own each
    # Each task waits for its client, so each client answers exactly one.
    srv.type(*(f"@many-{n} task {n}" for n in range(CLIENTS_IN_ONE_PROCESS)))
    done = many.wait_for(r"(\d+) clients answered in (\S+) s", timeout=30)
    print(done.group(0))
    assert many.exit_code(30) == 0, many.output
    srv.wait_for(r"result from many-\d+: 'TASK \d+'$", count=CLIENTS_IN_ONE_PROCESS)
    assert "WARNING" not in many.output and "Traceback" not in many.output, many.output


def test_idle_clients_make_no_line_on_the_server(processes: list[Process]) -> None:
    srv, port = start_server()
    processes.append(srv)
    clients = [start_client(f"idle-{n}", port, "--log-level", "DEBUG") for n in range(5)]
    processes.extend(clients)
    srv.wait_for(r"client idle-4 connected")
    quiet_from, began = len(srv.lines), time.monotonic()
    # A client sends its first status line as it registers, then one every
    # 5 s: its seventh answer comes 30 s after its registration. The last
    # client's comes last, 30 s after `quiet_from`.
    for client in clients:
        registered = client.wait_for(r"registered with")
        mark = client.lines.index(registered.string)
        left = IDLE_SECONDS + 10 - (time.monotonic() - began)
        client.wait_for(r"server acknowledged status", timeout=left, count=7, after=mark)
    idle = time.monotonic() - began
    print(f"5 idle clients, {idle:.1f} s, 35 status lines answered")
    assert idle >= IDLE_SECONDS - 0.5  # (the first answer may come a moment before `began`)
    assert srv.lines_since(quiet_from) == []


def test_pip_install_puts_the_package_and_both_scripts_on_the_path(tmp_path: Path) -> None:
    source, site = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for name in ("contact_server.py", "contact_client.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "contact", source / "contact", ignore=shutil.ignore_patterns("__py*"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    installed = subprocess.run(
        [*pip, "--no-deps", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    imports = (
        "import contact, contact_client, contact_server\n"
        "from contact_server import ContactServer, TaskHandle, TaskError\n"
        "from contact_client import run\n"
        "for module in (contact, contact_client, contact_server): print(module.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}  # grpcio and protobuf from this interpreter
    imported = subprocess.run(
        [sys.executable, "-c", imports], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr
    assert all(line.startswith(str(site)) for line in imported.stdout.splitlines()), imported.stdout
    assert (site / "contact" / "contact.proto").is_file()
    assert (site / "contact" / "server" / "status.html").is_file()  # the status page
