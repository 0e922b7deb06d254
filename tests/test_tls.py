"""Transport security between real processes: TLS, and mutual TLS where the
client's certificate also fixes the name it may register under."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from contact.tls import is_loopback
from tests.certs import Authority
from tests.processes import Process, start_server


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA with a server certificate and one for client alice, and a rogue
    CA that also issued an "alice"."""
    trusted, rogue = Authority(tmp_path, "trusted"), Authority(tmp_path, "rogue")
    server_cert, server_key = trusted.issue("contact-server", server=True)
    alice_cert, alice_key = trusted.issue("alice", server=False)
    rogue_cert, rogue_key = rogue.issue("alice", server=False)
    return {
        "ca": trusted.ca,
        "server_cert": server_cert,
        "server_key": server_key,
        "alice_cert": alice_cert,
        "alice_key": alice_key,
        "rogue_cert": rogue_cert,
        "rogue_key": rogue_key,
    }


def tls_server(processes: list[Process], pki: dict[str, Path], *extra: str) -> tuple[Process, int]:
    args = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]), *extra]
    srv, port = start_server(*args)
    processes.append(srv)
    srv.wait_for(r"listening on .* with TLS")
    return srv, port


def refused_client(processes: list[Process], name: str, port: int, *args: str) -> Process:
    """A client the server does not let in: it keeps retrying, never registered."""
    refused = Process(
        name, "contact_client.py", "--server", f"127.0.0.1:{port}", "--name", name, *args
    )
    processes.append(refused)
    refused.wait_for(r"unavailable \(UNAVAILABLE")
    return refused


def stop_cleanly(process: Process) -> None:
    process.send(signal.SIGINT)
    assert process.exit_code(5) == 0, process.output
    assert "Traceback" not in process.output


def test_tls_end_to_end(
    processes: list[Process], client: Callable[..., Process], pki: dict[str, Path]
) -> None:
    srv, port = tls_server(processes, pki)
    client("alice", port, "--ca", str(pki["ca"]))
    srv.type("over tls")
    srv.wait_for(r"result from alice: 'OVER TLS'$")


def test_a_plaintext_client_is_refused_by_a_tls_server(
    processes: list[Process], pki: dict[str, Path]
) -> None:
    srv, port = tls_server(processes, pki)
    plain = refused_client(processes, "plain", port)
    assert srv.count("connected from") == 0
    assert "registered" not in plain.output
    stop_cleanly(plain)


def test_a_client_that_does_not_trust_the_server_refuses_it(
    processes: list[Process], pki: dict[str, Path]
) -> None:
    srv, port = tls_server(processes, pki)
    rogue_ca = pki["rogue_cert"].parent / "rogue-ca.pem"
    doubter = refused_client(processes, "doubter", port, "--ca", str(rogue_ca))
    assert srv.count("connected from") == 0
    stop_cleanly(doubter)


def test_mutual_tls_admits_only_certified_clients_under_their_own_name(
    processes: list[Process], client: Callable[..., Process], pki: dict[str, Path]
) -> None:
    srv, port = tls_server(processes, pki, "--client-ca", str(pki["ca"]))
    ca = ["--ca", str(pki["ca"])]
    alice_cert = ["--cert", str(pki["alice_cert"]), "--key", str(pki["alice_key"])]
    rogue_cert = ["--cert", str(pki["rogue_cert"]), "--key", str(pki["rogue_key"])]

    client("alice", port, *ca, *alice_cert)
    srv.type("@alice mutual")
    srv.wait_for(r"result from alice: 'MUTUAL'$")

    stop_cleanly(refused_client(processes, "nocert", port, *ca))
    stop_cleanly(refused_client(processes, "alice", port, *ca, *rogue_cert))

    impostor = Process(
        "mallory", "contact_client.py", "--server", f"127.0.0.1:{port}", "--name", "mallory",
        *ca, *alice_cert,
    )  # fmt: skip
    processes.append(impostor)
    assert impostor.exit_code(10) == 1
    impostor.wait_for(r"refused this client: PERMISSION_DENIED: 'client-id' mallory is not")
    srv.wait_for(r"WARNING refused a call from .*mallory is not the name in the client certificate")
    assert srv.count(r"client alice connected") == 1  # neither the rogue nor mallory got in


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("contact.example.com", False),
    ],
)
def test_plaintext_off_loopback_is_warned_about(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
