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

from tests.processes import ROOT, Process, start_client, start_server

CLIENTS_IN_ONE_PROCESS = 1000
IDLE_SECONDS = 30.0


def test_a_thousand_run_clients_in_one_process_all_register_and_answer(
    processes: list[Process],
) -> None:
    srv, port = start_server()
    processes.append(srv)
    # Each task waits for its client, so each client answers exactly one.
    srv.type(*(f"@many-{n} task {n}" for n in range(CLIENTS_IN_ONE_PROCESS)))
    srv.wait_for(r"queued for many-999: 'task 999'$")
    many = Process(
        "many", "tests/many_clients.py", f"127.0.0.1:{port}", str(CLIENTS_IN_ONE_PROCESS)
    )
    processes.append(many)
    done = many.wait_for(r"(\d+) clients answered in (\S+) s", timeout=45)
    print(done.group(0))
    assert many.exit_code(30) == 0, many.output
    srv.wait_for(r"client many-\d+ connected from", count=CLIENTS_IN_ONE_PROCESS)
    srv.wait_for(r"result from many-\d+: 'TASK \d+'$", count=CLIENTS_IN_ONE_PROCESS)
    peers = {line.rsplit(":", 1)[1] for line in srv.lines if "connected from" in line}
    assert len(peers) == CLIENTS_IN_ONE_PROCESS  # a connection (a port) of its own each
    assert "WARNING" not in many.output and "Traceback" not in many.output, many.output


def test_idle_clients_make_no_line_on_the_server(processes: list[Process]) -> None:
    srv, port = start_server()
    processes.append(srv)
    clients = []
    for n in range(5):
        clients.append(start_client(f"idle-{n}", port, "--log-level", "DEBUG"))
        processes.append(clients[-1])
    srv.wait_for(r"client idle-4 connected")
    quiet_from = len(srv.lines)
    marks = [len(client.lines) for client in clients]
    began = time.monotonic()
    for client, mark in zip(clients, marks, strict=True):
        # Each status line is answered: seven more answers from each client
        # span at least 30 s at the default period of 5 s.
        left = IDLE_SECONDS + 15 - (time.monotonic() - began)
        client.wait_for(r"server acknowledged status", timeout=left, count=7, after=mark)
    idle = time.monotonic() - began
    print(f"5 idle clients, {idle:.1f} s, 35 status lines answered")
    assert idle >= IDLE_SECONDS
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
