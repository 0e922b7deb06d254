"""Many run() clients in one process, as a user's program would run them:

    python tests/many_clients.py SERVER COUNT

Client I registers as many-I, answers one task with an async handler and
returns (max_tasks=1). It logs at INFO (each registration, each answer),
prints how many answered and how long it took from the start, and exits 0
once every client has returned.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from contact import contact_pb2
from contact.cli import LOG_FORMAT
from contact_client import run


async def echo(task: contact_pb2.ServerMsg) -> str:
    return task.task.upper()


async def main(server: str, count: int) -> None:
    began = time.monotonic()
    clients = [run(echo, server, f"many-{number}", max_tasks=1) for number in range(count)]
    await asyncio.gather(*clients)
    print(f"{count} clients answered in {time.monotonic() - began:.1f} s", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
