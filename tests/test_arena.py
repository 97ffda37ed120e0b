"""Champion/challenger: promotion with hysteresis, cold start, versions, the report."""

from __future__ import annotations

import json
import math
import pickle
import random
from collections.abc import Mapping

import pytest

from models.arena import ArenaConfig, ChurnArena, ChurnPrediction
from models.churn import LabeledExample, mature_on_clock, mature_on_purchase
from models.transaction import DAY_US


class FeatureModel:
    """A stub keeping the churn-model contract: its probability is sigmoid(x[key])."""

    max_pickle_bytes = 1024

    def __init__(self, name: str, key: str) -> None:
        self.name, self.key, self.learned = name, key, 0

    def predict_proba_one(self, x: Mapping[str, float]) -> float:
        return 1.0 / (1.0 + math.exp(-x.get(self.key, 0.0)))

    def learn_one(self, x: Mapping[str, float], y: int) -> None:
        self.learned += 1

    def clone(self) -> FeatureModel:
        return FeatureModel(self.name, self.key)


def labeled_stream(n: int, seed: int, noise: Mapping[str, float]):
    """Examples whose label follows a latent score z; model ``k`` sees z + noise[k]."""
    rng = random.Random(seed)
    for i in range(n):
        z = rng.gauss(-1.5, 1.5)
        y = int(rng.random() < 1 / (1 + math.exp(-z)))
        x = {key: z + rng.gauss(0.0, sd) for key, sd in noise.items()}
        yield i, x, y


def feed(arena: ChurnArena, n: int, seed: int, noise: Mapping[str, float]) -> list[str]:
    """Open, mature (as a purchase would) and learn; the version served after each label."""
    versions = []
    for i, x, y in labeled_stream(n, seed, noise):
        opened = arena.open(x, opened_at_us=i * DAY_US)
        if y:
            example = mature_on_clock(opened, (i + 91) * DAY_US)
        else:
            example = mature_on_purchase(opened, (i + 1) * DAY_US)
        arena.learn(example)
        versions.append(arena.predict(x).model_version)
    return versions


def arena_of(*pairs: tuple[str, str], **config: float) -> ChurnArena:
    models = {name: FeatureModel(name, key) for name, key in pairs}
    return ChurnArena(models, ArenaConfig(min_labels=100, **config))


def test_a_better_challenger_is_promoted_after_k_evaluations() -> None:
    arena = arena_of(("weak", "w"), ("good", "g"), evaluate_every=200, patience=3,
                     margin=0.01, min_labels_to_promote=1000)
    assert arena.champion == "weak" and arena.model_version == "weak@v1"
    versions = feed(arena, 6000, seed=1, noise={"w": 3.0, "g": 0.3})
    assert arena.champion == "good" and arena.model_version == "good@v2"
    (promotion,) = arena.promotions  # exactly once, never back
    assert promotion["from"] == "weak" and promotion["to"] == "good"
    assert promotion["version"] == "good@v2"
    assert promotion["challenger_value"] > promotion["champion_value"] + 0.01
    # the earliest it could happen: 1000 labels and then 3 consecutive leads
    assert promotion["labels"] >= 1000 and promotion["labels"] % 200 == 0
    assert promotion["labels"] <= 1400  # the lead is huge: no later than that
    assert arena.champion_since_us == promotion["at_us"]
    first_good = versions.index("good@v2")
    assert set(versions[:99]) == {"prior:base_rate"}  # min_labels=100: the cold start
    assert set(versions[99:first_good]) == {"weak@v1"}
    assert set(versions[first_good:]) == {"good@v2"}
    assert all(m.learned == 6000 for m in arena.models.values())  # everyone keeps learning


def test_the_promotion_waits_for_enough_labels() -> None:
    arena = arena_of(("weak", "w"), ("good", "g"), evaluate_every=100, patience=2,
                     min_labels_to_promote=3000)
    feed(arena, 2999, seed=2, noise={"w": 3.0, "g": 0.3})
    assert arena.champion == "weak" and arena.streaks["good"] >= 2
    feed(arena, 1, seed=3, noise={"w": 3.0, "g": 0.3})
    assert arena.champion == "good"


@pytest.mark.parametrize("seed", range(3))
def test_equal_noisy_models_never_flip_flop(seed: int) -> None:
    arena = arena_of(("a", "a"), ("b", "b"))  # default margin, patience, half-life
    feed(arena, 30_000, seed=seed, noise={"a": 1.0, "b": 1.0})
    assert arena.evaluations == 30_000 // arena.config.evaluate_every
    assert len(arena.promotions) == 0, list(arena.promotions)


def test_without_hysteresis_equal_models_would_flip() -> None:
    """The control for the test above: without margin, noise allowance and patience the
    equal models flip back and forth."""
    arena = arena_of(("a", "a"), ("b", "b"), margin=0.0, z=0.0, patience=1,
                     min_labels_to_promote=1)
    feed(arena, 30_000, seed=0, noise={"a": 1.0, "b": 1.0})
    assert len(arena.promotions) >= 4


def test_log_loss_can_be_the_promotion_metric() -> None:
    arena = arena_of(("weak", "w"), ("good", "g"), metric="recent_log_loss", patience=2)
    feed(arena, 5000, seed=4, noise={"w": 2.0, "g": 0.2})
    assert arena.champion == "good"
    with pytest.raises(ValueError, match="metric"):
        ArenaConfig(metric="accuracy")


def feed_shared_error(arena: ChurnArena, n: int, seed: int, extra: Mapping[str, float]):
    """Labels from a latent score z; every model sees z + u, one error u they share (what
    a purchase history cannot tell), plus its own extra noise ``extra[key]``."""
    rng = random.Random(seed)
    for i in range(n):
        z = rng.gauss(-1.0, 1.5)
        y = int(rng.random() < 1 / (1 + math.exp(-z)))
        u = rng.gauss(0.0, 1.5)
        x = {key: z + u + rng.gauss(0.0, sd) for key, sd in extra.items()}
        opened = arena.open(x, opened_at_us=i * DAY_US)
        arena.learn(mature_on_clock(opened, (i + 91) * DAY_US) if y
                    else mature_on_purchase(opened, (i + 1) * DAY_US))


def test_log_loss_leads_are_paired_so_shared_errors_do_not_hide_a_steady_lead() -> None:
    """Both models share most of their error; "better" is ahead by ~0.02 nats on every
    kind of label. Unpaired, each loss has a standard error of ~0.016 and the allowance
    (0.01 + 2 x 0.023) hides the lead; paired, the difference's is ~0.003."""
    arena = arena_of(("worse", "w"), ("better", "b"), metric="recent_log_loss")
    feed_shared_error(arena, 8000, seed=0, extra={"w": 0.5, "b": 0.0})
    assert arena.champion == "better"
    (promotion,) = arena.promotions
    assert promotion["lead"] > arena.config.margin + arena.config.z * promotion["lead_se"]
    lead, se = arena.lead("worse")  # the old champion, now behind
    assert lead < -arena.config.margin and se < 0.005
    unpaired = (arena._se("better") ** 2 + arena._se("worse") ** 2) ** 0.5
    assert -lead < arena.config.margin + arena.config.z * unpaired  # unpaired: no promotion
    assert arena.report()["models"]["worse"]["lead_over_champion"] == {"lead": lead, "se": se}


@pytest.mark.parametrize("seed", range(3))
def test_paired_equal_models_never_flip_flop(seed: int) -> None:
    arena = arena_of(("a", "a"), ("b", "b"), metric="recent_log_loss")
    feed_shared_error(arena, 30_000, seed=seed, extra={"a": 0.5, "b": 0.5})
    assert len(arena.promotions) == 0, list(arena.promotions)
    assert arena.lead("b") is not None


def test_a_model_wrong_about_buyers_is_not_promoted_for_being_right_about_silent_ones():
    """Strata: 90% of the labels come from silent customers, where "pooled" is sharp; at
    purchases it is confidently wrong. Pooled over all labels it measures better than
    "steady" (the control); per stratum it loses on buyers, and is not promoted."""
    arena = arena_of(("steady", "st"), ("pooled", "pw"), metric="recent_log_loss",
                     patience=2)
    rng = random.Random(11)
    for i in range(8000):
        silent = rng.random() < 0.9
        z = rng.gauss(2.0 if silent else -0.5, 2.0)
        y = int(rng.random() < 1 / (1 + math.exp(-z)))
        x = {"recency_days": 120.0 if silent else 0.0, "st": z + rng.gauss(0.0, 1.5),
             "pw": z if silent else -2.0}  # at a purchase: "surely they come back"
        opened = arena.open(x, opened_at_us=i * DAY_US)
        arena.learn(mature_on_clock(opened, (i + 91) * DAY_US) if y
                    else mature_on_purchase(opened, (i + 1) * DAY_US))
    pooled = {name: m.recent_log_loss for name, m in arena.metrics.items()}
    assert pooled["pooled"] < pooled["steady"] - 0.03  # pooled, "pooled" would win
    strata = {name: {k: m.labels for k, m in arena.strata[name].items()}
              for name in arena.models}
    assert strata["steady"]["purchase"] > 600 and strata["steady"]["silence"] > 6000
    assert arena.stratified("pooled") > arena.stratified("steady")
    assert arena.champion == "steady" and not arena.promotions
    report = arena.report()["models"]["pooled"]
    assert report["promotion_metric"] == arena.stratified("pooled")
    assert report["strata"]["purchase"]["matured_labels"] == strata["pooled"]["purchase"]


def test_no_promotion_on_labels_that_could_only_say_came_back():
    """A stream's first horizon matures only "came back" labels (a purchase closes a
    prediction at once; "churned" needs the whole horizon). A model that always says
    "they come back" looks perfect on them: it must not be promoted until both label
    values have been seen."""
    arena = arena_of(("fair", "f"), ("sure", "s"), metric="recent_log_loss", patience=2)
    x = {"f": 0.0, "s": -5.0}  # 0.5 vs 0.007
    for i in range(3000):
        arena.learn(mature_on_purchase(arena.open(x, opened_at_us=i * DAY_US),
                                       (i + 1) * DAY_US))
    assert arena.metrics["sure"].recent_log_loss < arena.metrics["fair"].recent_log_loss
    assert arena.stratified("sure") is None and arena.evaluations == 12
    assert arena.champion == "fair" and not arena.promotions


def test_cold_start_serves_the_prior_until_min_labels() -> None:
    arena = ChurnArena(config=ArenaConfig(min_labels=50))  # the real model families
    x = {"purchases": 2.0, "gap_last_days": 30.0}
    served = []
    for i in range(60):
        served.append(arena.predict(x, prior=0.2))
        opened = arena.open(x, i * DAY_US)
        arena.learn(mature_on_purchase(opened, (i + 1) * DAY_US))
    assert served[:50] == [ChurnPrediction(0.2, "prior:bgnbd", "prior")] * 50
    assert all(p.source == "model" and p.model_version == "logreg@v1" for p in served[50:])
    assert arena.report()["serving"] == "model"
    fresh = ChurnArena(config=ArenaConfig(min_labels=50))
    assert fresh.predict(x) == ChurnPrediction(0.5, "prior:base_rate", "prior")


def test_predict_reuses_the_prediction_made_at_open() -> None:
    arena = arena_of(("a", "a"))
    feed(arena, 200, seed=5, noise={"a": 1.0})
    opened = arena.open({"a": 0.0}, 1)
    assert arena.predict({"a": 123.0}, pending=opened).risk == 0.5


def test_a_model_added_later_is_scored_from_its_first_prediction() -> None:
    arena = arena_of(("a", "a"))
    opened = arena.open({"a": 1.0, "b": 1.0}, 0)
    arena.models["b"] = FeatureModel("b", "b")
    arena.metrics["b"] = type(arena.metrics["a"])()
    arena.streaks["b"] = 0
    arena.learn(mature_on_purchase(opened, DAY_US))
    assert arena.metrics["a"].labels == 1 and arena.metrics["b"].labels == 0
    assert arena.models["b"].learned == 1


def test_report_has_everything_get_model_report_shows() -> None:
    arena = arena_of(("weak", "w"), ("good", "g"), evaluate_every=200, snapshot_every=500)
    feed(arena, 3000, seed=6, noise={"w": 3.0, "g": 0.3})
    report = json.loads(json.dumps(arena.report()))  # JSON-able
    assert report["champion"] == "good" and report["model_version"] == "good@v2"
    assert report["labels"] == 3000 and report["generation"] == 2
    assert report["champion_since_us"] == report["promotions"][0]["at_us"]
    for name, model in report["models"].items():
        assert model["matured_labels"] == 3000
        assert [h["labels"] for h in model["history"]] == [500, 1000, 1500, 2000, 2500, 3000]
        assert len(model["calibration"]) == 10
        assert set(model["metrics"]) >= {"auc", "recent_auc", "log_loss", "calibration_error"}
        assert 0.5 < model["metrics"]["auc"] < 1.0, name
    assert report["models"]["good"]["metrics"]["auc"] > report["models"]["weak"]["metrics"]["auc"]
    assert report["config"]["min_labels"] == 100


def test_the_arena_pickles_with_its_promotion_state() -> None:
    arena = arena_of(("weak", "w"), ("good", "g"), evaluate_every=200)
    feed(arena, 2000, seed=7, noise={"w": 3.0, "g": 0.3})
    copy = pickle.loads(pickle.dumps(arena))
    assert copy.report() == arena.report()
    rest = list(labeled_stream(1000, 8, {"w": 3.0, "g": 0.3}))
    for arena_ in (arena, copy):
        for i, x, y in rest:
            arena_.learn(LabeledExample(x, y, {"weak": 0.5, "good": 0.5}, i, i))
    assert copy.report() == arena.report()


def test_promotions_are_dated_by_the_newest_maturity_not_by_a_late_label() -> None:
    """A label can mature at an instant older than labels already learned (an event
    catches up a customer's earlier wake-ups): the promotion log never goes back."""
    arena = arena_of(("weak", "w"), ("good", "g"), evaluate_every=100, patience=2,
                     min_labels_to_promote=1000)
    rng = random.Random(12)
    newest = 0
    for i, x, y in labeled_stream(6000, 13, {"w": 3.0, "g": 0.3}):
        late = rng.random() < 0.3  # opened 60 days before the others of its turn
        opened = arena.open(x, opened_at_us=(i - (60 if late else 0)) * DAY_US)
        example = (mature_on_clock(opened, opened.opened_at_us + 91 * DAY_US) if y
                   else mature_on_purchase(opened, opened.opened_at_us + DAY_US))
        arena.learn(example)
        newest = max(newest, example.matured_at_us)
        if arena.promotions:
            break
    (promotion,) = arena.promotions
    assert example.matured_at_us < newest  # the triggering label was not the newest...
    assert promotion["at_us"] == newest == arena.champion_since_us  # ...nor its date


def test_an_arena_snapshotted_before_the_strata_resumes_with_empty_ones() -> None:
    arena = arena_of(("weak", "w"), ("good", "g"), evaluate_every=200)
    feed(arena, 500, seed=9, noise={"w": 3.0, "g": 0.3})
    state = dict(arena.__dict__)
    del state["strata"], state["clock_us"], state["pairs"]  # a snapshot from before them
    old = ChurnArena.__new__(ChurnArena)
    old.__setstate__(state)
    assert {k: m.labels for k, m in old.strata["good"].items()} == {"purchase": 0,
                                                                    "silence": 0}
    assert old.pairs == {}
    feed(old, 100, seed=10, noise={"w": 3.0, "g": 0.3})
    assert old.strata["good"]["purchase"].labels == 100 and old.metrics["good"].labels == 600
    assert old.pairs["good", "weak"]["purchase"].labels == 100


def test_config_and_champion_are_checked() -> None:
    with pytest.raises(ValueError, match="champion 'x'"):
        ChurnArena({"a": FeatureModel("a", "a")}, champion="x")
    with pytest.raises(ValueError, match="patience"):
        ArenaConfig(patience=0)


def test_a_new_lineup_keeps_what_stayed_adds_fresh_models_and_replaces_a_leaving_champion():
    arena = ChurnArena({"a": FeatureModel("a", "x1"), "b": FeatureModel("b", "x2")},
                       ArenaConfig(min_labels=100, prior_name="b"))
    feed(arena, 300, seed=1, noise={"x1": 0.5, "x2": 1.0})
    assert arena.champion == "a"
    opened = arena.open({"x1": 0.0, "x2": 0.0}, opened_at_us=1000 * DAY_US)
    kept = arena.models["b"]
    arena.use_lineup({"b": FeatureModel("b", "x2"), "c": FeatureModel("c", "x3")})
    assert list(arena.models) == ["b", "c"] and arena.models["b"] is kept  # b keeps learning
    assert arena.metrics["b"].labels == 300 and arena.metrics["c"].labels == 0
    assert arena.champion == "b" and arena.model_version == "b@v2"  # a left: the prior's model
    arena.learn(mature_on_purchase(opened, 1001 * DAY_US))  # opened before c joined:
    assert arena.metrics["c"].labels == 0 and arena.models["c"].learned == 1  # learnt, unscored
    assert arena.metrics["b"].labels == 301


def test_the_population_switches_to_the_configured_challengers_when_resumed():
    from models.churn import ChurnModelsError
    from models.population import Population

    population = Population(challengers="logreg,tree")
    assert list(population.arena.models) == ["logreg", "tree", "bgnbd", "paretonbd"]
    resumed = pickle.loads(pickle.dumps(population))
    version = resumed.version
    resumed.use_challengers("logreg")
    assert list(resumed.arena.models) == ["logreg", "bgnbd", "paretonbd"]
    assert resumed.version > version
    with pytest.raises(ChurnModelsError, match="unknown family 'forest'"):
        Population(challengers="forest")
