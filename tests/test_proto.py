"""The committed stubs must be exactly what `make proto` generates now."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

from tests.processes import ROOT

GENERATED = ["contact_pb2.py", "contact_pb2.pyi", "contact_pb2_grpc.py"]


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "contact" / "contact.proto"),
        ]
    )
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / "contact" / name).read_text()
        committed = (ROOT / "contact" / name).read_text()
        if fresh != committed:
            pytest.fail(f"contact/{name} is stale or edited by hand: run `make proto`")


def test_stubs_import_as_a_package_from_the_repository_root() -> None:
    text = (ROOT / "contact" / "contact_pb2_grpc.py").read_text()
    assert "from contact import contact_pb2" in text
