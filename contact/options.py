"""The gRPC options of both sides, each non-default one explained once.

Server and client must agree on keepalive: a client that pings more often
than the server allows has its connection closed with GOAWAY "too_many_pings".

grpc.keepalive_time_ms / grpc.keepalive_timeout_ms (both sides): ping the
  peer after 15 s without traffic and drop the connection if the ping is not
  answered within 10 s, so a peer that died silently (power loss, network
  cut, a frozen process) is noticed within about 25 s: the server takes back
  the dead client's tasks, the client reconnects. The default is one ping
  every two hours.
grpc.http2.ping_timeout_ms (both sides): how long current gRPC core really
  waits for a ping's answer, keepalive pings included (default one minute);
  keepalive_timeout_ms alone does not shorten that wait. Measured here:
  without it a frozen client went unnoticed for over 40 s. It is not in
  gRPC's public headers: recheck the keepalive test on any grpcio upgrade.
grpc.http2.max_pings_without_data = 0 (both sides): keep pinging while no
  task flows; by default gRPC stops after two pings with no data in between,
  which would stop keepalive on exactly the idle streams it is meant to watch.
grpc.http2.min_recv_ping_interval_without_data_ms (server): accept pings as
  often as every 10 s (the default minimum is 5 minutes), so the clients'
  15 s pings are never answered with GOAWAY.
grpc.max_receive_message_length / grpc.max_send_message_length (both
  sides): an explicit cap of MAX_MESSAGE_BYTES, so an oversized message is
  refused with RESOURCE_EXHAUSTED and neither side sends what the other
  would refuse.
grpc.max_concurrent_streams (server): at most MAX_STREAMS_PER_CONNECTION
  calls at once on one connection; the client waits for a free slot before
  it opens more (calls past the cap wait, they do not fail). A real client
  needs three; other gRPC clients may share one connection between many
  channels in a process (gRPC's default), so the cap is far above that. One
  connection can no longer make the server hold tens of thousands of open
  calls.
grpc.use_local_subchannel_pool = 1 (client): this channel gets a connection
  of its own. By default gRPC shares one connection between the channels of
  a process to the same address, so many run() clients in one process would
  share one connection, and with it the server's cap on calls per
  connection: 1,000 of them stalled at about 330 registered.
grpc.so_reuseport = 0 (server): gRPC sets SO_REUSEPORT by default, so a
  second server on a busy port would start "successfully" and share it;
  fail instead.

There is deliberately no grpc.max_connection_age: it would cut the
long-lived getTask streams that tasks are pushed down.
"""

from __future__ import annotations

import grpc

from contact import MAX_MESSAGE_BYTES

KEEPALIVE_TIME_MS = 15_000
KEEPALIVE_TIMEOUT_MS = 10_000
MAX_STREAMS_PER_CONNECTION = 1000

_SHARED = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

SERVER_OPTIONS = [
    *_SHARED,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS = [*_SHARED, ("grpc.use_local_subchannel_pool", 1)]


def client_channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """A channel to `target` with CHANNEL_OPTIONS: TLS if there are credentials."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
