"""Unit tests of how the server reads tasks from its standard input."""

from __future__ import annotations

import pytest

from contact import MAX_TEXT_BYTES
from contact.server.typed import line_batches, parse_task


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("hello world\n", (None, "hello world")),
        ("  spaced  out  ", (None, "spaced  out")),
        ("@bob do this", ("bob", "do this")),
        ("@bob    do this  ", ("bob", "do this")),
        ("", (None, "")),
        ("   \n", (None, "")),
        ("email me@example.com", (None, "email me@example.com")),
    ],
)
def test_parse_task(line: str, expected: tuple[str | None, str]) -> None:
    assert parse_task(line) == expected


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("@", "client name"),
        ("@bob", "no task text"),
        ("@bob   ", "no task text"),
        ("@b\x1bob hi", "client name"),
        ("@" + "x" * 65 + " hi", "client name"),
        ("x" * (MAX_TEXT_BYTES + 1), "over the limit"),
        ("a\x00b", "NUL character"),
    ],
)
def test_parse_task_refuses_what_is_no_task(line: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_task(line)


def test_line_batches_join_lines_cut_across_chunks() -> None:
    chunks = [b"fir", b"st\nsec", b"ond\n\nthi", b"rd"]
    assert list(line_batches(iter(chunks), 100)) == [[b"first"], [b"second", b""], [b"third"]]


def test_line_batches_give_a_too_long_line_once_and_cut_short() -> None:
    chunks = [b"ok\n", b"x" * 30, b"x" * 30, b"x" * 30 + b"\nafter\n", b"y" * 50]
    lines = [line for batch in line_batches(iter(chunks), 40) for line in batch]
    assert lines[0] == b"ok"
    assert 40 < len(lines[1]) <= 80  # over the limit, so refused, but bounded
    assert lines[2:] == [b"after", b"y" * 50]
