"""Ctrl-C and SIGTERM as a clean stop instead of a traceback (SIGINT) or an
exit without clean-up (SIGTERM), on every platform.

Unix event loops take signal handlers directly; Windows event loops do not
(`add_signal_handler` raises NotImplementedError there), so on those the
`signal` module catches the signal and hands it to the loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

log = logging.getLogger("contact.signals")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signal(callback: Callable[[], object]) -> None:
    """Call `callback` on the running loop's thread when SIGINT or SIGTERM arrives."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, callback)
        except NotImplementedError:  # a Windows event loop

            def handler(signum: int, frame: object) -> None:
                loop.call_soon_threadsafe(callback)

            signal.signal(sig, handler)


def stop_event() -> asyncio.Event:
    """An event that is set when SIGINT or SIGTERM arrives."""
    arrived = asyncio.Event()
    on_stop_signal(arrived.set)
    return arrived
