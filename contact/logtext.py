"""Text from outside (task texts, answers, status lines, ids), made safe to
put in a log line."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

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


def write_held_lines() -> None:
    """Have every handler of the root logger write the lines it holds back
    (cli.BatchedHandler holds them for a moment): before a journal commits
    the removal of an answered task, so that its answer is in the log first."""
    for handler in logging.getLogger().handlers:
        handler.flush()
