"""The committed generated code must be exactly what scripts/gen-protos makes of protos/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("__init__.py", "scoring_pb2.py", "scoring_pb2.pyi", "scoring_pb2_grpc.py")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        check=True, env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "crmscore" / "v1" / name).read_text()
        committed = (ROOT / "crmscore" / "v1" / name).read_text()
        assert committed == fresh, (
            f"crmscore/v1/{name} differs from protos/: run scripts/gen-protos"
        )
        assert "DO NOT EDIT" in committed.splitlines()[0]
