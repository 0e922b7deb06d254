"""A throwaway PostgreSQL for the tests, started from the installed binaries:
`initdb` into a temporary folder, `pg_ctl` on a free 127.0.0.1 port with
trust authentication, run as the `postgres` user when the tests run as root
(PostgreSQL refuses to run as root), and removed afterwards.

Debian keeps `initdb` and `pg_ctl` off the PATH, in /usr/lib/postgresql/N/bin;
the newest version there is used, or the PATH's if there is none.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.processes import free_port

INSTALL_HINT = "PostgreSQL is not installed: apt-get install postgresql (Debian)"
DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"
# initdb, and pg_ctl's wait for the server to accept connections, take a
# second or two; generous on a loaded machine, and bounded.
START_SECONDS = 60
STOP_SECONDS = 30
SUPERUSER = "postgres"


def binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, or None if PostgreSQL is not installed."""
    versions = [Path(folder) for folder in glob.glob(DEBIAN_BINARIES)]
    if versions := [folder for folder in versions if (folder / "initdb").exists()]:
        return max(versions, key=lambda folder: int(folder.parent.name.split(".")[0]))
    initdb = shutil.which("initdb")
    return None if initdb is None else Path(initdb).parent


def installed() -> Path:
    """binaries(), or: outside CI, skip the test with what to install; in CI
    (where .ci/run installs PostgreSQL), fail it."""
    found = binaries()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    return found


class Postgres:
    """One throwaway server: `url` to connect to, `stop()` to remove it."""

    def __init__(self, bin_folder: Path) -> None:
        self._bin = bin_folder
        # Not under pytest's own temporary folder: as root that one is closed
        # to the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="contact-postgres-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.folder, SUPERUSER)
        self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync",
            "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.folder}"
        )
        log = str(self.folder / "server.log")
        self._run("pg_ctl", "start", "-w", "-t", str(START_SECONDS), "-D", str(self.data),
                  "-l", log, "-o", options)  # fmt: skip

    def _run(self, program: str, *args: str, timeout: float = START_SECONDS) -> None:
        command = [str(self._bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            said = done.stderr or done.stdout
            raise RuntimeError(f"{program} failed ({done.returncode}): {said}")

    def log(self) -> str:
        """What the server wrote to its log so far."""
        return (self.folder / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        """Stop the server at once (no wait for clients) and remove its folder."""
        try:
            self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-t", str(STOP_SECONDS),
                      "-D", str(self.data), timeout=STOP_SECONDS + 5)  # fmt: skip
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
