"""The README's code blocks, as the tests run them: nothing is copied into
the tests, so what the README shows is what was run."""

from __future__ import annotations

import re
from pathlib import Path

from tests.processes import ROOT

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str, readme: Path = ROOT / "README.md") -> list[str]:
    """Every fenced block of `language` in the file, in order."""
    return [body for lang, body in FENCE.findall(readme.read_text()) if lang == language]


def python_file(name: str) -> str:
    """The python block that starts with the comment `# name`."""
    for body in blocks("python"):
        if body.startswith(f"# {name}\n"):
            return body
    raise AssertionError(f"README.md has no python block starting with '# {name}'")
