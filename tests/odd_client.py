"""A contact client whose handler misbehaves on cue, for the tests:

    python tests/odd_client.py SERVER NAME [--sleep SECONDS] [--concurrency N] [--async]

Every task takes --sleep seconds (`nap SECONDS` takes that long instead),
then its text upper-cased, except:
`none` returns None, `exit` raises SystemExit, `surrogate` returns a string
that cannot be encoded, and `poison` kills the whole process at once. With
--async the handler is an `async def` that sleeps on the event loop.
It is what a user's project does: import `run` and pass its own handler.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time

from contact import contact_pb2
from contact.cli import LOG_FORMAT
from contact_client import RefusedError, run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("name")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--async", dest="is_async", action="store_true")
    args = parser.parse_args()

    def odd(task: contact_pb2.ServerMsg) -> str:
        logging.info("started task %s (attempt %d)", task.id, task.attempt)
        time.sleep(seconds(task))
        return answer(task)

    async def odd_async(task: contact_pb2.ServerMsg) -> str:
        logging.info("started task %s (attempt %d)", task.id, task.attempt)
        await asyncio.sleep(seconds(task))
        return answer(task)

    def seconds(task: contact_pb2.ServerMsg) -> float:
        nap, _, length = task.task.partition(" ")
        return float(length) if nap == "nap" else args.sleep

    def answer(task: contact_pb2.ServerMsg) -> str:
        if task.task == "poison":
            os._exit(3)  # as a crash would: no clean-up, no answer
        if task.task == "exit":
            raise SystemExit(2)
        odd_answers: dict[str, object] = {"none": None, "surrogate": "\ud800"}
        return odd_answers.get(task.task, task.task.upper())  # type: ignore[return-value]

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        handler = odd_async if args.is_async else odd
        asyncio.run(run(handler, args.server, args.name, concurrency=args.concurrency))
    except RefusedError as err:
        logging.error("the server refused this client: %s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
