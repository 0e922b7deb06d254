"""The throwaway PostgreSQL the fleet's tests stand on (tests/postgres.py):
it listens on 127.0.0.1 only, on its own port, takes a connection with no
password, and leaves nothing behind."""

from __future__ import annotations

import subprocess

import pytest

from tests.postgres import START_SECONDS, Postgres, installed


@pytest.mark.timeout(4 * START_SECONDS)  # initdb, pg_ctl start and stop: each bounded
def test_a_throwaway_postgresql_answers_on_loopback_and_leaves_nothing() -> None:
    folder = installed()
    server = Postgres(folder)
    try:
        asked = subprocess.run(
            [str(folder / "psql"), server.url, "-Atc",
             "SELECT inet_server_addr(), current_setting('port'), "
             "current_setting('listen_addresses')"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.strip() == f"127.0.0.1|{server.port}|127.0.0.1"
    finally:
        server.stop()
    assert not server.folder.exists()
