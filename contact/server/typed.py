"""Tasks typed on the server's standard input, one per line: `TEXT` for any
client, `@NAME TEXT` for the client registered as NAME."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator

from contact import CLIENT_NAME, CLIENT_NAME_RULE, MAX_TEXT_BYTES, text_problem
from contact.queue.base import NewTask

log = logging.getLogger("contact.stdin")

# Bytes read from standard input at a time.
CHUNK_BYTES = 65536
# Lines handed to the loop at once: submitting 500 together takes it a few
# milliseconds, so status answers and results still flow during a burst
# (one callback per line, as fast as they were read, stalled it 14.5 s for
# 200,000 piped lines, and every client gave up on the server).
BATCH_LINES = 500


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
    if "\x00" in line:  # (a fleet's database cannot keep one: refused everywhere, line by line)
        raise ValueError("no task: it holds a NUL character")
    return target, line


def line_batches(chunks: Iterator[bytes], limit: int) -> Iterator[list[bytes]]:
    """Cut a byte stream into lines: the complete lines of each chunk as one
    list. A line longer than `limit` comes only once, cut short but still
    over the limit, so that the caller refuses it while memory stays bounded."""
    pending = b""
    skipping = False  # inside a line that was already given as too long
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        if skipping and lines:
            lines, skipping = lines[1:], False  # the rest of the long line
        if len(pending) > limit and not skipping:
            lines.append(pending)
            pending, skipping = b"", True
        elif skipping:
            pending = b""
        if lines:
            yield lines
    if pending and not skipping:
        yield [pending]


def stdin_encoding() -> str:
    """How the terminal encodes what is typed (a Windows console may not use UTF-8)."""
    return getattr(sys.stdin, "encoding", None) or "utf-8"


def read_tasks(
    loop: asyncio.AbstractEventLoop,
    submit: Callable[[list[NewTask]], Awaitable[object]],
) -> None:
    """Read tasks from standard input in a daemon thread and await
    `submit(tasks)` on the loop for the tasks of each batch of lines (with a
    journal, a commit per batch); log lines that are no task.

    Lines reach the loop a batch at a time (what one read brought, at most
    BATCH_LINES), and the next batch only once the loop has submitted the
    last: a burst piped in never starves the loop's other work, and a
    submit that waits stops the reading. It reads file descriptor 0 with
    os.read, not sys.stdin: a daemon thread blocked inside sys.stdin's
    buffered reader makes Python abort at exit.
    """
    encoding = stdin_encoding()

    async def take(lines: list[bytes]) -> None:
        tasks = []
        for line in lines:
            try:
                target, text = parse_task(line.decode(encoding, "replace").rstrip("\r"))
            except ValueError as err:
                log.warning("ignored input line: %s", err)
                continue
            if text:
                tasks.append(NewTask(text, target))
        if tasks:
            await submit(tasks)

    def chunks() -> Iterator[bytes]:
        while chunk := os.read(0, CHUNK_BYTES):
            yield chunk

    def run() -> None:
        try:
            # A little over the limit, so that an overlong line is seen as such.
            for lines in line_batches(chunks(), MAX_TEXT_BYTES + 100):
                for start in range(0, len(lines), BATCH_LINES):
                    batch = lines[start : start + BATCH_LINES]
                    asyncio.run_coroutine_threadsafe(take(batch), loop).result()
            loop.call_soon_threadsafe(log.info, "end of standard input; still serving")
        except (OSError, RuntimeError, concurrent.futures.CancelledError):
            pass  # stdin is closed or unreadable, or the loop has stopped: no more tasks

    threading.Thread(target=run, name="stdin", daemon=True).start()
