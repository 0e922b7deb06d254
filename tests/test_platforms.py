"""What differs between platforms: event loops without signal handlers
(Windows), and typed input in the console's own encoding."""

from __future__ import annotations

import signal

from tests.processes import Process


def test_both_programs_stop_on_ctrl_c_where_the_loop_takes_no_signal_handlers(
    processes: list[Process],
) -> None:
    server = Process("server", "tests/windows_loop.py", "contact_server.py", "--port", "0")
    processes.append(server)
    port = server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    client = Process(
        "client", "tests/windows_loop.py", "contact_client.py",
        "--server", f"127.0.0.1:{port}", "--name", "windows",
    )  # fmt: skip
    processes.append(client)
    client.wait_for(r"registered with .* as windows$")
    server.type("hello from windows")
    server.wait_for(r"result from windows: 'HELLO FROM WINDOWS'$")
    for process in (client, server):
        process.send(signal.SIGINT)
        assert process.exit_code(10) == 0, process.output
        assert "Traceback" not in process.output, process.output
    client.wait_for(r"INFO stopped$")
    server.wait_for(r"stopped; tasks never answered: 0")


def test_typed_tasks_are_decoded_with_the_consoles_encoding(processes: list[Process]) -> None:
    """A Chinese Windows console types GBK, not UTF-8."""
    console = {"PYTHONIOENCODING": "gbk"}
    server = Process("server", "contact_server.py", "--port", "0", env=console, encoding="gbk")
    processes.append(server)
    port = server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    client = Process("client", "contact_client.py", "--server", f"127.0.0.1:{port}", "--name", "zh")
    processes.append(client)
    client.wait_for(r"registered with .* as zh$")
    server.type("你好")
    server.wait_for(r"result from zh: '你好'$")
