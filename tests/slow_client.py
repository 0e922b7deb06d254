"""A contact client whose handler takes a while per task, for the tests:

    python tests/slow_client.py SERVER NAME SECONDS [--concurrency N]

It is what a user's project does: import `run` and pass its own handler.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from contact import contact_pb2
from contact_client import run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("name")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()

    def slow_upper(task: contact_pb2.ServerMsg) -> str:
        time.sleep(args.seconds)
        return task.task.upper()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run(slow_upper, args.server, args.name, concurrency=args.concurrency))


if __name__ == "__main__":
    main()
