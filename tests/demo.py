"""`make demo`: the whole story in one terminal. It starts a server and two
clients (alice and bob), types four tasks into the server (one addressed to
bob), waits for the four results, then stops everything with the signals a
person would send (Ctrl-C for the clients, SIGTERM for the server).
Exits 0 only if every step happened and every process exited 0."""

from __future__ import annotations

import signal
import sys

from tests.processes import Process, all_stopped, start_client, start_server

TASKS = [
    "hello world",
    "@bob this one is only for bob",
    "push work to clients that dialled in",
    "and hear back from them",
]


def say(text: str) -> None:
    print(f"{'demo':>7} | --- {text}", flush=True)


def story(running: list[Process]) -> None:
    say("starting a server on a free loopback port")
    server, port = start_server(echo=True)
    running.append(server)
    say("starting two clients, alice and bob")
    for name in ("alice", "bob"):
        running.append(start_client(name, port, echo=True))
    say("typing four tasks into the server; one is addressed to @bob")
    server.type(*TASKS)
    server.wait_for(r"task \S+ result from", count=len(TASKS))
    server.wait_for(r"result from bob: 'THIS ONE IS ONLY FOR BOB'")
    for client in running[1:]:  # each client logs its answers too, a moment later
        if sent := server.count(rf"task \S+ sent to {client.label}: "):
            client.wait_for(r"task \S+: '.*' -> ", count=sent)
    say("all four results are back; pressing Ctrl-C in each client")
    for client in running[1:]:
        client.send(signal.SIGINT)
        if client.exit_code() != 0:
            raise AssertionError(f"{client.label} exited with {client.exit_code()}")
    say("sending SIGTERM to the server")
    server.send(signal.SIGTERM)
    if server.exit_code() != 0:
        raise AssertionError(f"the server exited with {server.exit_code()}")
    say(f"done: {len(TASKS)} tasks out, {len(TASKS)} results back, every process exited 0")


def main() -> int:
    with all_stopped() as running:
        try:
            story(running)
            return 0
        except AssertionError as failure:
            say(f"FAILED: {failure}")
            return 1


if __name__ == "__main__":
    sys.exit(main())
