"""The fault test: one real server, many clients that join, answer, hang,
answer twice, vanish and rejoin at random, and a few real client processes
killed with SIGKILL, while thousands of tasks (some targeted) flow.

Some chaos clients hang holding their tasks for the whole round (their
leases must rescue those tasks), and each round has one poison task that
kills whoever takes it: real clients die of it (and are restarted), chaos
clients vanish.

At the end, from the server's own log: every task but the poison ones has
exactly one accepted result, with the right text; each poison task failed
after exactly --max-attempts deliveries; nothing is queued or in flight; and
the server's memory after every client has left is compared with where it
started.

With --journal, the server keeps its tasks in a journal and is SIGKILLed
--server-kills times a round, then started again on the same port and file
(lines it never logged as queued are typed again). Then a task may be
answered in two runs of the server, never twice in one; the journal's size
after each round shows whether it levels off.

    python -m tests.soak [--tasks 10000] [--chaos 40] [--hung 2] [--real 4] [--kills 5]
                         [--rounds 2] [--chaos-seconds 30] [--seed 1] [--seconds 240]
                         [--journal [--server-kills 3]]

`make soak` runs it at full size, without and with --journal; the test
suite runs a short version of each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from contact import CLIENT_ID_KEY, contact_pb2, contact_pb2_grpc
from tests.measure import rss_mb
from tests.processes import Process, start_server

MODES = ["answer"] * 5 + ["hang", "twice", "late"]
RESULT = re.compile(r"task (\S+) result from (\S+): '(.*)'$")
FAILED = re.compile(r"task (\S+) failed: sent (\d+) times without an answer: '(.*)'$")
POISON = "poison"  # the task text that kills whoever takes it (see tests/odd_client.py)
# The server the soak runs: small windows so that tasks move a lot, short
# leases so that hung clients are rescued within the round, and attempts
# enough that flapping chaos clients never fail an honest task.
SERVER_ARGS = ["--max-in-flight", "4", "--task-timeout", "2", "--max-attempts", "30"]
MAX_ATTEMPTS = 30
# A task's text, from the line that says it is kept: queued or recovered, or
# (a client here could take it at once) sent.
QUEUED = re.compile(
    r"task (\S+) (?:(?:queued|recovered) for (?:any client|\S+)|sent to \S+): '(.*)'$"
)


@dataclass
class Report:
    tasks: int = 0
    accepted: Counter[str] = field(default_factory=Counter)  # task id -> accepted results
    failed: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (text, attempts)
    poison_tasks: int = 0
    poison_deaths: int = 0  # real clients the poison killed
    leases_run_out: int = 0
    wrong_text: int = 0
    requeued: int = 0
    duplicates_ignored: int = 0
    refused: int = 0
    kills: int = 0
    chaos_sessions: int = 0
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_after_round_mb: list[float] = field(default_factory=list)  # all clients gone
    seconds: float = 0.0
    unanswered_at_shutdown: int = -1
    server_kills: int = 0
    twice_in_one_run: int = 0  # tasks one server process accepted two results for
    journal_bytes_after_round: list[tuple[int, int]] = field(default_factory=list)  # file, WAL
    journal_rows: dict[str, int] = field(default_factory=dict)  # by state, after the last stop

    def lines(self) -> list[str]:
        answered_twice = sum(n > 1 for n in self.accepted.values())
        sizes = ", ".join(
            f"{db // 1024} + {wal // 1024} KiB" for db, wal in self.journal_bytes_after_round
        )
        journal = [
            f"server kills: {self.server_kills}, tasks answered again after a kill: "
            f"{answered_twice}; journal size after each round (file + write-ahead log): "
            f"{sizes}; its rows after the last stop: {self.journal_rows}"
        ]
        return [
            f"tasks: {self.tasks}, answered: {len(self.accepted)}, "
            f"answered twice: {answered_twice}",
            f"chaos client sessions: {self.chaos_sessions}, real clients killed: {self.kills}",
            f"poison tasks failed: {len(self.failed)} of {self.poison_tasks} (after "
            + ", ".join(str(n) for _, n in self.failed.values())
            + f" deliveries), real clients it killed: {self.poison_deaths}, "
            f"leases run out: {self.leases_run_out}",
            f"redeliveries (requeued): {self.requeued}, duplicate results ignored: "
            f"{self.duplicates_ignored}, refused calls: {self.refused}",
            f"server memory (RSS): start {self.rss_start_mb:.1f} MB, "
            f"peak {self.rss_peak_mb:.1f} MB, after each round, all clients gone: "
            + ", ".join(f"{mb:.1f} MB" for mb in self.rss_after_round_mb),
            f"unanswered at shutdown: {self.unanswered_at_shutdown}; took {self.seconds:.1f} s",
        ] + (journal if self.server_kills else [])


class ServerLog:
    """Reads the server's output as it grows, tallying what the soak checks."""

    def __init__(self, server: Process, report: Report) -> None:
        self.report = report
        self.texts: dict[str, str] = {}  # task id -> typed text
        self.round_texts: set[str] = set()  # texts queued, recovered or sent this round
        self.follow(server)

    def follow(self, server: Process) -> None:
        """Read a new server process (started again on the same journal) from now on."""
        self.server, self.read = server, 0
        self.run_accepted: Counter[str] = Counter()

    def update(self) -> None:
        lines = self.server.lines_since(self.read)
        self.read += len(lines)
        for line in lines:
            if match := QUEUED.search(line):
                self.texts[match.group(1)] = match.group(2)
                self.round_texts.add(match.group(2))
            elif match := RESULT.search(line):
                task_id, _, text = match.groups()
                self.report.accepted[task_id] += 1
                self.run_accepted[task_id] += 1
                self.report.twice_in_one_run += self.run_accepted[task_id] == 2
                if text != self.texts.get(task_id, "").upper():
                    self.report.wrong_text += 1
            elif match := FAILED.search(line):
                self.report.failed[match.group(1)] = (match.group(3), int(match.group(2)))
            elif " taken back from " in line:
                self.report.leases_run_out += 1
            elif " requeued (" in line:
                self.report.requeued += 1
            elif "duplicate result" in line:
                self.report.duplicates_ignored += 1
            elif "refused" in line:
                self.report.refused += 1


async def chaos_session(
    port: int, name: str, rng: random.Random, calm: asyncio.Event, hung: bool
) -> None:
    """One connection of a misbehaving client, ended abruptly after a while
    (a `hung` one holds every task it gets, for as long as the round lasts)."""
    mode = "hang" if hung else "answer" if calm.is_set() else rng.choice(MODES)
    lifetime = 3600.0 if calm.is_set() or hung else rng.uniform(0.05, 1.0)
    held: list[contact_pb2.ServerMsg] = []
    metadata = ((CLIENT_ID_KEY, name),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = contact_pb2_grpc.ContactStub(channel)
        tasks = stub.getTask(contact_pb2.Empty(), metadata=metadata)
        calls: list[grpc.aio.Call] = [tasks]

        async def work() -> None:
            await tasks.initial_metadata()  # registered: only now are results accepted
            results = stub.tellResult(metadata=metadata)
            calls.append(results)
            async for task in tasks:
                if task.task == POISON:
                    return  # it "kills" this client: vanish at once
                held.append(task)
                if mode == "hang" or (mode == "late" and rng.random() < 0.5):
                    continue
                for _ in range(2 if mode == "twice" else 1):
                    await results.write(contact_pb2.Result(id=task.id, ret=task.task.upper()))

        with contextlib.suppress(
            asyncio.TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError
        ):
            await asyncio.wait_for(work(), lifetime)
        for call in calls:
            call.cancel()  # vanish: no goodbye
    if mode == "late" and held:  # answer, from a new connection, what we held before
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contact_pb2_grpc.ContactStub(channel)
            again = stub.getTask(contact_pb2.Empty(), metadata=metadata)  # results need one
            late = stub.tellResult(metadata=metadata)
            with contextlib.suppress(
                asyncio.TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError
            ):
                await asyncio.wait_for(again.initial_metadata(), 5)
                for task in held:
                    await late.write(contact_pb2.Result(id=task.id, ret=task.task.upper()))
                await late.done_writing()
                await asyncio.wait_for(late, 5)
            again.cancel()


async def chaos_client(
    port: int,
    name: str,
    rng: random.Random,
    calm: asyncio.Event,
    stop: asyncio.Event,
    report: Report,
    hung: bool = False,
) -> None:
    while not stop.is_set():
        report.chaos_sessions += 1
        session = asyncio.ensure_future(chaos_session(port, name, rng, calm, hung))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({session, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for waiting in (session, stopped):
            waiting.cancel()
        await asyncio.gather(session, stopped, return_exceptions=True)
        if not calm.is_set():
            await asyncio.sleep(rng.uniform(0, 0.3))


def real_client(name: str, port: int, wait: bool = True) -> Process:
    """A real client process (once registered, if `wait`); its handler dies
    of the poison task."""
    client = Process(name, "tests/odd_client.py", f"127.0.0.1:{port}", name)
    if wait:
        client.wait_for(rf"registered with .* as {name}$")
    return client


def kill_and_restart(real: list[Process], port: int, rng: random.Random, report: Report) -> None:
    index = rng.randrange(len(real))
    victim = real[index]
    victim.popen.kill()
    victim.exit_code(5)
    report.kills += 1
    real[index] = real_client(victim.label, port)


def restart_the_poisoned(real: list[Process], port: int, report: Report) -> None:
    for index, client in enumerate(real):
        if client.popen.poll() is not None:
            assert client.popen.returncode == 3, client.output  # the poison's exit code
            report.poison_deaths += 1
            real[index] = real_client(client.label, port, wait=False)  # the round goes on


class SoakServer:
    """The server under test, on one port for the whole soak; with a journal
    (in `folder`), it can be killed and started again on it."""

    def __init__(self, folder: Path | None) -> None:
        self.journal = None if folder is None else folder / "soak.journal"
        journal = [] if self.journal is None else ["--journal", str(self.journal)]
        self.args = [*SERVER_ARGS, *journal]
        self.process, self.port = start_server(*self.args)

    def kill_and_restart(self, log: ServerLog, typed: list[str], report: Report) -> None:
        """SIGKILL the server, start it again, and type again the lines it
        never logged as queued (a line may be lost until then)."""
        self.process.popen.kill()
        self.process.exit_code()
        log.update()
        self.process, _ = start_server(*self.args, port=self.port)
        log.follow(self.process)
        log.update()  # what it recovered
        self.process.type(*(line for line in typed if text_of(line) not in log.round_texts))
        report.server_kills += 1

    def journal_bytes(self) -> tuple[int, int]:
        """The sizes of the journal's file and of its write-ahead log."""
        assert self.journal is not None
        wal = self.journal.with_name(self.journal.name + "-wal")
        return self.journal.stat().st_size, wal.stat().st_size if wal.exists() else 0


def text_of(line: str) -> str:
    """The task text of a typed line (`@NAME TEXT` or `TEXT`)."""
    return line.partition(" ")[2] if line.startswith("@") else line


async def drive(
    server: SoakServer,
    args: argparse.Namespace,
    report: Report,
    log: ServerLog,
    round_: int,
) -> None:
    """One round: clients come and go while tasks flow, then all answer until
    every task of the round is finished, then all leave."""
    port = server.port
    log.round_texts.clear()
    rng = random.Random(f"{args.seed}-{round_}")
    names = [f"chaos-{i}" for i in range(args.chaos)]
    real = [real_client(f"real-{i}", port) for i in range(args.real)]
    calm, stop = asyncio.Event(), asyncio.Event()
    clients = [
        asyncio.ensure_future(
            chaos_client(
                port, name, random.Random(f"{args.seed}-{round_}-{name}"), calm, stop, report,
                hung=name.startswith("hung"),
            )
        )
        for name in names + [f"hung-{i}" for i in range(args.hung)]
    ]  # fmt: skip
    targets = names + [process.label for process in real]
    lines = [
        f"@{rng.choice(targets)} r{round_}t{i}" if rng.random() < 0.1 else f"r{round_}t{i}"
        for i in range(args.tasks)
    ]
    lines.insert(len(lines) // 3, POISON)
    report.tasks += len(lines)
    report.poison_tasks += 1
    ticks = max(1, int(args.chaos_seconds / 0.1))
    burst = -(-len(lines) // ticks)  # typed evenly across the chaos window
    kill_every = max(1, ticks // max(1, args.kills))
    server_kill_every = max(1, ticks // max(1, args.server_kills))
    deadline = time.monotonic() + args.seconds
    try:
        for tick in range(ticks):
            typed = lines[: (tick + 1) * burst]
            server.process.type(*lines[tick * burst : (tick + 1) * burst])
            if real and tick % kill_every == kill_every // 2:
                await asyncio.to_thread(kill_and_restart, real, port, rng, report)
            if args.journal and tick % server_kill_every == server_kill_every // 3:
                await asyncio.to_thread(server.kill_and_restart, log, typed, report)
            await asyncio.to_thread(restart_the_poisoned, real, port, report)
            await asyncio.sleep(0.1)
            log.update()
        calm.set()  # from now on every client answers, so the queue drains
        while len(report.accepted) + len(report.failed) < report.tasks:
            if time.monotonic() > deadline:
                raise AssertionError(f"not all tasks finished within {args.seconds} s")
            await asyncio.to_thread(restart_the_poisoned, real, port, report)
            await asyncio.sleep(0.1)
            log.update()
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        for process in real:
            process.send(signal.SIGINT)
            process.exit_code(10)


def soak(args: argparse.Namespace) -> Report:
    """Run the fault test; return its figures, or raise AssertionError with them."""
    report = Report()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="contact-soak-") as folder:
        server = SoakServer(Path(folder) if args.journal else None)
        try:
            run_rounds(server, args, report)
        finally:
            server.process.stop()
            report.seconds = time.monotonic() - started
    check(report, args)
    return report


def run_rounds(server: SoakServer, args: argparse.Namespace, report: Report) -> None:
    report.rss_start_mb = report.rss_peak_mb = rss_mb(server.process.pid)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            with contextlib.suppress(psutil.Error):  # killed by the soak a moment ago
                report.rss_peak_mb = max(report.rss_peak_mb, rss_mb(server.process.pid))

    threading.Thread(target=sample, daemon=True).start()
    log = ServerLog(server.process, report)
    for round_ in range(args.rounds):
        asyncio.run(drive(server, args, report, log, round_))
        process = server.process
        connects = process.total("connected from", "connect")
        process.wait_for_total(r"client \S+ disconnected", "disconnect", connects)
        log.update()
        report.rss_after_round_mb.append(rss_mb(process.pid))
        if args.journal:
            report.journal_bytes_after_round.append(server.journal_bytes())
    sampling.set()
    process.send(signal.SIGTERM)
    assert process.exit_code(10) == 0
    report.unanswered_at_shutdown = int(process.wait_for(r"tasks never answered: (\d+)").group(1))
    process.wait_for(r"shutting down: tasks queued: 0, in flight: 0")
    if server.journal is not None:
        with contextlib.closing(sqlite3.connect(server.journal)) as db:
            rows = db.execute("SELECT state, count(*) FROM tasks GROUP BY state")
            report.journal_rows = dict(rows.fetchall())


def check(report: Report, args: argparse.Namespace) -> None:
    figures = "\n".join(report.lines())
    poisoned = {task_id for task_id, (text, _) in report.failed.items() if text == POISON}
    assert len(poisoned) == report.poison_tasks, f"a poison task was not failed:\n{figures}"
    assert set(report.failed) == poisoned, f"an honest task failed:\n{figures}"
    assert all(n == MAX_ATTEMPTS for _, n in report.failed.values()), figures
    assert len(report.accepted) == report.tasks - len(poisoned), f"tasks lost:\n{figures}"
    assert report.twice_in_one_run == 0, f"a task answered twice by one server:\n{figures}"
    assert report.wrong_text == 0, f"{report.wrong_text} results with the wrong text:\n{figures}"
    assert report.unanswered_at_shutdown == 0, f"tasks left over:\n{figures}"
    if args.journal:
        # Across a kill, at most the answers not yet committed come twice.
        again = sum(n > 1 for n in report.accepted.values())
        assert again <= 100 * report.server_kills, f"answered again after kills:\n{figures}"
        # Answered tasks leave the journal; failed ones stay, for inspection.
        assert report.journal_rows == {"failed": len(poisoned)}, f"journal rows:\n{figures}"
        # The write-ahead log starts again from its beginning at each
        # automatic checkpoint (every 1,000 pages of 4 KiB).
        most_wal = max(wal for _, wal in report.journal_bytes_after_round)
        assert most_wal <= 5 * 2**20, f"the write-ahead log outgrew its checkpoints:\n{figures}"
        return  # the server was started again: its memory is not comparable
    # CPython keeps memory it has freed, so the first round sets the level;
    # state left behind by clients or tasks would raise it again each round.
    grown = report.rss_after_round_mb[-1] - report.rss_after_round_mb[0]
    assert grown < args.max_growth_mb, f"memory grew {grown:.1f} MB after round 1:\n{figures}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--chaos", type=int, default=40, help="misbehaving in-process clients")
    parser.add_argument("--hung", type=int, default=2, help="clients that never answer")
    parser.add_argument(
        "--real", type=int, default=4, help="real client processes, killed at random"
    )
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs of real clients per round")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chaos-seconds", type=float, default=30, help="how long tasks flow")
    parser.add_argument("--seconds", type=float, default=240, help="give up after this long")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the same load")
    parser.add_argument(
        "--max-growth-mb", type=float, default=3, help="allowed RSS growth after the first round"
    )
    parser.add_argument("--journal", action="store_true", help="a journal, and server kills")
    parser.add_argument("--server-kills", type=int, default=3, help="SIGKILLs a round")
    return parser.parse_args(argv)


def main() -> int:
    args = parse()
    try:
        report = soak(args)
    except AssertionError as failure:
        print(f"soak FAILED: {failure}")
        return 1
    print("\n".join([f"soak passed (seed {args.seed}):", *report.lines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
