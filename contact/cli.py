"""Command-line pieces of the two scripts: option types that refuse what
makes no sense, the tuning options (each script's defaults), the TLS flags
with their checks, and the log format."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import grpc

from contact import CLIENT_NAME, CLIENT_NAME_RULE
from contact.client.work import CONCURRENCY, MAX_BACKOFF, STATUS_EVERY
from contact.logtext import BatchedHandler
from contact.queue.base import DEAD_AFTER_SECONDS, MAX_ATTEMPTS, MAX_QUEUED
from contact.queue.dispatcher import TASK_TIMEOUT_SECONDS
from contact.queue.sqlite import SYNC, SYNC_MODES
from contact.server.core import GRACE_SECONDS, MAX_IN_FLIGHT
from contact.tls import channel_credentials, server_credentials

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or more")
    return value


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0 to 65535)")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds more than 0."""
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not more than 0")
    return value


def seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more."""
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not 0 or more")
    return value


def client_name(text: str) -> str:
    """An argparse type: a name that follows the naming rule."""
    if not CLIENT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not {CLIENT_NAME_RULE}")
    return text


def add_server_tuning(parser: argparse.ArgumentParser) -> None:
    """The server's limits, timeouts and journal mode (docs/limits.md)."""
    option = parser.add_argument
    # fmt: off
    option(
        "--max-in-flight", type=positive_int, default=MAX_IN_FLIGHT, metavar="TASKS",
        help="most unanswered tasks at one client",
    )
    option(
        "--task-timeout", type=seconds, default=TASK_TIMEOUT_SECONDS, metavar="SECONDS",
        help="take a task back from a client that has worked on it this long (0: never)",
    )
    option(
        "--max-attempts", type=positive_int, default=MAX_ATTEMPTS, metavar="N",
        help="sends of a task without an answer before it fails",
    )
    option(
        "--max-queued", type=count, default=MAX_QUEUED, metavar="TASKS",
        help="most tasks waiting for a client; past it, typed input waits (0: no limit)",
    )
    option(
        "--grace", type=positive_float, default=GRACE_SECONDS, metavar="SECONDS",
        help="at shutdown, how long open calls get to finish",
    )
    option(
        "--journal-sync", choices=SYNC_MODES, default=SYNC,
        help="full: a queued task survives power loss; normal: only a crash of the server",
    )
    option(
        "--dead-after", type=positive_float, default=DEAD_AFTER_SECONDS, metavar="SECONDS",
        help="with --queue: take a server of the fleet silent this long for dead",
    )
    option(
        "--metrics-port", type=port, metavar="PORT",
        help="serve Prometheus metrics at /metrics and a status page at / (0: any free port)",
    )
    option(
        "--metrics-host", default="127.0.0.1", metavar="HOST",
        help="the address of --metrics-port (it shows task ids, names and failure reasons)",
    )
    option(
        "--no-reflection", dest="reflection", action="store_false",
        help="do not answer gRPC server reflection (grpcurl and the like then need the proto)",
    )
    # fmt: on


def server_tuning(args: argparse.Namespace) -> dict[str, Any]:
    """The server's keyword arguments from the options of `add_server_tuning`
    (and --journal, --queue)."""
    return {
        "max_in_flight": args.max_in_flight,
        "task_timeout": args.task_timeout or None,
        "max_attempts": args.max_attempts,
        "max_queued": args.max_queued or None,
        "grace": args.grace,
        "journal": args.journal,
        "journal_sync": args.journal_sync,
        "queue": args.queue,
        "dead_after": args.dead_after,
        "reflection": args.reflection,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
    }


def add_client_tuning(parser: argparse.ArgumentParser) -> None:
    """The client's work and retry options (docs/limits.md)."""
    option = parser.add_argument
    # fmt: off
    option(
        "--concurrency", type=positive_int, default=CONCURRENCY, metavar="N",
        help="tasks worked on at once",
    )
    option("--max-tasks", type=positive_int, metavar="N", help="exit after this many answers")
    option(
        "--status-every", type=positive_float, default=STATUS_EVERY, metavar="SECONDS",
        help="send a status line this often",
    )
    option(
        "--max-backoff", type=positive_float, default=MAX_BACKOFF, metavar="SECONDS",
        help="the longest wait between retries while the server is away",
    )
    # fmt: on


def client_tuning(args: argparse.Namespace) -> dict[str, Any]:
    """run()'s keyword arguments from the options of `add_client_tuning`."""
    names = ("concurrency", "max_tasks", "status_every", "max_backoff")
    return {name: getattr(args, name) for name in names}


def add_common_arguments(parser: argparse.ArgumentParser, *, server: bool) -> None:
    """--log-level, and the TLS flags of a server or of a client."""
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING"],
        help="DEBUG adds the status lines and their answers",
    )
    if server:
        parser.add_argument(
            "--tls-cert", type=Path, metavar="FILE", help="the server's certificate (PEM): use TLS"
        )
        parser.add_argument(
            "--tls-key", type=Path, metavar="FILE", help="the private key of --tls-cert (PEM)"
        )
        parser.add_argument(
            "--client-ca",
            type=Path,
            metavar="FILE",
            help="accept only clients certified by this CA",
        )
    else:
        parser.add_argument(
            "--ca", type=Path, metavar="FILE", help="use TLS, trusting servers signed by this CA"
        )
        parser.add_argument(
            "--cert", type=Path, metavar="FILE", help="this client's certificate, for mutual TLS"
        )
        parser.add_argument("--key", type=Path, metavar="FILE", help="the private key of --cert")


class LogFormatter(logging.Formatter):
    """LOG_FORMAT, its time text made once a second rather than once a line
    (time.strftime was a fifth of what a log line cost the server)."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        self._second, self._text = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)  # (with its traceback)
        # LOG_FORMAT, without the general machinery: a tenth of a line's cost.
        return f"{self.formatTime(record)} {record.levelname} {record.getMessage()}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._text},{int(record.msecs):03d}"  # as logging writes it


def start_logging(args: argparse.Namespace) -> None:
    """Log to standard error in LOG_FORMAT, at --log-level."""
    # A line says when and what, never where in the code, which thread or
    # which asyncio task logged it: finding out costs a walk up the stack per
    # line (the logging HOWTO's "Optimization"), and on 3.12 and later an
    # exception raised and caught per line logged from a callback (1.7 µs of
    # a line's 3.7, measured).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # (unused before 3.12)
    handler = BatchedHandler()
    handler.setFormatter(LogFormatter())
    logging.basicConfig(level=args.log_level, handlers=[handler])


def server_tls(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> grpc.ServerCredentials | None:
    """The server's credentials from its TLS flags, or None for plaintext."""
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        parser.error("--client-ca needs --tls-cert and --tls-key")
    try:
        return server_credentials(args.tls_cert, args.tls_key, args.client_ca)
    except OSError as err:
        parser.error(f"cannot read a TLS file: {err}")


def client_tls(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> grpc.ChannelCredentials | None:
    """The client's credentials from its TLS flags, or None for plaintext."""
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    if args.cert and not args.ca:
        parser.error("--cert needs --ca")
    try:
        return channel_credentials(args.ca, args.cert, args.key)
    except OSError as err:
        parser.error(f"cannot read a TLS file: {err}")
