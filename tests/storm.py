"""The reconnect storm: clients spread by haproxy over two servers of a
fleet (one throwaway PostgreSQL); one server is SIGKILLed; how long until
every client it had is registered again, through haproxy, with the other
(their jittered backoff spreads them), and the survivor's peak RSS.

    python -m tests.storm [--clients 2000] [--processes 4]

It prints the figures and exits 1 if the clients took longer than
BACK_WITHIN_SECONDS. tests/test_fleet.py runs it small; `make soak` runs
it at full size. Registrations are counted in the database
(contact_clients), where each server records its clients.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from contact import contact_pb2
from contact.cli import LOG_FORMAT
from contact_client import run
from tests.haproxy import Haproxy
from tests.haproxy import installed as haproxy_installed
from tests.postgres import INSTALL_HINT, Postgres, binaries
from tests.processes import Process, start_server

BACK_WITHIN_SECONDS = 30.0  # the target: every client of the killed server back
REGISTERED_SECONDS = 300.0  # for all the clients to register at first (2,000 on 2 cores)
CHECK_EVERY_SECONDS = 0.1  # how often the database is asked (a measurement, not a test wait)


async def echo(task: contact_pb2.ServerMsg) -> str:
    return task.task.upper()


async def clients(server: str, count: int, prefix: str) -> None:
    """`count` run() clients of `server`, named PREFIX-N, until killed."""
    await asyncio.gather(*(run(echo, server, f"{prefix}-{n}") for n in range(count)))


@dataclass
class Storm:
    clients: int
    moved: int  # clients of the killed server
    back_seconds: float  # from the kill until each of them was registered again
    survivor_peak_rss_mb: float


def registered(postgres: Postgres, url: str, server: str | None = None) -> int:
    where = "" if server is None else f" WHERE server = '{server}'"
    return int(postgres.psql(url, f"SELECT count(*) FROM contact_clients{where}"))


def wait_for_registered(
    postgres: Postgres, url: str, count: int, server: str | None, within: float
) -> None:
    """Until `count` clients are registered (with `server`, if given)."""
    ends = time.monotonic() + within
    while (now := registered(postgres, url, server)) < count:
        if time.monotonic() > ends:
            raise AssertionError(f"{now} of {count} clients registered within {within:.0f} s")
        time.sleep(CHECK_EVERY_SECONDS)


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of a running process (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM: not Linux?")


def storm(postgres: Postgres, url: str, program: str, count: int, processes: int) -> Storm:
    """Two servers on `url`, haproxy in front, `count` clients in
    `processes` processes; kill one server; measure."""
    started: list[Process] = []
    balancer = None
    try:
        a, port_a = start_server("--queue", url)
        started.append(a)
        b, port_b = start_server("--queue", url)
        started.append(b)
        balancer = Haproxy(program, [port_a, port_b])
        for index in range(processes):
            share = count // processes + (index < count % processes)
            arguments = ["clients", f"127.0.0.1:{balancer.port}", str(share), f"c{index}"]
            started.append(Process(f"c{index}", "tests/storm.py", *arguments))
        wait_for_registered(postgres, url, count, None, REGISTERED_SECONDS)
        joined = r"joined as server (\w+)"
        server_a, server_b = a.wait_for(joined).group(1), b.wait_for(joined).group(1)
        moved = registered(postgres, url, server_a)
        a.send(signal.SIGKILL)
        killed = time.monotonic()
        wait_for_registered(postgres, url, count, server_b, REGISTERED_SECONDS)
        back = time.monotonic() - killed
        return Storm(count, moved, back, peak_rss_mb(b.pid))
    finally:
        for process in started:
            process.stop()
        if balancer is not None:
            balancer.stop()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "clients":
        logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
        asyncio.run(clients(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    found = binaries()
    if found is None:
        print(f"storm skipped: {INSTALL_HINT}")
        return 0
    program = haproxy_installed()
    postgres = Postgres(found)
    try:
        url = postgres.new_database("storm")
        result = storm(postgres, url, program, args.clients, args.processes)
    finally:
        postgres.stop()
    print(
        f"{result.clients} clients, {result.moved} on the killed server: all registered again"
        f" with the other {result.back_seconds:.1f} s after the kill (target:"
        f" {BACK_WITHIN_SECONDS:.0f} s); the survivor's peak RSS"
        f" {result.survivor_peak_rss_mb:.0f} MB"
    )
    return 0 if result.back_seconds <= BACK_WITHIN_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
