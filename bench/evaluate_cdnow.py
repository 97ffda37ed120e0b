"""Dev-only: the running pipeline on a real public dataset (CDNOW) against BG/NBD and
Pareto/NBD fitted offline on the same calibration period.

CDNOW (the classic BTYD benchmark, shipped in the ``lifetimes`` wheel): 23,570 customers'
CD purchases from January 1997 to June 1998. Same-day purchases of a customer are one
purchase (the BTYD convention). The first 39 weeks (to 1997-09-30) are replayed through
the real flow (a private broker and Redis from the embedded wheels), then one sentinel
event at the cut moves the stream clock there, so silent customers are woken. Every
customer's served score is read from Redis and judged on the 39 holdout weeks:

- ``churn_risk`` against "no purchase in the 90 days after the cut" (ROC AUC), beside
  days since the last purchase and the offline fits' P(no purchase in 90 days);
- ``expected_purchases`` (the flow runs with ``CRMSCORE_CLV_HORIZON_DAYS=273``, the
  holdout length) against the purchases each customer made in the holdout (MAE, RMSE,
  correlation, and the total), beside the offline fits' conditional expectations.

The served scores are as of each customer's last processed instant (its ``as_of``, at or
before the cut); the offline fits score everyone exactly at the cut, and again at each
customer's served ``as_of`` (what the served scores' lag alone costs them: for
``expected_purchases``, 273 days from ``as_of``, as served).

Run: ``.venv/bin/python -m bench.evaluate_cdnow`` (needs lifetimes and pandas, dev extras).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson

from bench.evaluate_churn import (
    DAY_S,
    HORIZON_DAYS,
    auc,
    auc_lead,
    calibration_table,
    epoch,
    flow_env,
    paired_bootstrap,
    run_flow,
)
from crmscore import embedded

START = datetime(1997, 1, 1, tzinfo=UTC)
CUT = START + timedelta(weeks=39)  # 1997-10-01T00:00: calibration is everything before
HOLDOUT_DAYS = 39 * 7
SENTINEL = "cdnow-clock"


def cdnow_purchases() -> dict[str, list[tuple[datetime, float]]]:
    """Per customer, (day, spend) of each purchase day, from lifetimes' CDNOW_master.txt."""
    import lifetimes

    path = Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"
    days: dict[str, dict[datetime, float]] = defaultdict(lambda: defaultdict(float))
    for row in path.read_text().splitlines()[1:]:
        customer, date, _cds, dollars = row.split()
        if float(dollars) > 0:  # a few zero-value rows: not purchases
            day = datetime.strptime(date, "%Y%m%d").replace(tzinfo=UTC)
            days[f"cd{customer}"][day] += float(dollars)
    return {c: sorted(d.items()) for c, d in days.items()}


def event(customer: str, n: int, at: datetime, amount: float) -> bytes:
    return orjson.dumps({
        "event_id": f"{customer}-{n}", "customer_id": customer, "type": "purchase",
        "occurred_at": (at + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "amount": round(amount, 2), "currency": "USD",
    })


def offline_fits(ids: list[str], purchases: dict[str, list[tuple[datetime, float]]],
                 served_at: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """BG/NBD and Pareto/NBD (lifetimes) on the calibration period: expected purchases in
    the holdout and P(no purchase in the next 90 days), scored at the cut; and the same
    fits' P(no purchase) scored at each customer's served ``as_of`` (Unix seconds), which
    tells how much of a gap to them is the served scores' lag."""
    from lifetimes import BetaGeoFitter, ParetoNBDFitter

    def summary(at: np.ndarray, before: np.ndarray) -> tuple[np.ndarray, ...]:
        """BTYD inputs at ``at`` from the purchases made before ``before``."""
        first = np.array([purchases[c][0][0].timestamp() for c in ids])
        seen = [[d.timestamp() for d, _ in purchases[c] if d.timestamp() < b]
                for c, b in zip(ids, before, strict=True)]
        x = np.array([len(s) - 1 for s in seen], dtype=float)
        last = np.array([max(s) for s in seen])
        return x, (last - first) / DAY_S, (at - first) / DAY_S

    cut = np.full(len(ids), CUT.timestamp())
    x, t_x, T = summary(cut, cut)  # a purchase on the cut's day is the holdout's
    lagged = summary(served_at, served_at + 1e-3)  # the served document counts its own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bg = BetaGeoFitter(penalizer_coef=0.0).fit(x, t_x, T)
        pnbd = ParetoNBDFitter(penalizer_coef=0.0).fit(x, t_x, T)

        def bg_no_buy(x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
            alive = np.asarray(bg.conditional_probability_alive(x, t_x, T), dtype=float)
            r, alpha = bg.params_["r"], bg.params_["alpha"]
            return (1 - alive) + alive * ((alpha + T) / (alpha + T + HORIZON_DAYS)) ** (r + x)

        def pnbd_no_buy(x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
            return np.array([pnbd.conditional_probability_of_n_purchases_up_to_time(
                0, HORIZON_DAYS, xi, ti, Ti) for xi, ti, Ti in zip(x, t_x, T, strict=True)])

        fits = {"BG/NBD": (bg, bg_no_buy), "Pareto/NBD": (pnbd, pnbd_no_buy)}
        return {name: {
            "no_buy": no_buy(x, t_x, T), "lagged_no_buy": no_buy(*lagged),
            "expected": np.asarray(fitter.conditional_expected_number_of_purchases_up_to_time(
                HOLDOUT_DAYS, x, t_x, T), dtype=float),
            "lagged_expected": np.asarray(
                fitter.conditional_expected_number_of_purchases_up_to_time(
                    HOLDOUT_DAYS, *lagged), dtype=float),
        } for name, (fitter, no_buy) in fits.items()}


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def rmse_lead(pred: np.ndarray, baseline: np.ndarray, actual: np.ndarray
              ) -> tuple[float, float, float]:
    """How much lower ``pred``'s RMSE is than ``baseline``'s, with a 95% paired bootstrap
    interval."""
    a, b = (pred - actual) ** 2, (baseline - actual) ** 2
    return paired_bootstrap(lambda picks: float(np.sqrt(b[picks[0]].mean())
                                                - np.sqrt(a[picks[0]].mean())), [len(actual)])


def main() -> int:
    purchases = cdnow_purchases()
    calibration = sorted(
        (at, event(c, n, at, amount))
        for c, days in purchases.items() for n, (at, amount) in enumerate(days) if at < CUT)
    lines = [line for _, line in calibration]
    lines.append(event(SENTINEL, 0, CUT - timedelta(hours=12, seconds=1), 1.0))
    with tempfile.TemporaryDirectory() as tmp, \
            embedded.running(embedded.start_broker()) as broker, \
            embedded.running(embedded.start_redis()) as redis_server:
        env = flow_env(broker, redis_server, Path(tmp), "cdnow",
                       CRMSCORE_CLV_HORIZON_DAYS=str(HOLDOUT_DAYS))
        result = run_flow(env, lines)
    docs = {c: d for c, d in result["docs"].items() if c != SENTINEL}
    ids = sorted(docs)
    in_90 = CUT + timedelta(days=HORIZON_DAYS)
    holdout_end = CUT + timedelta(days=HOLDOUT_DAYS)
    no_buy = np.array([int(not any(CUT <= d < in_90 for d, _ in purchases[c])) for c in ids])
    actual = np.array([sum(1 for d, _ in purchases[c] if CUT <= d < holdout_end) for c in ids])
    risk = np.array([docs[c]["churn_risk"] for c in ids], dtype=float)
    expected = np.array([docs[c]["expected_purchases"] or 0.0 for c in ids], dtype=float)
    recency = np.array([CUT.timestamp() - epoch(docs[c]["last_purchase_at"]) for c in ids])
    served_at = np.array([epoch(docs[c]["as_of"]) for c in ids])
    lag = (CUT.timestamp() - served_at) / DAY_S
    fits = offline_fits(ids, purchases, served_at)
    report = result["report"]

    print(f"CDNOW: {len(ids):,} customers, {len(lines) - 1:,} purchase days before "
          f"{CUT:%Y-%m-%d}; {no_buy.mean():.1%} bought nothing in the next 90 days, "
          f"{actual.sum():,} purchase days in the {HOLDOUT_DAYS}-day holdout")
    print(f"served model: {report.get('model_version')}; served scores are as of "
          f"{np.median(lag):.0f} days before the cut at the median (max {lag.max():.0f})")
    versions = Counter(docs[c]["model_version"] for c in ids)
    print("served documents by the model that scored them: " + ", ".join(
        f"{v} {n:,}" for v, n in versions.most_common()))
    refits = report.get("btyd_fits", [])
    rival = [f for f in refits if f.get("paretonbd")]
    print(f"BTYD refits (the last {len(refits)} kept): {sum(bool(f.get('ok')) for f in refits)} "
          f"taken, {len(rival)} with Pareto/NBD" + (f", the last {rival[-1]['paretonbd']}"
                                                    if rival else ""))
    for p in report.get("churn", {}).get("promotions", []):
        print(f"  promotion {p['from']} -> {p['to']} ({p['version']}) on "
              f"{datetime.fromtimestamp(p['at_us'] / 1e6, UTC):%Y-%m-%d} after "
              f"{p['labels']:,} labels: {p['metric']} {p['champion_value']:.3f} -> "
              f"{p['challenger_value']:.3f}")
    for name, m in report.get("churn", {}).get("models", {}).items():
        print(f"  arena {name:8s} matured labels {m['matured_labels']:7d}  " + "  ".join(
            f"{k} {v:.3f}" for k, v in m["metrics"].items() if isinstance(v, float)))
        for kind, st in m.get("strata", {}).items():
            print(f"    {kind:8s} labels {st['matured_labels']:7d}  " + "  ".join(
                f"{k} {st['metrics'][k]:.3f}" for k in ("auc", "recent_auc", "log_loss",
                                                        "recent_log_loss")
                if isinstance(st["metrics"].get(k), float)))
    # Log loss and Brier score judge the probabilities themselves (recency is no
    # probability: ranked only).
    print(f"\n{'churn: P(no purchase in 90 days)':38s} {'ROC AUC':>8s} {'log loss':>9s} "
          f"{'Brier':>7s}")
    for name, score in (("churn_risk (pipeline, served)", risk),
                        ("days since last purchase", recency),
                        *((f"{n} offline", f["no_buy"]) for n, f in fits.items()),
                        *((f"{n} offline, at each served as_of", f["lagged_no_buy"])
                          for n, f in fits.items())):
        quality = "" if score is recency else (
            f" {log_loss(score, no_buy):9.4f} {np.mean((score - no_buy) ** 2):7.4f}")
        print(f"{name:38s} {auc(score, no_buy):8.3f}{quality}")
    print("churn_risk's lead in AUC [95% paired bootstrap]: " + ", ".join(
        f"over {name} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        for name, score in (("days since last purchase", recency),
                            *((f"{n} offline", f["no_buy"]) for n, f in fits.items()))
        for d, lo, hi in [auc_lead([(risk, score, no_buy)])]))
    # expected_purchases is a conditional mean: squared error and the total judge it.
    # MAE is least at the conditional median, which is 0 for most customers here, so it
    # favours a forecast that under-predicts everyone.
    print(f"\n{'purchases in the holdout':38s} {'MAE':>7s} {'RMSE':>7s} {'corr':>6s} "
          f"{'total':>8s} {'bias':>6s}  (actual {actual.sum():,})")
    for name, pred in (("expected_purchases (pipeline, served)", expected),
                       *((f"{n} offline", f["expected"]) for n, f in fits.items()),
                       *((f"{n} offline, at each served as_of", f["lagged_expected"])
                         for n, f in fits.items())):
        err = pred - actual
        print(f"{name:38s} {np.abs(err).mean():7.3f} {np.sqrt((err ** 2).mean()):7.3f} "
              f"{np.corrcoef(pred, actual)[0, 1]:6.3f} {pred.sum():8,.0f} "
              f"{pred.sum() / actual.sum() - 1:+6.1%}")
    print("expected_purchases' RMSE below each offline fit's [95% paired bootstrap]: "
          + ", ".join(f"{n} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for n, f in fits.items()
                      for d, lo, hi in [rmse_lead(expected, f["expected"], actual)]))
    print("\ncalibration of churn_risk against no purchase in the next 90 days:")
    print("\n".join(calibration_table(risk, no_buy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
