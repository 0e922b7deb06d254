"""Unit tests of the log limiter (contact/logtext.py): lines past the limit
are counted and said, never dropped unsaid, and its memory stays bounded;
and of the scripts' batched log handler."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from contact import logtext
from contact.logtext import Repeats


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def said(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """How many lines were logged, and how many the summaries say were left out."""
    lines = [record.getMessage() for record in caplog.records]
    summaries = [re.match(r"\.\.\. and (\d+) more", line) for line in lines]
    left_out = sum(int(match.group(1)) for match in summaries if match)
    return sum(match is None for match in summaries), left_out


def test_every_line_is_logged_or_counted_in_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock, logger = Clock(), logging.getLogger("test.repeats")
    repeats = Repeats(per_second=5, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.repeats"):
        for second in range(3):
            clock.now = float(second)
            for _ in range(100):
                repeats.log(logger, logging.INFO, "status", "bob", "a line")
        clock.now = 10.0
        repeats.flush(logger)
    assert said(caplog) == (15, 285)


def test_past_its_size_the_limiter_says_what_it_held_and_starts_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logtext, "MAX_COUNTED", 3)
    clock, logger = Clock(), logging.getLogger("test.repeats")
    repeats = Repeats(per_second=1, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.repeats"):
        for name in range(10):  # more names than it keeps counts for
            for _ in range(4):
                repeats.log(logger, logging.INFO, "refused", f"host-{name}", "a line")
            assert len(repeats._counts) <= 3
        clock.now = 10.0
        repeats.flush(logger)
    assert said(caplog) == (10, 30)  # one line and three counted, for each of the ten


class Writes:
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def batched() -> tuple[logging.Logger, Writes]:
    stream, handler = Writes(), logtext.BatchedHandler()
    handler.setStream(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.batched.{id(stream)}")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    return logger, stream


def test_lines_logged_on_the_loop_are_written_together_within_the_batch_time() -> None:
    logger, stream = batched()

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for number in range(3):
            logger.info("line %d", number)
        assert stream.writes == []  # held
        while not stream.writes:
            await asyncio.sleep(0.001)
        return loop.time() - began

    waited = asyncio.run(scenario())
    assert stream.writes == ["line 0\nline 1\nline 2\n"]  # one write for all three
    assert waited < logtext.LOG_BATCH_SECONDS + 0.5


def test_a_line_logged_off_the_loop_is_written_at_once_and_held_lines_stay_bounded() -> None:
    logger, stream = batched()
    logger.info("no loop runs here")
    assert stream.writes == ["no loop runs here\n"]

    async def scenario() -> None:
        for number in range(logtext.MAX_HELD_LINES + 5):
            logger.info("%d", number)
        assert len(stream.writes) == 2  # the first MAX_HELD_LINES went at once
        assert stream.writes[1].count("\n") == logtext.MAX_HELD_LINES

    asyncio.run(scenario())
    logger.handlers[0].flush()  # as logging.shutdown does at a clean exit: the rest goes
    assert "".join(stream.writes).count("\n") == logtext.MAX_HELD_LINES + 6


class Broken(Writes):
    """A stream whose reader has gone: every write fails."""

    def write(self, text: str) -> None:
        self.writes.append(text)
        raise BrokenPipeError(32, "Broken pipe")


def test_lines_that_cannot_be_written_are_dropped_and_nothing_else_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger, _ = batched()
    (handler,) = logger.handlers
    broken = Broken()
    handler.setStream(broken)  # type: ignore[attr-defined]
    monkeypatch.setattr(logging, "raiseExceptions", False)  # (no "--- Logging error ---")
    root = logging.getLogger()
    root.addHandler(handler)
    try:

        async def scenario() -> None:
            for number in range(3 * logtext.MAX_HELD_LINES):
                logger.info("%d", number)
                assert len(handler._held) < logtext.MAX_HELD_LINES  # type: ignore[attr-defined]
            logtext.write_held_lines()  # what the journal calls before a commit: no error

        asyncio.run(scenario())
    finally:
        root.removeHandler(handler)
    assert len(broken.writes) == 3  # one failed write per full batch, each batch dropped
