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


# Lines of one kind from one client that are logged in a second; past that
# they are counted, and one line says how many were left out.
LINES_PER_SECOND = 5
# Clients whose counts are kept at once: an attacker with many names must
# not grow the limiter without bound (past it, old counts are forgotten).
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
                self._counts.clear()
            counts = self._counts[(kind, who)] = [now, 0, 0]
        if counts[1] < self.per_second:
            counts[1] += 1
            logger.log(level, message, *args)
        else:
            counts[2] += 1

    def flush(self, logger: logging.Logger) -> None:
        """Say how many lines were left out in seconds that are over."""
        now = self._clock()
        for (kind, who), counts in list(self._counts.items()):
            if now - counts[0] >= 1.0:
                if counts[2]:
                    logger.warning("... and %d more %s lines from %s", counts[2], kind, who)
                del self._counts[(kind, who)]


REPEATS = Repeats()  # one for the process, as its log is
