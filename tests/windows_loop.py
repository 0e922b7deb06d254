"""Run one of our scripts with an event loop that takes no signal handlers,
as Windows event loops do (their `add_signal_handler` raises
NotImplementedError), so the signal fallback is what stops it:

    python tests/windows_loop.py contact_server.py [ARGUMENTS...]
"""

from __future__ import annotations

import asyncio
import runpy
import sys


def no_signal_handlers(*args: object, **kwargs: object) -> None:
    raise NotImplementedError  # what a Windows event loop says


if __name__ == "__main__":
    asyncio.SelectorEventLoop.add_signal_handler = no_signal_handlers  # type: ignore[method-assign]
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
