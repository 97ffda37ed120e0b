"""Champion/challenger for churn models: every model learns and is measured, one is served.

The flow keeps one :class:`ChurnArena` (global state, snapshotted with the flow). At each
purchase it calls :meth:`ChurnArena.open` (every model predicts; the
:class:`~models.churn.PendingLabel` goes into the customer's state) and
:meth:`ChurnArena.predict` (the served score); when a label matures
(:func:`~models.churn.mature_on_purchase` / :func:`~models.churn.mature_on_clock`) it
calls :meth:`ChurnArena.learn`: each model's metrics take the prediction it made at open
time, then each model learns the example.

**Promotion, with hysteresis.** Every ``evaluate_every`` matured labels each challenger's
recent metric (``recent_log_loss`` in the flow, or ``recent_auc``; decayed, see
:mod:`models.churn_metrics`) is compared with the champion's. The metric is the mean over
two *strata* of predictions, each measured apart: those opened at a purchase ("will this
buyer come back?") and those opened while the customer was silent ("will a quiet
customer buy again?"). Silent ones are most of the labels and mostly easy (long-silent
customers rarely return), so a pooled metric let a model win on them while wrong about
buyers: on CDNOW a logistic regression led on pooled recent log loss and served 0.000
risk to 2,834 just-purchased customers, half of whom did not buy again in 90 days. A
model's metric is unknown (no promotion either way) while a stratum has labels, but
fewer than ``min_stratum_labels``, or fewer than ``min_class_labels`` of either value; a
stratum without any is left out. The label values mature at different speeds: a "came
back" label as soon as the customer buys, a "churned" one only a horizon after the
prediction. In a stream's first horizon every matured label is a "came back", and on
CDNOW a logistic regression was promoted then, 5 weeks in, on labels none of which
could say "churned".

The challenger *leads* when it is ahead by more than ``margin + z * se`` (a lead the
noise could explain is no lead). For log loss, ``se`` is the standard error of the
*paired* lead: the decayed mean, per stratum, of the per-label difference between the
two models' losses (:class:`~models.churn_metrics.PairedDifference`). Both models are
scored on the same labels, and their errors move together (a customer who surprises one
model surprises the other). On the generator's stream BG/NBD's and Pareto/NBD's
stratified recent log losses each had a standard error of ~0.0105, their paired lead
one of 0.0016-0.0020: the unpaired allowance (0.01 + 2 x 0.015) kept the true model
(Pareto/NBD, 0.021-0.029 nats ahead) from ever being promoted; paired, it is. AUC has no
per-label difference: for ``recent_auc`` the allowance stays the unpaired one. One that leads for
``patience`` consecutive evaluations, with at least ``min_labels_to_promote`` labels
seen, becomes champion; every streak then restarts. To come back, the old champion must
in turn lead by as much for as long: equal models do not flip back and forth (a fixed
margin alone did, in ``tests/test_arena.py``: decayed AUCs of equal models drift apart
by more than 0.01 for several evaluations in a row).

**Versions.** ``model_version`` is ``"<champion>@v<generation>"``; the generation starts
at 1 and grows by one at each promotion. The weights keep learning under one version
(they change with every label); the report gives the label count behind each metric.
Until the champion has ``min_labels`` matured labels the arena serves the caller's prior
(e.g. :func:`models.churn.bgnbd_churn_prior`) as ``"prior:bgnbd"`` with source
``"prior"``; without a prior it serves the observed churn rate as ``"prior:base_rate"``.

**Size.** The models' bounds (``max_pickle_bytes``: logreg ~2 KB; tree <= 1.4 MB
measured, 4 MB bound) plus ~30 KB of metrics per model plus the promotion log (the last
``PROMOTION_LOG_LEN`` promotions).

>>> from models.churn import mature_on_purchase
>>> from models.transaction import DAY_US
>>> arena = ChurnArena(config=ArenaConfig(min_labels=2))
>>> x = {"purchases": 1.0}
>>> arena.predict(x, prior=0.4)
ChurnPrediction(risk=0.4, model_version='prior:bgnbd', source='prior')
>>> for day in range(4):
...     pending = arena.open(x, opened_at_us=day * DAY_US)
...     arena.learn(mature_on_purchase(pending, (day + 1) * DAY_US))
>>> arena.predict(x, prior=0.4).source, arena.predict(x).model_version
('model', 'logreg@v1')
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from models.churn import ChurnModel, LabeledExample, PendingLabel, default_models
from models.churn_metrics import DelayedLabelMetrics, PairedDifference, log_loss

PROMOTION_LOG_LEN = 100
METRICS = ("recent_auc", "recent_log_loss")  # higher is better / lower is better


@dataclass(frozen=True)
class ArenaConfig:
    min_labels: int = 500  # the champion's matured labels before its score is served
    evaluate_every: int = 250  # matured labels between promotion evaluations
    margin: float = 0.01  # the lead a challenger needs (AUC points, or log-loss nats)
    z: float = 2.0  # ... plus this many standard errors of the difference
    patience: int = 3  # consecutive evaluations it must lead for
    min_labels_to_promote: int = 1000
    metric: str = "recent_auc"  # or "recent_log_loss"
    half_life: float = 2000.0  # labels, for the recent metrics
    snapshot_every: int = 500  # labels between history points
    history_len: int = 200
    prior_name: str = "bgnbd"
    min_stratum_labels: int = 200  # a stratum's labels before it counts in the metric
    min_class_labels: int = 100  # ... and of each label value (churned, came back)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"ArenaConfig.metric: expected one of {METRICS}, got "
                             f"{self.metric!r}")
        for name in ("min_labels", "evaluate_every", "patience", "snapshot_every",
                     "history_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ArenaConfig.{name}: expected >= 1, got "
                                 f"{getattr(self, name)}")


STRATA = ("purchase", "silence")


def stratum(example: LabeledExample) -> str:
    """Which question a prediction answered: opened at a purchase (recency 0), or while
    the customer was silent."""
    return "purchase" if example.features.get("recency_days", 0.0) == 0.0 else "silence"


class ChurnPrediction(NamedTuple):
    risk: float  # P(no purchase within the horizon)
    model_version: str  # "logreg@v3", or "prior:bgnbd" during the cold start
    source: str  # "model" or "prior"


class ChurnArena:
    """Models, their delayed-label metrics, the champion and the promotion log."""

    def __init__(self, models: Mapping[str, ChurnModel] | None = None,
                 config: ArenaConfig | None = None, champion: str | None = None) -> None:
        self.config = config or ArenaConfig()
        self.models: dict[str, ChurnModel] = dict(models or default_models())
        if not self.models:
            raise ValueError("ChurnArena: expected at least one model")
        self.champion = champion or next(iter(self.models))
        if self.champion not in self.models:
            raise ValueError(f"ChurnArena: champion {self.champion!r} is not among the models "
                             f"{sorted(self.models)}")
        self.metrics = {name: self._new_metrics() for name in self.models}
        self.strata = {name: self._new_strata() for name in self.models}
        # per pair of models (names sorted), per stratum: the first one's log loss minus
        # the second one's, on the labels both predicted
        self.pairs: dict[tuple[str, str], dict[str, PairedDifference]] = {}
        self.labels = 0  # matured labels learned
        self.positives = 0
        self.generation = 1
        self.champion_since_us: int | None = None  # event time of the last promotion
        # The newest maturity seen: labels come out of event-time order (a customer's
        # event catches up wake-ups that matured labels earlier), so a promotion is dated
        # by this clock, never by the label that happened to trigger it.
        self.clock_us: int | None = None
        self.streaks = dict.fromkeys(self.models, 0)
        self.evaluations = 0
        self.promotions: deque[dict[str, Any]] = deque(maxlen=PROMOTION_LOG_LEN)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("clock_us", self.champion_since_us)  # an older snapshot
        if "strata" not in state:  # a snapshot from before the strata: they start empty
            self.strata = {name: self._new_strata() for name in self.models}
        self.__dict__.setdefault("pairs", {})  # ... or before the paired differences

    def _new_metrics(self) -> DelayedLabelMetrics:
        cfg = self.config
        return DelayedLabelMetrics(cfg.half_life, cfg.snapshot_every, cfg.history_len)

    def _new_strata(self) -> dict[str, DelayedLabelMetrics]:
        return {kind: self._new_metrics() for kind in STRATA}

    def use_lineup(self, models: Mapping[str, ChurnModel]) -> None:
        """Compete with the models named in ``models``: those already here keep what they
        learned, new ones start fresh, the others leave. A champion that leaves hands over
        to the prior's model (BG/NBD) if present, else to the first, as a new version."""
        kept = {name: self.models.get(name, model) for name, model in models.items()}
        if not kept:
            raise ValueError("ChurnArena: expected at least one model")
        cfg = self.config
        for name in kept.keys() - self.metrics.keys():
            self.metrics[name] = self._new_metrics()
            self.strata[name] = self._new_strata()
        self.models = kept
        self.metrics = {name: self.metrics[name] for name in kept}
        self.strata = {name: self.strata[name] for name in kept}
        self.streaks = {name: self.streaks.get(name, 0) for name in kept}
        self.pairs = {pair: d for pair, d in self.pairs.items()
                      if pair[0] in kept and pair[1] in kept}
        if self.champion not in kept:
            self.champion = cfg.prior_name if cfg.prior_name in kept else next(iter(kept))
            self.generation += 1

    @property
    def model_version(self) -> str:
        return f"{self.champion}@v{self.generation}"

    def open(self, features: Mapping[str, float], opened_at_us: int) -> PendingLabel:
        """Every model predicts now; the pending label remembers what each said."""
        predictions = {name: m.predict_proba_one(features) for name, m in self.models.items()}
        return PendingLabel.open(features, opened_at_us, predictions)

    def predict(self, features: Mapping[str, float], prior: float | None = None,
                pending: PendingLabel | None = None) -> ChurnPrediction:
        """The served churn risk: the champion's, or the prior while it is cold.

        Pass the ``pending`` just opened for the same features to reuse its prediction.
        """
        if self.metrics[self.champion].labels < self.config.min_labels:
            if prior is not None:
                return ChurnPrediction(float(prior), f"prior:{self.config.prior_name}", "prior")
            rate = (self.positives + 1) / (self.labels + 2)  # Laplace: 0.5 with no labels
            return ChurnPrediction(rate, "prior:base_rate", "prior")
        risk = None
        if pending is not None:
            risk = dict(pending.predictions).get(self.champion)
        if risk is None:
            risk = self.models[self.champion].predict_proba_one(features)
        return ChurnPrediction(risk, self.model_version, "model")

    def learn(self, example: LabeledExample) -> None:
        """Score each model's open-time prediction against the label, then learn it."""
        y, kind = example.label, stratum(example)
        losses = {}
        for name, model in self.models.items():
            p = example.predictions_at_open.get(name)
            if p is not None:  # absent for a model added after the prediction opened
                self.metrics[name].update(p, y, example.matured_at_us)
                self.strata[name][kind].update(p, y, example.matured_at_us)
                losses[name] = log_loss(p, y)
            model.learn_one(example.features, y)
        names = sorted(losses)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                self._pair(first, second)[kind].update(losses[first] - losses[second])
        self.labels += 1
        self.positives += y
        at = example.matured_at_us
        self.clock_us = at if self.clock_us is None else max(self.clock_us, at)
        if self.labels % self.config.evaluate_every == 0:
            self.evaluate(self.clock_us)

    def _pair(self, first: str, second: str) -> dict[str, PairedDifference]:
        pair = self.pairs.get((first, second))
        if pair is None:
            pair = self.pairs[first, second] = {
                kind: PairedDifference(self.config.half_life) for kind in STRATA}
        return pair

    def _counted_kinds(self, name: str) -> list[str]:
        """The strata of ``name`` with labels; none while one of them has too few."""
        cfg = self.config
        seen = [(kind, m) for kind, m in self.strata[name].items() if m.labels]
        if any(m.labels < cfg.min_stratum_labels or getattr(m, cfg.metric) is None
               or min(m.positives, m.labels - m.positives) < cfg.min_class_labels
               for _, m in seen):
            return []
        return [kind for kind, _ in seen]

    def _counted(self, name: str) -> list[DelayedLabelMetrics]:
        return [self.strata[name][kind] for kind in self._counted_kinds(name)]

    def stratified(self, name: str) -> float | None:
        """The promotion metric of ``name``: its recent metric, averaged over the strata."""
        counted = self._counted(name)
        if not counted:
            return None
        return sum(getattr(m, self.config.metric) for m in counted) / len(counted)

    def _score(self, name: str) -> float | None:
        value = self.stratified(name)
        if value is None:
            return None
        return value if self.config.metric == "recent_auc" else -value

    def _se(self, name: str) -> float:
        """Standard error of :meth:`stratified` (strata measured on separate labels)."""
        counted = self._counted(name)
        if not counted:
            return 0.0
        ses = [getattr(m, f"{self.config.metric}_se") or 0.0 for m in counted]
        return float(sum(se * se for se in ses) ** 0.5 / len(counted))

    def lead(self, name: str) -> tuple[float, float] | None:
        """How far ``name`` is ahead of the champion on the promotion metric, and the
        standard error of that lead; None while either one's metric is unknown. Log loss
        is compared label by label (paired); AUC as two separate measurements."""
        champion = self.champion
        kinds, champion_kinds = self._counted_kinds(name), self._counted_kinds(champion)
        if name == champion or not kinds or not champion_kinds:
            return None
        if self.config.metric == "recent_auc":
            score, best = self._score(name), self._score(champion)
            if score is None or best is None:
                return None
            return score - best, (self._se(name) ** 2 + self._se(champion) ** 2) ** 0.5
        first, second = sorted((name, champion))
        pair = self.pairs.get((first, second))
        shared = [kind for kind in kinds if kind in champion_kinds]
        if pair is None or not shared or any(
                pair[kind].labels < self.config.min_stratum_labels for kind in shared):
            return None
        sign = 1.0 if first == champion else -1.0  # the champion's loss minus name's
        lead = sum(sign * (pair[kind].mean or 0.0) for kind in shared) / len(shared)
        se = sum((pair[kind].se or 0.0) ** 2 for kind in shared) ** 0.5 / len(shared)
        return lead, se

    def _lead_report(self, name: str) -> dict[str, float] | None:
        lead = self.lead(name)
        return None if lead is None else {"lead": lead[0], "se": lead[1]}

    def evaluate(self, at_us: int) -> str | None:
        """One promotion evaluation; returns the new champion's name if one was promoted."""
        self.evaluations += 1
        cfg = self.config
        best = self._score(self.champion)
        promoted = None
        for name in self.models:
            if name == self.champion:
                continue
            score = self._score(name)
            if best is None:  # the champion's metric is unknown: any known one leads
                leads = score is not None
            else:
                lead = self.lead(name)
                leads = lead is not None and lead[0] > cfg.margin + cfg.z * lead[1]
            self.streaks[name] = self.streaks[name] + 1 if leads else 0
            ready = (self.streaks[name] >= cfg.patience
                     and self.metrics[name].labels >= cfg.min_labels_to_promote)
            if ready and (promoted is None or (score or 0.0) > (self._score(promoted) or 0.0)):
                promoted = name
        if promoted is not None:
            lead = self.lead(promoted)
            self.promotions.append({
                "at_us": at_us, "labels": self.labels, "from": self.champion, "to": promoted,
                "metric": f"{cfg.metric} (mean over strata)",
                "champion_value": self.stratified(self.champion),
                "challenger_value": self.stratified(promoted),
                "lead": None if lead is None else lead[0],
                "lead_se": None if lead is None else lead[1],
                "version": f"{promoted}@v{self.generation + 1}",
            })
            self.champion = promoted
            self.generation += 1
            self.champion_since_us = at_us
            self.streaks = dict.fromkeys(self.models, 0)
        return promoted

    def report(self) -> dict[str, Any]:
        """Everything ``GetModelReport`` shows: JSON-able."""
        return {
            "champion": self.champion,
            "model_version": self.model_version,
            "serving": ("model" if self.metrics[self.champion].labels >= self.config.min_labels
                        else "prior"),
            "champion_since_us": self.champion_since_us,
            "generation": self.generation,
            "labels": self.labels,
            "positives": self.positives,
            "evaluations": self.evaluations,
            "promotions": list(self.promotions),
            "config": asdict(self.config),
            "models": {
                name: {
                    "matured_labels": self.metrics[name].labels,
                    "metrics": self.metrics[name].snapshot(),
                    "promotion_metric": self.stratified(name),
                    "lead_over_champion": self._lead_report(name),
                    "strata": {kind: {"matured_labels": m.labels, "metrics": m.snapshot()}
                               for kind, m in self.strata[name].items()},
                    "calibration": self.metrics[name].calibration(),
                    "history": list(self.metrics[name].history),
                    "streak": self.streaks[name],
                }
                for name in self.models
            },
        }
