"""A throwaway PostgreSQL for the tests, started from the installed binaries:
`initdb` into a temporary folder, `pg_ctl` on a free 127.0.0.1 port with
trust authentication, run as the `postgres` user when the tests run as root
(PostgreSQL refuses to run as root), and removed afterwards.

Debian keeps `initdb` and `pg_ctl` off the PATH, in /usr/lib/postgresql/N/bin;
the newest version there is used, or the PATH's if there is none.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.installed import required
from tests.processes import free_port

INSTALL_HINT = "PostgreSQL is not installed: apt-get install postgresql (Debian)"
DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"
# initdb, and pg_ctl's wait for the server to accept connections, take a
# second or two: generous on a loaded machine, and bounded (a test that
# starts one allows for both, see tests/test_postgres.py).
START_SECONDS = 30
STOP_SECONDS = 30
SUPERUSER = "postgres"
# PostgreSQL refuses to run as root: then its programs run as SUPERUSER.
AS_ROOT = sys.platform != "win32" and os.geteuid() == 0


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
    return required(binaries(), INSTALL_HINT)


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
        try:
            self._start()
        except BaseException:
            with contextlib.suppress(Exception):  # what went wrong is the start's error
                self.stop()
            raise

    def _start(self) -> None:
        if AS_ROOT:
            shutil.chown(self.folder, SUPERUSER)
        self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync",
            "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        self.resume()

    def resume(self) -> None:
        """Start the server (again, after `halt`), on the same port and data."""
        # pg_ctl hands `options` to a shell: the quotes keep a folder with spaces whole.
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories='{self.folder}'"
        )
        log = self.folder / "server.log"
        try:
            self._run("pg_ctl", "start", "-w", "-t", str(START_SECONDS), "-D", str(self.data),
                      "-l", str(log), "-o", options)  # fmt: skip
        except RuntimeError as err:
            said = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{err}\nits log: {said}") from None

    def _run(self, program: str, *args: str, seconds: float = START_SECONDS) -> None:
        """Run one of PostgreSQL's programs (as SUPERUSER if we are root),
        for at most a little longer than the `seconds` it is told to take."""
        command = [str(self._bin / program), *args]
        if AS_ROOT:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 5, cwd=self.folder
        )
        if done.returncode != 0:
            said = done.stderr or done.stdout
            raise RuntimeError(f"{program} failed ({done.returncode}): {said}")

    def halt(self) -> None:
        """Stop the server as an outage would, keeping its data for `resume`."""
        self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-t", str(STOP_SECONDS),
                  "-D", str(self.data), seconds=STOP_SECONDS)  # fmt: skip

    def new_database(self, name: str) -> str:
        """Make an empty database `name`; return its URL."""
        self._run("psql", self.url, "-qc", f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def psql(self, url: str, sql: str) -> str:
        """What `sql` returns, as psql prints it unaligned (a test's look inside)."""
        command = [str(self._bin / "psql"), url, "-Atc", sql]
        done = subprocess.run(command, capture_output=True, text=True, timeout=START_SECONDS)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr}")
        return done.stdout.strip()

    def stop(self) -> None:
        """Stop the server at once (no wait for clients) and remove its folder."""
        try:
            if self.data.exists():
                self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-t", str(STOP_SECONDS),
                          "-D", str(self.data), seconds=STOP_SECONDS)  # fmt: skip
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
