"""What a test does when a program it needs (PostgreSQL, haproxy) is not
installed: skips, saying what to install; in CI, where .ci/run installs
them, fails."""

from __future__ import annotations

import os
from typing import TypeVar

import pytest

Needed = TypeVar("Needed")


def required(found: Needed | None, hint: str) -> Needed:
    """`found`, what a test needs installed (a program, its folder); if it is
    None: outside CI, skip the test with `hint`, what to install; in CI,
    fail the test."""
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(hint)
        pytest.skip(hint)
    return found
