"""The README documents every setting and keeps its quick-start promises."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from crmscore.settings import Settings, env_var

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [env_var(f.name) for f in dataclasses.fields(Settings)
               if f"`{env_var(f.name)}`" not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test" in readme and "bash scripts/demo" in readme
    assert "bash scripts/test" in (ROOT / ".ci" / "run").read_text()
