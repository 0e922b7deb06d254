"""When the client retries a lost connection, and how long it waits."""

from __future__ import annotations

import random
from collections.abc import Iterator

import grpc

# The first wait before a retry; it doubles up to the client's --max-backoff.
INITIAL_BACKOFF_SECONDS = 0.25

# Status codes that retrying will not cure: the client stops and says why.
FINAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,  # the server refused our name or window
        grpc.StatusCode.PERMISSION_DENIED,  # a name our certificate does not carry
        grpc.StatusCode.UNIMPLEMENTED,  # not a contact server
        grpc.StatusCode.ABORTED,  # another client registered under our name
    }
)


def backoff(cap: float, initial: float = INITIAL_BACKOFF_SECONDS) -> Iterator[float]:
    """Delays before each retry: doubling from `initial` up to `cap`, each
    scaled by a random 0.5-1.0 so that many clients do not retry in step."""
    delay = min(initial, cap)
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)
