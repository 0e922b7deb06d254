"""Log lines: text from outside (task texts, answers, status lines, ids)
made safe to put in one, repeated lines limited (REPEATS), the scripts'
handler that writes lines in batches, and `retrieved`, which keeps asyncio
from logging errors nobody asked for."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

# The scripts' log lines are written together, at most this long after they
# are logged: too little for a person to see, and under load one write
# carries hundreds of lines.
LOG_BATCH_SECONDS = 0.02
# Held lines are written at once when there are this many, so memory stays
# bounded however fast lines come.
MAX_HELD_LINES = 1000

# Longer texts are cut in log lines: a 512 KiB task would drown the log.
MAX_LOGGED_CHARS = 200


class Quoted:
    """`text` quoted for a log line: control characters escaped, so a client
    cannot forge log lines, and very long texts cut. The work is done only
    if the line is written, so a quiet server does not pay for it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        if len(self.text) > MAX_LOGGED_CHARS:
            cut = self.text[:MAX_LOGGED_CHARS]
            return f"{cut!r}... ({len(self.text)} characters)"
        return repr(self.text)


def counted(number: int, noun: str) -> str:
    """`1 task`, `2 tasks`: a count for a log line."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


# Lines of one kind from one client (or host) that are logged in a second;
# past that they are counted, and one line says how many were left out.
LINES_PER_SECOND = 5
# Clients whose counts are kept at once: an attacker with many names must
# not grow the limiter without bound. Past it, one line says how many lines
# the counts held, and counting starts again: no count is dropped unsaid.
MAX_COUNTED = 10_000


class Repeats:
    """Rate-limits repeated log lines per (kind, client), so that one client
    cannot flood the log with status lines, refusals or stray results."""

    def __init__(
        self, per_second: int = LINES_PER_SECOND, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second, self._clock = per_second, clock
        self._counts: dict[
            tuple[str, str], list[float]
        ] = {}  # -> [second started, lines, left out]

    def log(
        self, logger: logging.Logger, level: int, kind: str, who: str, message: str, *args: object
    ) -> None:
        """Log `message % args` unless `who` has had `per_second` lines of
        `kind` this second; then count it, and say so when the second is over."""
        now = self._clock()
        counts = self._counts.get((kind, who))
        if counts is None or now - counts[0] >= 1.0:
            if counts is not None and counts[2]:
                logger.warning("... and %d more %s lines from %s", counts[2], kind, who)
            if len(self._counts) >= MAX_COUNTED:
                self._say_all_and_forget(logger)
            counts = self._counts[(kind, who)] = [now, 0, 0]
        if counts[1] < self.per_second:
            counts[1] += 1
            logger.log(level, message, *args)
        else:
            counts[2] += 1

    def _say_all_and_forget(self, logger: logging.Logger) -> None:
        left_out = sum(int(counts[2]) for counts in self._counts.values())
        if left_out:
            logger.warning(
                "... and %d more lines from %d clients or hosts (too many to count apart)",
                left_out,
                len(self._counts),
            )
        self._counts.clear()

    def flush(self, logger: logging.Logger, everything: bool = False) -> None:
        """Say how many lines were left out in seconds that are over (or in
        any second, if `everything`: at exit)."""
        now = self._clock()
        for (kind, who), counts in list(self._counts.items()):
            if everything or now - counts[0] >= 1.0:
                if counts[2]:
                    logger.warning("... and %d more %s lines from %s", counts[2], kind, who)
                del self._counts[(kind, who)]


REPEATS = Repeats()  # one for the process, as its log is


class GrpcDecodeErrors(logging.Filter):
    """grpc logs an error and a traceback for each request it cannot decode
    (bytes that are no valid message for a call with one request), before
    our code sees the call, and ends the call with UNKNOWN. Such lines are
    counted here instead, and said as one line a second at most."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(UNDECODABLE):
            return True
        REPEATS.log(
            self._logger,
            logging.WARNING,
            "undecodable request",
            "grpc",
            "refused a request that is no valid message (grpc answers UNKNOWN)",
        )
        return False


# How grpc.aio's server (logger grpc._cython.cygrpc) starts the line it logs
# for a request it could not decode, with grpcio 1.85: recheck on upgrades
# (tests/test_bounded.py fails if it changes).
UNDECODABLE = "Unexpected [DecodeError] raised by servicer method"
GRPC_SERVER_LOGGER = "grpc._cython.cygrpc"


def summarise_grpc_decode_errors(logger: logging.Logger) -> None:
    """Put GrpcDecodeErrors on grpc.aio's server logger, once per process."""
    grpc_logger = logging.getLogger(GRPC_SERVER_LOGGER)
    if not any(isinstance(f, GrpcDecodeErrors) for f in grpc_logger.filters):
        grpc_logger.addFilter(GrpcDecodeErrors(logger))


class BatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The scripts' log handler: it writes to standard error, holding the
    lines logged on the event loop for up to LOG_BATCH_SECONDS and writing
    them in one system call (a write per line, each waking the terminal or
    pipe that reads it, was the largest cost of a typed task after gRPC's
    own). A line logged off the loop is written at once, with any held
    before it. A clean exit writes what is held (logging.shutdown flushes),
    and the journal has it written before each commit (write_held_lines), so
    a kill loses only the lines of its last moments. Lines that cannot be
    written (standard error closed, a broken pipe) are dropped, as logging
    drops a line it cannot write: the server carries on."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[str] = []
        self._last: logging.LogRecord | None = None  # for handleError
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # whose timer will flush

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._held.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        self._last = record
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread: write now
            self.flush()
            return
        if len(self._held) >= MAX_HELD_LINES:
            self.flush()
        elif self._timer_loop is not loop:  # (a loop that ended may have left lines)
            self._timer_loop = loop
            loop.call_later(LOG_BATCH_SECONDS, self.flush)

    def flush(self) -> None:
        self.acquire()  # (also held by emit: the lock is reentrant)
        try:
            held, self._held, self._timer_loop = self._held, [], None
            if self.stream is None:
                return
            try:
                if held:
                    self.stream.write("".join(held))
                self.stream.flush()
            except Exception:
                if self._last is not None:
                    self.handleError(self._last)  # (says so, if standard error still works)
        finally:
            self.release()


def write_held_lines() -> None:
    """Have the root logger's BatchedHandlers write the lines they hold:
    before a journal commits the removal of an answered task, so that its
    answer is in the log first. It never raises: a log that cannot be
    written must not stop the journal."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BatchedHandler):
            handler.flush()


def retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen, so that asyncio does not log an
    error nobody asked for ("Future exception was never retrieved")."""
    if not future.cancelled():
        future.exception()
