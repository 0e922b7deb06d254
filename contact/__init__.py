"""The contact contract: contact.proto, the stubs generated from it, and the
few rules both sides must agree on that a .proto file cannot express.

The rest of the package is the machinery the two scripts import, one job
per module, in three parts and a few modules both sides share:

- `queue/`: the task queue (its interface, and the queue in memory or in
  an SQLite journal) and the dispatcher that gives its tasks to this
  server's clients; no gRPC.
- `server/`: the server you use from code, task handles, the checks on
  each call, the health service, tasks typed on standard input.
- `client/`: the client's work across reconnections, the pool that runs
  your handler, its streams and retries.
- shared: `options` (gRPC settings of both sides), `tls`, `logtext` (log
  lines), `waits` (bounded waits), `signals` (Ctrl-C and SIGTERM), `cli`
  (the command lines).

None of them imports a script.

Regenerate the stubs with `make proto`; never edit contact_pb2*.py by hand.
"""

import os
import re
import socket

# Every call carries the caller's name under this metadata key.
CLIENT_ID_KEY = "client-id"

# getTask may carry how many unanswered tasks the client wants at once, as a
# decimal integer of 1 or more; the server sends the smaller of that and its
# own --max-in-flight, and its own when the key is absent.
MAX_IN_FLIGHT_KEY = "max-in-flight"

# getTask carries `accepts-cancel: 1` from a client that understands a
# ServerMsg with `cancelled` set (a task withdrawn while it holds it).
ACCEPTS_CANCEL_KEY = "accepts-cancel"

# A client that stops (or drops) a task the server withdrew answers it with
# this Result.error: the server frees the task's place in its window, and
# takes it as no sign of life.
WITHDRAWN = "withdrawn by the server"

# getTask carries `reports-start: 1` from a client that says when it begins
# each task (Result.started); a server that understands it echoes it, and
# leases that client's tasks from when they begin.
REPORTS_START_KEY = "reports-start"

# getTask carries `batches-answers: 1` from a client that may send several
# answers in one Result (its `more`); a server that understands it echoes
# it, and only then does the client batch.
BATCHES_ANSWERS_KEY = "batches-answers"

# A name: what `@NAME task` addresses on the server. Printable ASCII without
# spaces, so that it survives metadata, log lines and the `@NAME` syntax.
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CLIENT_NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def default_client_name() -> str:
    """This machine's host name and this process's id, made to fit CLIENT_NAME
    (a legal host name can be 63 characters long, or not ASCII)."""
    pid = str(os.getpid())
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-") or "client"
    return f"{host[: 63 - len(pid)]}-{pid}"


# The largest message either side sends or accepts (gRPC's default limit is
# 4 MiB for receiving and none for sending). Task and answer texts stay under
# half of it, leaving room for the id and for answers a little longer than
# their task.
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_TEXT_BYTES = MAX_MESSAGE_BYTES // 2
# A client's reason for failing a task is a line of explanation, not data:
# longer ones are cut (the client's own log keeps the traceback).
MAX_ERROR_BYTES = 4096


def text_problem(text: str) -> str | None:
    """Why `text` cannot travel as a task or an answer, or None if it can:
    the one check of every path (typed, submitted, answered, received)."""
    if len(text) > MAX_TEXT_BYTES:  # every character is at least one byte
        return f"it is over the limit of {MAX_TEXT_BYTES} bytes"
    try:
        size = len(text.encode())
    except UnicodeEncodeError as err:
        return f"it is not valid text ({err.reason}, at character {err.start})"
    if size > MAX_TEXT_BYTES:
        return f"it is {size} bytes, over the limit of {MAX_TEXT_BYTES}"
    return None


def one_line_error(text: str) -> str:
    """`text` made fit to send as a Result's error: valid UTF-8, at most MAX_ERROR_BYTES."""
    data = text.encode("utf-8", "backslashreplace")[:MAX_ERROR_BYTES]
    return data.decode("utf-8", "ignore")  # a character cut in two is dropped
