"""Event JSON Schemas, shipped with the package so installed copies can load them."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load(name: str) -> dict[str, Any]:
    """The parsed schema ``schemas/<name>.json``, e.g. ``load("transaction.v1")``."""
    text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
