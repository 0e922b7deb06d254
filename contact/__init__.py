"""The contact contract: contact.proto, the stubs generated from it, and the
few rules both sides must agree on that a .proto file cannot express.

Regenerate the stubs with `make proto`; never edit contact_pb2*.py by hand.
"""

import re

# Every call carries the caller's name under this metadata key.
CLIENT_ID_KEY = "client-id"

# A name: what `@NAME task` addresses on the server. Printable ASCII without
# spaces, so that it survives metadata, log lines and the `@NAME` syntax.
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CLIENT_NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"

# The largest message either side sends or accepts (gRPC's default limit is
# 4 MiB for receiving and none for sending). Task and answer texts stay under
# half of it, leaving room for the id and for answers a little longer than
# their task.
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_TEXT_BYTES = MAX_MESSAGE_BYTES // 2
