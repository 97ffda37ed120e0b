"""Dev-only: does the running pipeline's churn_risk beat recency and offline BG/NBD?

Generates a stream with ground truth (every customer has a latent stop time), cuts it
at a calibration instant, replays the calibration period through the real flow (a
private broker and Redis from the embedded wheels), reads every customer's score from
Redis, and judges them in the same run against two baselines computed on the same
calibration data:

- recency: days since the last purchase;
- BG/NBD fitted offline with the ``lifetimes`` package: 1 - P(alive), and its
  P(no purchase within the horizon) (the same quantity churn_risk predicts).

Pareto/NBD fitted offline (lifetimes) is printed too: the generator's latent process is
exactly Pareto/NBD's (at ``--rhythm 1``), so its score at the cut is near the best any
scorer can do from purchase histories alone.

Two outcomes: *stopped* (the latent stop time is before the cut: the generator's
truth) and *no purchase within the next 90 days* (observed after the cut, in the
generated file). Prints ROC AUC for each, and churn_risk's calibration table.

Run: ``.venv/bin/python bench/evaluate_churn.py [--customers 5000] [--seed 3 [4 ...]]``
(several seeds: one run each, then churn_risk's leads averaged over them).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson
import redis

from crmscore import embedded
from crmscore.doc_codec import load
from crmscore.layout import RedisLayout
from crmscore.replay import publish_lines
from crmscore.settings import Settings

DAY_S = 86_400.0
HORIZON_DAYS = 90.0
# Seconds without a new score version, after the last event, before the replay counts as
# done. 8 was too short once a silent customer's instants come in one wake-up: a CDNOW
# replay went quiet that long with instants still due, and was read 76 days behind.
QUIET_S = 30.0


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_bootstrap(lead: Callable[[list[np.ndarray]], float], sizes: Sequence[int],
                     rounds: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """``lead`` (a difference between two scores' metrics, given each run's customers'
    indices) over all customers, with a 95% interval from resampling each run's customers
    apart (stratified), each customer's scores kept together."""
    rng = np.random.default_rng(seed)
    leads = [lead([rng.integers(0, n, n) for n in sizes]) for _ in range(rounds)]
    lo, hi = np.quantile(leads, [0.025, 0.975])
    return lead([np.arange(n) for n in sizes]), float(lo), float(hi)


def auc_lead(runs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
             ) -> tuple[float, float, float]:
    """How much higher a score's AUC is than a baseline's on the same customers, averaged
    over runs of ``(scores, baseline, labels)``, with a 95% paired bootstrap interval: two
    scores of the same histories are so correlated that their AUCs' own intervals (~0.003
    each at 5,000 customers) overlap even where one is always ahead."""
    def lead(picks: list[np.ndarray]) -> float:
        return float(np.mean([auc(s[i], y[i]) - auc(b[i], y[i])
                              for (s, b, y), i in zip(runs, picks, strict=True)]))
    return paired_bootstrap(lead, [len(y) for _, _, y in runs])


def generate(work: Path, customers: int, seed: int, rhythm: float
             ) -> tuple[list[bytes], dict[str, dict]]:
    out = work / "events.jsonl"
    subprocess.run([sys.executable, "-m", "crmscore.cli", "generate", "--customers",
                    str(customers), "--days", "730", "--start", "2024-01-01T00:00:00Z",
                    "--seed", str(seed), "--malformed-rate", "0", "--rhythm", str(rhythm),
                    "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    rows = map(orjson.loads, (work / "events.truth.jsonl").read_bytes().splitlines())
    return out.read_bytes().splitlines(), {t["customer_id"]: t for t in rows if "stop_at" in t}


def flow_env(broker: embedded.Server, redis_server: embedded.Server, work: Path, name: str,
             **extra: str) -> dict[str, str]:
    """The environment of a flow on the private broker and Redis, with its own topics;
    events decades old (history replayed) are not refused as from the future, and a
    change of the served model rescores at once (the replay is judged when it ends)."""
    token = f"{name}-{uuid.uuid4().hex[:8]}"
    return {**os.environ, "CRMSCORE_KAFKA_BOOTSTRAP": broker.address,
            "CRMSCORE_REDIS_URL": f"redis://{redis_server.address}/0",
            "CRMSCORE_TRANSACTIONS_TOPIC": token, "CRMSCORE_DLQ_TOPIC": f"{token}-dlq",
            "CRMSCORE_TIMERS_TOPIC": f"{token}-timers",
            "CRMSCORE_RECOVERY_DIR": str(work / "recovery"),
            "CRMSCORE_MAX_FUTURE_SECONDS": str(40 * 365 * DAY_S),
            "CRMSCORE_RESCORE_RATE": "0", **extra}


def run_flow(settings_env: dict[str, str], lines: list[bytes]) -> dict:
    settings = Settings.from_env(settings_env)
    layout = RedisLayout(settings.redis_prefix)
    publish_lines(settings, lines)
    conn = redis.Redis.from_url(settings.redis_url)
    flow = subprocess.Popen([sys.executable, "-m", "crmscore.cli", "flow"], env=settings_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    try:
        previous, quiet_since = None, time.monotonic()
        while True:
            raw = conn.hget(layout.status(), "doc")
            st = orjson.loads(raw) if raw else {}
            state = (st.get("events_consumed"), score_versions(conn, layout))
            if state != previous:
                previous, quiet_since = state, time.monotonic()
            elif (st.get("events_consumed") == len(lines)
                  and time.monotonic() - quiet_since > QUIET_S):
                break
            if flow.poll() is not None:
                raise SystemExit(f"the flow exited with {flow.returncode}")
            time.sleep(1.0)
        print(f"flow: {len(lines):,} events in {time.monotonic() - started - QUIET_S:.0f} s")
        docs = {}
        for key in conn.scan_iter(match=layout.score_pattern(), count=1000):
            doc = conn.hget(key, "doc")
            if isinstance(doc, bytes):
                d = load(doc)
                docs[d["customer_id"]] = d
        report = orjson.loads(conn.hget(layout.model_report(), "doc") or b"{}")
        print(f"wake-ups sent: {topic_messages(settings, settings.timers_topic):,}")
        return {"docs": docs, "status": st, "report": report}
    finally:
        flow.terminate()
        flow.wait(30)


def topic_messages(settings: Settings, topic: str) -> int:
    """How many messages ``topic`` holds (its partitions' end offsets, from offset 0)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"count-{uuid.uuid4().hex[:8]}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in partitions)
    finally:
        consumer.close()


def score_versions(conn: redis.Redis, layout: RedisLayout) -> int:
    """Sum of every score document's version: changes while wake-ups are still firing."""
    pipe = conn.pipeline(transaction=False)
    for key in conn.scan_iter(match=layout.score_pattern(), count=1000):
        pipe.hget(key, "v")
    return sum(int(v) for v in pipe.execute() if v is not None)


def offline_baselines(docs: dict[str, dict], cut: float,
                      online_pnbd: Mapping[str, float] | None
                      ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """lifetimes' BG/NBD and Pareto/NBD fitted on the calibration summaries: each one's
    1 - P(alive) at the cut, and each one's P(no purchase in the horizon) at the cut and at the
    customer's served ``as_of`` (what the served scores' lag alone costs); and the flow's
    own Pareto/NBD parameters at the served ``as_of`` (what its fit costs); and lifetimes'
    Pareto/NBD parameters, to print beside the flow's."""
    from lifetimes import BetaGeoFitter, ParetoNBDFitter

    ids = list(docs)
    first = np.array([epoch(docs[c]["first_purchase_at"]) for c in ids])
    last = np.array([epoch(docs[c]["last_purchase_at"]) for c in ids])
    x = np.array([docs[c]["purchase_count"] - 1 for c in ids], dtype=float)
    served = np.array([epoch(docs[c]["as_of"]) for c in ids])
    t_x, T = (last - first) / DAY_S, (cut - first) / DAY_S
    T_served = np.maximum((served - first) / DAY_S, t_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bg = BetaGeoFitter(penalizer_coef=0.001).fit(x, t_x, T)
        np.random.seed(0)  # lifetimes draws the Pareto/NBD fit's starting point
        pnbd = ParetoNBDFitter(penalizer_coef=0.0).fit(x, t_x, T)

        def bg_no_buy(T: np.ndarray) -> np.ndarray:
            alive = np.asarray(bg.conditional_probability_alive(x, t_x, T), dtype=float)
            r, alpha = bg.params_["r"], bg.params_["alpha"]
            return (1 - alive) + alive * ((alpha + T) / (alpha + T + HORIZON_DAYS)) ** (r + x)

        def pnbd_no_buy(T: np.ndarray) -> np.ndarray:
            return np.array([pnbd.conditional_probability_of_n_purchases_up_to_time(
                0, HORIZON_DAYS, *row) for row in zip(x, t_x, T, strict=True)])

        return {
            "bg_dead": 1 - np.asarray(bg.conditional_probability_alive(x, t_x, T), dtype=float),
            "pnbd_dead": 1 - np.asarray(pnbd.conditional_probability_alive(x, t_x, T),
                                        dtype=float),
            "bg_no_buy": bg_no_buy(T), "bg_lagged": bg_no_buy(T_served),
            "pnbd_no_buy": pnbd_no_buy(T),
            "pnbd_lagged": paretonbd_no_buy(pnbd.params_, x, t_x, T_served),
            "pnbd_online": (np.full(len(x), np.nan) if online_pnbd is None
                            else paretonbd_no_buy(online_pnbd, x, t_x, T_served)),
        }, {k: float(v) for k, v in pnbd.params_.items()}


def paretonbd_no_buy(params: Mapping[str, float], x: np.ndarray, t_x: np.ndarray,
                     T: np.ndarray) -> np.ndarray:
    """Pareto/NBD's P(no purchase in the horizon) for lifetimes' fitted ``params``, by this
    project's closed form (models/paretonbd.py): lifetimes returns NaN where ``T == t_x``
    (a customer scored at their last purchase), which served ``as_of`` often is."""
    from models.paretonbd import ParetoNbdParams, p_no_purchase

    fitted = ParetoNbdParams(*(float(params[k]) for k in ("r", "alpha", "s", "beta")))
    return np.array([float(p_no_purchase(fitted, HORIZON_DAYS, int(a), b, c))
                     for a, b, c in zip(x, t_x, T, strict=True)])


def calibration_table(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[str]:
    rows = ["  predicted      n  mean risk  observed"]
    edges = np.linspace(0, 1, bins + 1)
    for lo, hi in itertools.pairwise(edges):
        inside = (p >= lo) & ((p < hi) | (hi == 1.0))
        if inside.any():
            rows.append(f"  {lo:.1f}-{hi:.1f}  {inside.sum():6d}  {p[inside].mean():9.3f}"
                        f"  {y[inside].mean():8.3f}")
    return rows


# The baselines churn_risk must beat, by their keys in offline_baselines (or "recency").
BASELINES = (("recency", "recency"), ("BG/NBD P(no buy in 90d)", "bg_no_buy"),
             ("BG/NBD 1 - p_alive", "bg_dead"))
OUTCOMES = ("stopped", "no-buy-90d")


@dataclass(frozen=True)
class Judged:
    """One run's buyers, aligned: churn_risk, the baselines (BASELINES' keys), outcomes."""

    risk: np.ndarray
    baselines: dict[str, np.ndarray]
    outcomes: dict[str, np.ndarray]  # OUTCOMES' names -> 0/1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--seed", type=int, nargs="+", default=[3],
                        help="one run per seed; with several, churn_risk's leads averaged "
                        "over the runs too")
    parser.add_argument("--rhythm", type=float, default=1.0,
                        help="gamma shape of purchase gaps (1: Poisson, the Pareto/NBD "
                        "family BG/NBD assumes; 4: regular habits)")
    parser.add_argument("--cut-day", type=float, default=600.0,
                        help="calibration period: the first this many days of the 730")
    args = parser.parse_args()
    runs = []
    for seed in args.seed:
        print(f"== seed {seed}")
        runs.append(judge(args.customers, seed, args.rhythm, args.cut_day))
    if len(runs) > 1:
        print(f"== churn_risk's lead averaged over seeds {', '.join(map(str, args.seed))} "
              f"({sum(len(r.risk) for r in runs):,} buyers), AUC difference [95% paired "
              "bootstrap, each run's customers resampled apart]:")
        print_leads(runs)
    return 0


def print_leads(runs: Sequence[Judged]) -> None:
    for name, key in BASELINES:
        leads = [auc_lead([(r.risk, r.baselines[key], r.outcomes[outcome]) for r in runs])
                 for outcome in OUTCOMES]
        print(f"  over {name:29s} " + "  ".join(
            f"{outcome} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            for outcome, (d, lo, hi) in zip(OUTCOMES, leads, strict=True)))


def judge(customers: int, seed: int, rhythm: float, cut_day: float) -> Judged:
    """One run: generate, replay the calibration period through the flow, print every
    score's AUC, churn_risk's leads and calibration; return the aligned scores."""
    with tempfile.TemporaryDirectory() as tmp, \
            embedded.running(embedded.start_broker()) as broker, \
            embedded.running(embedded.start_redis()) as redis_server:
        work = Path(tmp)
        lines, truth = generate(work, customers, seed, rhythm)
        cut = epoch("2024-01-01T00:00:00+00:00") + cut_day * DAY_S
        times = [epoch(orjson.loads(line)["occurred_at"]) for line in lines]
        calibration = [line for line, t in zip(lines, times, strict=True) if t <= cut]
        bought_after: set[str] = set()
        for line, t in zip(lines, times, strict=True):
            if cut < t <= cut + HORIZON_DAYS * DAY_S:
                e = orjson.loads(line)
                if e["type"] == "purchase":
                    bought_after.add(e["customer_id"])
        result = run_flow(flow_env(broker, redis_server, work, "eval"), calibration)
    docs = {c: d for c, d in result["docs"].items() if d["purchase_count"] > 0}
    ids = list(docs)
    clock = epoch(result["status"]["stream_clock"])
    stopped = np.array([int(truth[c]["stop_at"] is not None and epoch(truth[c]["stop_at"]) < clock)
                        for c in ids])
    no_buy = np.array([int(c not in bought_after) for c in ids])
    risk = np.array([docs[c]["churn_risk"] for c in ids])
    dead = np.array([1 - docs[c]["p_alive"] for c in ids])
    recency = np.array([clock - epoch(docs[c]["last_purchase_at"]) for c in ids])
    report = result["report"]
    online_pnbd = (report.get("btyd") or {}).get("paretonbd")
    offline, offline_pnbd = offline_baselines(docs, clock, online_pnbd)
    lag = clock - np.array([epoch(docs[c]["as_of"]) for c in ids])
    print(f"{len(ids):,} buyers at the cut ({datetime.fromtimestamp(clock):%Y-%m-%d}); "
          f"stopped {stopped.mean():.1%}, no purchase in the next 90 days {no_buy.mean():.1%}")
    print(f"served scores' lag behind the clock (days): median {np.median(lag) / DAY_S:.1f}, "
          f"p90 {np.quantile(lag, 0.9) / DAY_S:.1f}")
    print(f"served model: {report.get('model_version')}, matured labels "
          f"{report.get('churn', {}).get('labels')}, online AUC of the champion "
          f"{report.get('metrics', {}).get('churn_auc', float('nan')):.3f}; p_alive from "
          f"{report.get('value_model')}")
    for p in report.get("churn", {}).get("promotions", []):
        print(f"  promoted {p['from']} -> {p['to']} at label {p['labels']}: lead "
              f"{p.get('lead')} +- {p.get('lead_se')}")
    for name, m in report.get("churn", {}).get("models", {}).items():
        metrics = m["metrics"]
        print(f"  arena {name:8s} labels {m['matured_labels']:7d}  " + "  ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        strata = m.get("strata", {})
        print(f"           promotion metric {m.get('promotion_metric')}; " + "  ".join(
            f"{kind} {s['matured_labels']} labels ({s['metrics']['positives']} churned), log "
            f"loss {s['metrics']['log_loss']:.4f}, recent {s['metrics']['recent_log_loss']:.4f}"
            f" +- {s['metrics']['recent_log_loss_se']:.4f}"
            for kind, s in strata.items() if s["metrics"]["recent_log_loss"] is not None)
            + f"; lead over the champion {m.get('lead_over_champion')}")
    print(f"{'score':34s} {'AUC stopped':>12s} {'AUC no-buy-90d':>15s}")
    for name, s in (("churn_risk (pipeline)", risk), ("1 - p_alive (pipeline)", dead),
                    ("recency (days since purchase)", recency),
                    ("BG/NBD 1 - p_alive (lifetimes)", offline["bg_dead"]),
                    ("Pareto/NBD 1 - p_alive (lifetimes)", offline["pnbd_dead"]),
                    ("BG/NBD P(no buy in 90d)", offline["bg_no_buy"]),
                    ("  the same at each served as_of", offline["bg_lagged"]),
                    ("Pareto/NBD P(no buy in 90d)", offline["pnbd_no_buy"]),
                    ("  the same at each served as_of", offline["pnbd_lagged"]),
                    ("  the flow's own fit, at each as_of", offline["pnbd_online"])):
        print(f"{name:34s} {auc(s, stopped):12.4f} {auc(s, no_buy):15.4f}")
    judged = Judged(risk, {"recency": recency, **offline},
                    dict(zip(OUTCOMES, (stopped, no_buy), strict=True)))
    print("churn_risk's lead over each baseline, AUC difference [95% paired bootstrap]:")
    print_leads([judged])
    print(f"Pareto/NBD parameters: the flow's {online_pnbd}; lifetimes' "
          f"{ {k: round(v, 4) for k, v in offline_pnbd.items()} }")
    print("calibration of churn_risk against no purchase in the next 90 days:")
    print("\n".join(calibration_table(risk, no_buy)))
    return judged


if __name__ == "__main__":
    sys.exit(main())
