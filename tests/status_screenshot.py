"""Makes docs/status-page.png: a server with --metrics-port, three clients
answering tasks typed over half a minute, and one client that hangs
holding two tasks and is killed (with --max-attempts 1 they fail), seen in
headless Chromium at a phone's width.

    python -m tests.status_screenshot [--out docs/status-page.png]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.processes import ROOT, all_stopped, start_client, start_server
from tests.test_observe import browse

ROUNDS = 12  # of typed tasks, one every ROUND_SECONDS: a chart with a shape
ROUND_SECONDS = 2.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "status-page.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed: apt-get install chromium (Debian)", file=sys.stderr)
        return 1
    with all_stopped() as running:
        server, port = start_server("--metrics-port", "0", "--max-attempts", "1")
        running.append(server)
        metrics_port = server.wait_for(r"status page at http://127\.0\.0\.1:(\d+)/")[1]
        for name in ("build-runner-1", "build-runner-2", "crawler-eu"):
            running.append(start_client(name, port))
        hung = start_client("device-42", port)
        running.append(hung)
        hung.freeze()
        server.type("@device-42 update firmware", "@device-42 reboot")
        server.wait_for(r"sent to device-42", count=2)
        hung.send(signal.SIGKILL)
        server.wait_for(r"failed: sent 1 times without an answer", count=2)
        for round_ in range(ROUNDS):
            server.type(*(f"job {round_}-{n}" for n in range(1 + round_ % 5 * 3)))
            time.sleep(ROUND_SECONDS)  # (a picture of tasks spread over time, not a test)
        server.type("@crawler-asia fetch https://example.com/", "@crawler-asia fetch the rest")
        browse(chromium, f"http://127.0.0.1:{metrics_port}/",
               f"--screenshot={args.out.resolve()}", "--window-size=412,1000")  # fmt: skip
        print(f"wrote {args.out}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
