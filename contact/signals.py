"""Ctrl-C and SIGTERM as a clean stop instead of a traceback (SIGINT) or an
exit without clean-up (SIGTERM), on every platform.

Unix event loops take signal handlers directly; Windows event loops do not
(`add_signal_handler` raises NotImplementedError there), so on those the
`signal` module catches the signal and hands it to the loop's thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable

log = logging.getLogger("contact.signals")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signal(callback: Callable[[], object]) -> Callable[[], None]:
    """Call `callback` on the running loop's thread when SIGINT or SIGTERM
    arrives; return what puts the signals' earlier handling back."""
    loop = asyncio.get_running_loop()
    undo: list[Callable[[], object]] = []
    for sig in STOP_SIGNALS:
        earlier = signal.getsignal(sig)  # the program's own handling, put back after
        try:
            loop.add_signal_handler(sig, callback)
            undo.append(functools.partial(loop.remove_signal_handler, sig))
        except NotImplementedError:  # a Windows event loop

            def handler(signum: int, frame: object) -> None:
                loop.call_soon_threadsafe(callback)

            signal.signal(sig, handler)
        if earlier is not None:  # (None: set outside Python, nothing to put back)
            undo.append(functools.partial(signal.signal, sig, earlier))

    def put_back() -> None:
        for step in undo:
            step()

    return put_back
