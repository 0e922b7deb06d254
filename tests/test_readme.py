"""The runnable code of the README and docs/library.md, run: using
ContactServer from a script, from another thread, and copying the example
into a new project with a field of its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.processes import ROOT, Process
from tests.readme import LIBRARY, blocks, python_file


def run_script(
    processes: list[Process], folder: Path, name: str, *args: str, **env: str
) -> Process:
    """Write README block `name` into `folder` and run it there."""
    (folder / name).write_text(python_file(name))
    script = Process(name, str(folder / name), *args, cwd=folder, env=env)
    processes.append(script)
    return script


def serve_one_answer(processes: list[Process], folder: Path, script: str, expected: str) -> None:
    """Run a README server script, then a client of it; the script prints
    `expected` and exits 0, and the client keeps serving."""
    server = run_script(processes, folder, script, PYTHONPATH=str(ROOT))
    port = server.wait_for(r"listening on port (\d+)").group(1)
    worker = Process("worker", "contact_client.py", "--server", f"127.0.0.1:{port}")
    processes.append(worker)
    server.wait_for(rf"^{re.escape(expected)}$", timeout=20)
    assert server.exit_code(10) == 0, server.output
    assert "Traceback" not in server.output + worker.output


def test_embedded_server_handles_cancel_failures_hook_and_sigterm(
    processes: list[Process], tmp_path: Path
) -> None:
    """The README's embed.py with its worker.py: a handle's id is the id the
    server logs, a handler that raises is a TaskError, a cancelled or timed
    out task never reaches anyone, and SIGTERM is a clean stop."""
    server = run_script(processes, tmp_path, "embed.py", PYTHONPATH=str(ROOT))
    port = server.wait_for(r"listening on port (\d+)").group(1)
    worker = run_script(processes, tmp_path, "worker.py", f"127.0.0.1:{port}", PYTHONPATH=str(ROOT))
    hello = server.wait_for(r"^(\S+) answered HELLO$", timeout=20).group(1)
    server.wait_for(rf"INFO task {re.escape(hello)} sent to worker: 'hello'$")
    server.wait_for(rf"INFO task {re.escape(hello)} result from worker: 'HELLO'$")
    server.wait_for(rf"^on_answer: {re.escape(hello)} HELLO$")
    failed = server.wait_for(
        r"^TaskError: task (\S+) failed at worker: ValueError: cannot do !fail$"
    )
    server.wait_for(rf"^on_answer: {re.escape(failed.group(1))} task \S+ failed at worker")
    server.wait_for(r"^task \S+ was cancelled$")
    server.wait_for(r"^carol did not answer within 1 s$", timeout=5)
    server.wait_for(r"INFO task \S+ queued for dave: 'for dave'$")
    server.wait_for(r"INFO serving until Ctrl-C or SIGTERM$")
    server.send(signal.SIGTERM)
    assert server.exit_code(10) == 0, server.output
    server.wait_for(r"INFO shutting down: tasks queued: 1, in flight: 0")
    server.wait_for(r"INFO stopped; tasks never answered: 1$")
    assert server.count(r"on_answer") == 2  # answers and failures; not cancellations
    assert server.count(r"sent to") == 2  # neither bob's nor carol's task went anywhere
    assert worker.count(r"for bob|for carol") == 0
    assert "Traceback" not in server.output, server.output


def test_the_readmes_hello_is_answered_by_the_shipped_client(
    processes: list[Process], tmp_path: Path
) -> None:
    serve_one_answer(processes, tmp_path, "hello.py", "HELLO")


def test_submit_threadsafe_returns_the_answer_to_plain_code(
    processes: list[Process], tmp_path: Path
) -> None:
    serve_one_answer(processes, tmp_path, "from_a_thread.py", "FROM A THREAD")
    assert re.search(r"^queued as \S+-1$", processes[0].output, re.MULTILINE)


def test_copy_into_a_project_and_add_a_field(processes: list[Process], tmp_path: Path) -> None:
    """The README's "Copy it into your project", step by step, outside the repository."""
    project = tmp_path / "myproject"
    project.mkdir()
    copy, regenerate = blocks("sh", LIBRARY)[-2:]
    venv_bin = str(Path(sys.executable).parent)  # `python` is this interpreter
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    env.pop("PYTHONPATH", None)

    def shell(script: str, cwd: Path) -> None:
        script = script.replace("~/myproject", str(project))
        done = subprocess.run(
            ["bash", "-ec", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr

    shell(copy, ROOT)
    for generated in (project / "contact").glob("contact_pb2*"):
        generated.unlink()  # so the test proves the documented command makes them
    proto = project / "contact" / "contact.proto"
    proto_block = blocks("proto", LIBRARY)[0]
    (field,) = [line for line in proto_block.splitlines() if "your own field" in line]
    proto.write_text(
        proto.read_text().replace("  string id = 2;\n", f"  string id = 2;\n{field}\n", 1)
    )
    shell(regenerate, project)
    assert "priority" in (project / "contact" / "contact_pb2.pyi").read_text()

    alone = {"PYTHONPATH": ""}  # only the copied files, none of the repository's
    server = run_script(processes, project, "my_server.py", **alone)
    port = server.wait_for(r"listening on port (\d+)").group(1)
    worker = run_script(processes, project, "my_client.py", f"127.0.0.1:{port}", **alone)
    server.wait_for(r"^HELLO \(priority high\)$", timeout=20)
    assert server.exit_code(10) == 0, server.output
    assert worker.exit_code(10) == 0, worker.output

    # Your field is kept in a journal too, and read back after a restart.
    keep_and_read_back = """
import asyncio
from contact.queue.sqlite import SqliteQueue

async def keep() -> None:
    queue = SqliteQueue("tasks.journal")
    await queue.put("hello", fields={"priority": "high"})
    await queue.close()

asyncio.run(keep())
print(SqliteQueue("tasks.journal").recovered[0].fields)
"""
    done = subprocess.run(
        [sys.executable, "-c", keep_and_read_back],
        cwd=project, env={**env, **alone}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout == "{'priority': 'high'}\n", done.stdout + done.stderr


INLINE_COMMAND = re.compile(r"`((?:make|python|\.venv\S*python|py) [^`]*)`")


def test_the_chinese_tutorial_shows_the_same_commands_and_code() -> None:
    english, chinese = ROOT / "README.md", ROOT / "README.zh-CN.md"
    assert "README.zh-CN.md" in english.read_text().split("\n## ")[0]  # linked at the top
    assert "(README.md)" in chinese.read_text().split("\n## ")[0]  # and back
    for language in ("sh", "powershell", "console", "python", "proto", "mermaid"):
        assert blocks(language, chinese) == blocks(language, english), language
    commands = [
        sorted(" ".join(command.split()) for command in INLINE_COMMAND.findall(path.read_text()))
        for path in (english, chinese)
    ]
    assert commands[0] == commands[1]
