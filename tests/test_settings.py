"""Settings: every bounded number refuses a value out of its bounds, naming its variable,
whether it comes from the environment, a CLI flag or code."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest

from crmscore.settings import Settings, SettingsError, env_var

BOUNDED = [f for f in dataclasses.fields(Settings)
           if any(f.metadata[k] is not None for k in ("above", "at_least", "at_most"))]


def out_of_bounds(f: dataclasses.Field) -> list[float]:
    """Values just outside each of ``f``'s bounds, and NaN."""
    above, at_least, at_most = (f.metadata[k] for k in ("above", "at_least", "at_most"))
    values = [math.nan]
    if above is not None:
        values.append(above)
    if at_least is not None:
        values.append(at_least - 1 if f.type == "int" else at_least - 0.001)
    if at_most is not None:
        values.append(at_most + 1)
    return values


def test_every_number_is_bounded_and_the_defaults_hold():
    numbers = {f.name for f in dataclasses.fields(Settings) if f.type in ("int", "float")}
    assert numbers == {f.name for f in BOUNDED}
    Settings()  # the defaults pass their own bounds


@pytest.mark.parametrize("f", BOUNDED, ids=lambda f: f.name)
def test_a_value_out_of_bounds_is_refused_with_its_variable(f):
    for value in out_of_bounds(f):
        if f.type == "int" and math.isnan(value):
            continue  # "nan" is no integer: refused by the conversion already
        raw = str(int(value)) if f.type == "int" else str(value)
        with pytest.raises(SettingsError, match=f"^{env_var(f.name)}: must be "):
            Settings.from_env({env_var(f.name): raw})


def test_a_value_on_an_inclusive_bound_is_accepted():
    settings = Settings.from_env({"CRMSCORE_RESCORE_RATE": "0", "CRMSCORE_METRICS_PORT": "65535"})
    assert settings.rescore_rate == 0 and settings.metrics_port == 65535


def test_the_cli_stops_on_a_bad_value_before_doing_anything():
    env = {**os.environ, "CRMSCORE_GRPC_WORKERS": "0"}
    done = subprocess.run([sys.executable, "-m", "crmscore.cli", "topics"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "CRMSCORE_GRPC_WORKERS: must be >= 1, got 0" in done.stderr
