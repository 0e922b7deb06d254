"""Text from outside (task texts, answers, status lines, ids), made safe to
put in a log line."""

from __future__ import annotations

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
