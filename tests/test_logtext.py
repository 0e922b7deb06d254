"""Unit tests of the log limiter (contact/logtext.py): lines past the limit
are counted and said, never dropped unsaid, and its memory stays bounded."""

from __future__ import annotations

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
