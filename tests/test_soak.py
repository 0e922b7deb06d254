"""The short version of the fault test (`make soak` runs the long one)."""

from __future__ import annotations

import pytest

from tests.soak import parse, soak

SHORT = ["--tasks", "1000", "--chaos", "8", "--hung", "1", "--real", "2", "--kills", "3",
         "--chaos-seconds", "3"]  # fmt: skip


@pytest.mark.alone
def test_no_task_is_lost_or_answered_twice_under_faults() -> None:
    report = soak(parse([*SHORT, "--seconds", "60"]))  # raises if a guarantee broke
    print("\n".join(report.lines()))
    # The faults really happened.
    assert report.kills == 6  # 3 a round, 2 rounds
    assert report.requeued > 0
    assert report.duplicates_ignored > 0
    assert report.chaos_sessions > 8 * 2
    assert report.leases_run_out > 0  # the hung clients' tasks were rescued
    assert len(report.failed) == 2  # one poison task a round


@pytest.mark.alone
def test_with_a_journal_no_task_is_lost_when_the_server_is_killed() -> None:
    report = soak(parse([*SHORT, "--journal", "--server-kills", "2", "--seconds", "60"]))
    print("\n".join(report.lines()))
    assert report.server_kills == 4  # 2 a round, 2 rounds
    assert report.kills == 6
    assert len(report.failed) == 2  # the poison tasks still fail, across restarts
