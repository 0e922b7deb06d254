"""Tasks typed on the server's standard input, one per line: `TEXT` for any
client, `@NAME TEXT` for the client registered as NAME."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator

from contact import CLIENT_NAME, CLIENT_NAME_RULE, MAX_TEXT_BYTES, text_problem

log = logging.getLogger("contact.stdin")

# Bytes read from standard input at a time.
CHUNK_BYTES = 65536


def parse_task(line: str) -> tuple[str | None, str]:
    """Split a typed line into (target, text); raise ValueError if it is no task."""
    line = line.strip()
    target = None
    if line.startswith("@"):
        target, _, line = line[1:].partition(" ")
        line = line.strip()
        if not CLIENT_NAME.fullmatch(target):
            raise ValueError(f"@{target}: a client name is {CLIENT_NAME_RULE}")
        if not line:
            raise ValueError(f"@{target} has no task text; write @NAME TEXT")
    if problem := text_problem(line):
        raise ValueError(f"no task: {problem}")
    return target, line


def split_lines(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """Cut a byte stream into lines. A line longer than `limit` is yielded
    only once, cut short but still over the limit, so that the caller refuses
    it while memory stays bounded."""
    pending = b""
    skipping = False  # inside a line that was already yielded as too long
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not skipping:
                yield line
            skipping = False
        if len(pending) > limit:
            if not skipping:
                yield pending
            pending, skipping = b"", True
    if pending and not skipping:
        yield pending


def stdin_encoding() -> str:
    """How the terminal encodes what is typed (a Windows console may not use UTF-8)."""
    return getattr(sys.stdin, "encoding", None) or "utf-8"


def read_tasks(
    loop: asyncio.AbstractEventLoop, submit: Callable[[str, str | None], object]
) -> None:
    """Read tasks from standard input in a daemon thread and hand each to
    `submit(text, target)` on the loop's thread; log lines that are no task."""

    def on_line(line: str) -> None:
        try:
            target, text = parse_task(line)
        except ValueError as err:
            log.warning("ignored input line: %s", err)
            return
        if text:
            submit(text, target)

    read_lines(loop, on_line)


def read_lines(loop: asyncio.AbstractEventLoop, on_line: Callable[[str], None]) -> None:
    """Read standard input in a daemon thread and hand each line to `on_line`
    on the loop's thread.

    It reads file descriptor 0 with os.read, not sys.stdin: a daemon thread
    blocked inside sys.stdin's buffered reader makes Python abort at exit.
    """
    encoding = stdin_encoding()

    def chunks() -> Iterator[bytes]:
        while chunk := os.read(0, CHUNK_BYTES):
            yield chunk

    def run() -> None:
        try:
            # A little over the limit, so that an overlong line is seen as such.
            for line in split_lines(chunks(), MAX_TEXT_BYTES + 100):
                text = line.decode(encoding, "replace").rstrip("\r")
                loop.call_soon_threadsafe(on_line, text)
            loop.call_soon_threadsafe(log.info, "end of standard input; still serving")
        except (OSError, RuntimeError):
            pass  # stdin is closed or unreadable, or the loop has stopped: no more tasks

    threading.Thread(target=run, name="stdin", daemon=True).start()
