"""Dev-only: cost of the BTYD models (scalar µs per call, fit time) and agreement with lifetimes.

Run: ``.venv/bin/python bench/evaluate_clv.py [n_customers ...]`` (needs lifetimes, pandas).
"""

from __future__ import annotations

import sys
import time
import timeit
import warnings

import numpy as np

from models.btyd import (
    BgNbdParams,
    expected_purchases,
    expected_spend,
    fit_bgnbd_report,
    fit_gamma_gamma,
    fit_population,
    p_alive,
)

TRUE = BgNbdParams(r=0.5, alpha=20.0, a=0.8, b=2.5)


def sample(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(x, t_x, T, mean spend) drawn from BG/NBD(TRUE) and Gamma-Gamma(6, 4, 15)."""
    rng = np.random.default_rng(seed)
    T = rng.uniform(30.0, 720.0, n)
    bought = rng.poisson(rng.gamma(TRUE.r, 1 / TRUE.alpha, n) * T)
    x = np.minimum(bought, rng.geometric(rng.beta(TRUE.a, TRUE.b, n))).astype(float)
    t_x = np.where(x > 0, T * rng.beta(np.maximum(x, 1), bought - x + 1), 0.0)
    k = np.maximum(x, 1)
    spend = np.where(x > 0, rng.gamma(6.0 * k, 1 / (k * rng.gamma(4.0, 1 / 15.0, n))), 0.0)
    return x, t_x, T, spend


def per_call_us(stmt: str, env: dict[str, object]) -> float:
    timer = timeit.Timer(stmt, globals=env)
    loops, _ = timer.autorange()
    return min(timer.repeat(5, loops)) / loops * 1e6


def main(sizes: list[int]) -> None:
    params = TRUE
    env = {"p_alive": p_alive, "expected_purchases": expected_purchases, "params": params,
           "expected_spend": expected_spend, "fit_gamma_gamma": fit_gamma_gamma}
    x, t_x, T, spend = sample(2000)
    env["gg"] = fit_gamma_gamma(x, spend)
    print("scalar µs/call:")
    for stmt in ("p_alive(params, 3, 100.0, 300.0)",
                 "expected_purchases(params, 365.0, 3, 100.0, 300.0)",
                 "expected_purchases(params, 365.0, 0, 0.0, 10.0)",
                 "expected_spend(gg, 3, 42.0)"):
        print(f"  {per_call_us(stmt, env):6.2f}  {stmt}")
    for n in sizes:
        x, t_x, T, spend = sample(n)
        for sample_size in (None, 50_000):
            start = time.perf_counter()
            model = fit_population(x, t_x, T, spend, fitted_at_us=0, sample_size=sample_size)
            print(f"fit_population n={n} sample_size={sample_size}: "
                  f"{time.perf_counter() - start:.2f} s, converged={model.converged}, "
                  f"{model.bgnbd}")
        start = time.perf_counter()
        expected_purchases(model.bgnbd, 365.0, x, t_x, T)
        print(f"  vectorised expected_purchases n={n}: {time.perf_counter() - start:.3f} s")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lifetimes import BetaGeoFitter

        x, t_x, T, _ = sample(10_000)
        start = time.perf_counter()
        ours = fit_bgnbd_report(x, t_x, T).params
        mid = time.perf_counter()
        bgf = BetaGeoFitter().fit(x, t_x, T)
        end = time.perf_counter()
    theirs = bgf.params_[["r", "alpha", "a", "b"]].to_numpy()
    mine = np.array([ours.r, ours.alpha, ours.a, ours.b])
    print(f"n=10000: ours {mid - start:.2f} s, lifetimes {end - mid:.2f} s; "
          f"max rel param diff {np.max(np.abs(mine / theirs - 1)):.1e}")
    for t in (30.0, 365.0):
        e_ours = expected_purchases(ours, t, x, t_x, T)
        e_theirs = bgf.conditional_expected_number_of_purchases_up_to_time(t, x, t_x, T)
        print(f"  E[purchases in {t:g} d] max rel diff {np.max(np.abs(e_ours / e_theirs - 1)):.1e}")
    pa = p_alive(ours, x, t_x, T)
    print(f"  p_alive max abs diff "
          f"{np.max(np.abs(pa - bgf.conditional_probability_alive(x, t_x, T))):.1e}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100_000, 1_000_000])
