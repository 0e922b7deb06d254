"""The code blocks of the README and of docs/library.md, as the tests run
them: nothing is copied into the tests, so what they show is what was run."""

from __future__ import annotations

import re
from pathlib import Path

from tests.processes import ROOT

LIBRARY = ROOT / "docs" / "library.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str, readme: Path = ROOT / "README.md") -> list[str]:
    """Every fenced block of `language` in the file, in order."""
    return [body for lang, body in FENCE.findall(readme.read_text()) if lang == language]


def python_file(name: str) -> str:
    """The python block that starts with the comment `# name`, in either file."""
    for body in blocks("python") + blocks("python", LIBRARY):
        if body.startswith(f"# {name}\n"):
            return body
    raise AssertionError(f"no python block starts with '# {name}'")
