"""Real server and client processes for the tests and the demo: start them,
type into them, wait for their log lines (always with a timeout), signal them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

# The tests, soak and demo send SIGINT as Ctrl-C does. A shell that starts
# them in the background has SIGINT ignored, and every process started from
# it would inherit that (a `run()` client then ignores SIGINT): handle it as
# Python does by default, so that the processes started here begin with it.
signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent


class Process:
    """One of our scripts running as a child, its output collected as it comes."""

    def __init__(
        self,
        label: str,
        script: str,
        *args: str,
        echo: bool = False,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        encoding: str = "utf-8",
    ) -> None:
        self.label = label
        self.echo = echo
        self.lines: list[str] = []
        self._ended = False  # the output has ended: no more lines will come
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding=encoding,  # of what is typed in and what it prints
            # PYTHONPATH: helper scripts under tests/ import the project too.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})},
        )
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if self.echo:
                print(f"{self.label:>7} | {line}", end="", flush=True)
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(
        self, pattern: str, timeout: float = 10.0, count: int = 1, after: int = 0
    ) -> re.Match[str]:
        """The `count`-th output line from line `after` on that matches
        `pattern`; fail with the output so far if there is none within
        `timeout` seconds or the output ends first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for line in self.lines[after:] if (m := regex.search(line))]
                if len(matches) >= count:
                    return matches[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    raise AssertionError(
                        f"{self.label}: {len(matches)} of {count} lines matching {pattern!r} "
                        f"within {timeout} s (exit code {self.popen.poll()}); output:\n"
                        + "\n".join(self.lines)
                    )
                self._changed.wait(left)

    def task_id(self, text: str, timeout: float = 10.0) -> str:
        """The id the server gave the task typed as `text`: from its "queued
        for" line (logged when no client here may take it) or its "sent to" line."""
        line = rf"task (\S+) (?:queued for .*|sent to \S+): '{re.escape(text)}'$"
        return self.wait_for(line, timeout).group(1)

    def total(self, pattern: str, kind: str) -> int:
        """How many lines match `pattern`, counting too those the server left
        out of its log as `... and N more KIND lines from ...`."""
        summary = re.compile(rf"\.\.\. and (\d+) more {re.escape(kind)} lines from ")
        with self._changed:
            lines = list(self.lines)
        said = self.count(pattern)
        return said + sum(int(m.group(1)) for line in lines if (m := summary.search(line)))

    def wait_for_total(self, pattern: str, kind: str, count: int, timeout: float = 10.0) -> int:
        """Wait until `total(pattern, kind)` reaches `count`; fail with the
        output if it does not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:  # (reentrant: total() takes it too)
            while (total := self.total(pattern, kind)) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    raise AssertionError(
                        f"{self.label}: {total} of {count} {kind} lines within {timeout} s; "
                        f"output:\n{self.output}"
                    )
                self._changed.wait(left)  # for the next line
        return total

    def lines_since(self, index: int) -> list[str]:
        """The output lines from line `index` on (for reading long output as it grows)."""
        with self._changed:
            return self.lines[index:]

    def count(self, pattern: str) -> int:
        """How many output lines so far match `pattern`."""
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines if regex.search(line))

    def type(self, *lines: str) -> None:
        """Type lines into the process's standard input."""
        assert self.popen.stdin is not None
        self.popen.stdin.write("".join(line + "\n" for line in lines))
        self.popen.stdin.flush()

    def end_input(self) -> None:
        """Close the process's standard input, as Ctrl-D would."""
        assert self.popen.stdin is not None
        self.popen.stdin.close()

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def freeze(self, timeout: float = 5.0) -> None:
        """Suspend the process (SIGSTOP; on Windows, its threads) and return
        once it has really stopped: it then answers nothing, not even pings,
        yet its connections stay open."""
        import psutil  # a dev tool: `make demo` runs without it and freezes nothing

        process = psutil.Process(self.pid)
        process.suspend()
        deadline = time.monotonic() + timeout
        while process.status() != psutil.STATUS_STOPPED:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.label} did not stop within {timeout} s")
            time.sleep(0.01)

    def thaw(self) -> None:
        """Let a frozen process run again (SIGCONT)."""
        import psutil

        psutil.Process(self.pid).resume()

    def exit_code(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; fail if it does not within `timeout`."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as late:
            raise AssertionError(
                f"{self.label} still running after {timeout} s:\n{self.output}"
            ) from late

    def stop(self) -> None:
        """Kill the process if it is still running (test clean-up)."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        if self.popen.stdin and not self.popen.stdin.closed:
            self.popen.stdin.close()


@contextlib.contextmanager
def all_stopped() -> Iterator[list[Process]]:
    """A list to put the processes one starts in; each is killed, if still
    running, as the block ends."""
    running: list[Process] = []
    try:
        yield running
    finally:
        for process in running:
            process.stop()


def first_of(*expected: tuple[Process, str], timeout: float = 10.0) -> int:
    """Which of the (process, pattern) pairs has a matching output line first
    (its index); fail if none has within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for index, (process, pattern) in enumerate(expected):
            if process.count(pattern):
                return index
        with expected[0][0]._changed:  # the first's next line, or a short slice
            expected[0][0]._changed.wait(min(left, FIRST_OF_SLICE_SECONDS))
    raise AssertionError(f"none of {[pattern for _, pattern in expected]} within {timeout} s")


# How long first_of waits on the first process before it looks at the others.
FIRST_OF_SLICE_SECONDS = 0.02


def logged_at(line: str) -> float:
    """When a log line was written (LOG_FORMAT's timestamp), in seconds."""
    stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    assert stamp, line
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def free_port() -> int:
    """A port free on 127.0.0.1 right now, for a process that will not say
    which port it got (one that logs only warnings)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(*args: str, port: int = 0, echo: bool = False) -> tuple[Process, int]:
    """A contact_server.py on 127.0.0.1 (port 0: any free one), once listening."""
    server = Process("server", "contact_server.py", "--port", str(port), *args, echo=echo)
    listening = started(server, r"listening on 127\.0\.0\.1:(\d+)")
    return server, int(listening.group(1))


def start_client(name: str, port: int, *args: str, echo: bool = False) -> Process:
    """A contact_client.py named `name` of the server on `port`, once registered."""
    client = Process(
        name, "contact_client.py", "--server", f"127.0.0.1:{port}", "--name", name, *args, echo=echo
    )
    started(client, rf"registered with .* as {re.escape(name)}$")
    return client


def started(process: Process, pattern: str) -> re.Match[str]:
    """Wait for `process` to log `pattern`; if it does not, kill it before
    raising: the test never got it to hand to its clean-up."""
    try:
        return process.wait_for(pattern)
    except BaseException:
        process.stop()
        raise
