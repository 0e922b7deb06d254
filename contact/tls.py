"""Transport security from PEM files: TLS, and mutual TLS where the client
presents a certificate too. Without files, both sides use plaintext, which
is for loopback only."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import grpc

log = logging.getLogger("contact.tls")


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext. With
    `client_ca`, clients must present a certificate signed by it (mutual TLS)."""
    if cert is None or key is None:
        return None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files, or None for plaintext: trust servers
    whose certificate `ca` signed and, for mutual TLS, present `cert`."""
    if ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def certified_name_mismatch(auth_context: dict[str, list[bytes]], name: str) -> bool:
    """Whether the caller presented a client certificate (mutual TLS) whose
    common name is not `name`: then it may not use that name."""
    certified = auth_context.get("x509_common_name")
    return certified is not None and name.encode() not in certified


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def warn_if_exposed(host: str, credentials: grpc.ServerCredentials | None) -> None:
    """Warn loudly about plaintext on an address other machines can reach."""
    if credentials is None and not is_loopback(host):
        log.warning(
            "!!! listening on %s WITHOUT TLS: anyone who can reach this port can read "
            "every task and register under any name. Use --tls-cert and --tls-key. !!!",
            host,
        )
