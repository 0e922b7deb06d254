"""A throwaway haproxy for the tests, in TCP (L4) mode in front of a fleet's
servers on 127.0.0.1, as docs/fleet.md deploys it: started from Debian's
package with a configuration of the test's own, stopped afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.installed import required
from tests.processes import free_port

INSTALL_HINT = "haproxy is not installed: apt-get install haproxy (Debian)"
START_SECONDS = 10.0  # until its port takes connections
# Servers are checked (a TCP connect) this often, and taken out of the
# rotation after one failed check: a killed server stops getting the
# reconnecting clients within about this long.
CHECK_MS = 300
CONFIG = """\
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    # A getTask stream is quiet between tasks: its keepalive pings (every
    # 15 s) keep it under these.
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch
frontend contact
    bind 127.0.0.1:{port}
    default_backend servers
backend servers
    balance leastconn
{servers}
"""


def installed() -> str:
    """The haproxy program, or: outside CI, skip the test with what to
    install; in CI (where .ci/run installs it), fail it."""
    return required(shutil.which("haproxy", path=f"{os.environ['PATH']}:/usr/sbin"), INSTALL_HINT)


class Haproxy:
    """haproxy on a free 127.0.0.1 `port`, spreading connections over the
    servers on `ports`; `stop()` ends it."""

    def __init__(self, program: str, ports: list[int]) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="contact-haproxy-"))
        servers = "\n".join(
            f"    server s{n} 127.0.0.1:{port} check inter {CHECK_MS}ms fall 1 rise 1"
            for n, port in enumerate(ports)
        )
        config = self.folder / "haproxy.cfg"
        config.write_text(CONFIG.format(port=self.port, servers=servers))
        self.process = subprocess.Popen(
            [program, "-db", "-f", str(config)],  # -db: in the foreground, logs to stderr
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self) -> None:
        ends = time.monotonic() + START_SECONDS
        while time.monotonic() < ends:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)  # (no event to wait for: it says nothing when ready)
        raise RuntimeError(f"haproxy did not listen within {START_SECONDS} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)
