"""Several training seeds: the mean and spread of a model's figures, and which models run how often."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from model import experiments
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.evaluation.protocol import EvalPoint, EvaluationResult, catalog_indices, summarise
from model.evaluation.run_store import RunStore
from model.evaluation.seeds import mean_over_seeds, spread_over_seeds
from model.experiments import LEARNT_BASELINES, RunReuse, run_experiments
from model.features import FeatureEncoder
from model.settings import ModelConfig, Settings, TrainConfig
from model.train import TrainingContext

# Two users, three points each: h = 0 and 1 (cold_start), h = 10 (warm_up).
H = np.array([0, 1, 10, 0, 1, 10])
USERS = np.array([1, 1, 1, 2, 2, 2])


def run(name: str, recall: list[float]) -> EvaluationResult:
    return summarise(name, {"recall@50": np.array(recall)}, H, USERS)


def test_mean_and_std_over_seeds_by_hand() -> None:
    seed_a = run("m", [0.2, 0.4, 0.6, 0.0, 0.2, 0.8])  # cold_start 0.2, warm_up 0.7, all 0.3667
    seed_b = run("m", [0.4, 0.6, 0.2, 0.2, 0.4, 0.4])  # cold_start 0.4, warm_up 0.3, all 0.3667
    mean = mean_over_seeds([seed_a, seed_b])
    assert mean.groups["cold_start"]["recall@50"] == pytest.approx(0.3)
    assert mean.groups["warm_up"]["recall@50"] == pytest.approx(0.5)
    assert mean.curve[10]["recall@50"] == pytest.approx(0.5)
    np.testing.assert_allclose(mean.per_point["recall@50"], [0.3, 0.5, 0.4, 0.1, 0.3, 0.6])
    assert mean.points == seed_a.points and np.array_equal(mean.point_user, USERS)
    spread = spread_over_seeds([seed_a, seed_b])
    assert spread.runs == 2
    # Sample std of two values a, b: |a - b| / sqrt(2).
    assert spread.groups["cold_start"]["recall@50"] == pytest.approx(0.2 / np.sqrt(2))
    assert spread.groups["warm_up"]["recall@50"] == pytest.approx(0.4 / np.sqrt(2))
    assert spread.groups["all"]["recall@50"] == pytest.approx(0.0, abs=1e-12)
    assert spread.curve[0]["recall@50"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert spread.to_dict()["curve"]["10"]["recall@50"] == pytest.approx(0.4 / np.sqrt(2))


def test_three_seeds_std_is_the_sample_std() -> None:
    runs = [run("m", [v] * 6) for v in (0.1, 0.2, 0.6)]
    assert spread_over_seeds(runs).groups["all"]["recall@50"] == pytest.approx(
        np.std([0.1, 0.2, 0.6], ddof=1)
    )
    assert mean_over_seeds(runs).groups["all"]["recall@50"] == pytest.approx(0.3)


def test_a_single_run_is_its_own_mean_with_no_spread() -> None:
    only = run("m", [0.2, 0.4, 0.6, 0.0, 0.2, 0.8])
    assert mean_over_seeds([only]) is only
    spread = spread_over_seeds([only])
    assert spread.runs == 1 and spread.groups["cold_start"]["recall@50"] == 0.0


def test_seeds_evaluated_on_other_points_are_refused() -> None:
    other = summarise("m", {"recall@50": np.zeros(6)}, H, USERS[::-1].copy())
    with pytest.raises(ValueError, match="different points"):
        mean_over_seeds([run("m", [0.0] * 6), other])


# ----- run_experiments: which model is trained with which seed -----------------------------------------


class FakeRanker:
    """Random scores that depend on the model and its seed; "fake_learnt" ranks the targets first."""

    def __init__(self, name: str, net: Any, encoder: Any, users: Any, catalog: np.ndarray) -> None:
        self.name, self.seed, self.catalog = name, net.seed, catalog

    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, len(self.name)])
        scores = rng.random((len(points), len(self.catalog))).astype(np.float32)
        if self.name == "fake_learnt":
            for row, point in enumerate(points):
                scores[row, catalog_indices(self.catalog, point.target_item_ids)] = 2.0
        return scores


def fake_model(name: str, seed: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, net=SimpleNamespace(seed=seed), epochs=[{}], seconds=0.0)


def test_run_experiments_trains_every_learnt_model_once_per_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    data = generate_synthetic(n_users=200)
    split = split_users(data)
    settings = Settings(train=TrainConfig(seed=5))
    context = TrainingContext.build(data, split, FeatureEncoder.fit(data, split.train, settings.features))
    trainings: list[tuple[str, int, bool]] = []
    group_seeds: list[int] = []

    def train_variant(
        name: str,
        context: TrainingContext,
        model_config: ModelConfig,
        train_config: TrainConfig,
        groups: torch.Tensor | None,
        progress: bool,
    ) -> SimpleNamespace:
        trainings.append((name, train_config.seed, groups is not None))
        return fake_model(name, train_config.seed)

    def fit_user_groups(
        context: TrainingContext, model_config: ModelConfig, train_config: TrainConfig, progress: bool
    ) -> torch.Tensor:
        group_seeds.append(train_config.seed)
        return torch.zeros(1)

    # A learnt baseline registered after import, as another engineer's would be.
    monkeypatch.setitem(LEARNT_BASELINES, "fake_learnt", (None, "bce"))
    monkeypatch.setattr(experiments, "ALL_MODELS", (*experiments.ALL_MODELS, "fake_learnt"))
    monkeypatch.setattr(experiments, "train_variant", train_variant)
    monkeypatch.setattr(experiments, "fit_user_groups", fit_user_groups)
    monkeypatch.setattr(experiments, "ModelRanker", FakeRanker)
    checkpoint = fake_model("cold_warm_net", 99)
    models = ["cold_warm_net", "no_group_attention", "dssm", "fake_learnt", "most_popular"]
    outcome = run_experiments(
        context, settings, models, progress=False, trained={"cold_warm_net": checkpoint}, seeds=3
    )

    assert outcome.seeds == [5, 6, 7]
    # The checkpoint is cold_warm_net's first seed; the user groups are pre-trained once per seed that
    # trains a model using them, and shared.
    assert sorted(trainings) == sorted(
        [("cold_warm_net", 6, True), ("cold_warm_net", 7, True)]
        + [("no_group_attention", s, False) for s in (5, 6, 7)]
        + [(name, s, False) for name in ("dssm", "fake_learnt") for s in (5, 6, 7)]
    )
    assert group_seeds == [6, 7]
    assert outcome.trained["cold_warm_net"] is checkpoint
    assert {n: len(r) for n, r in outcome.seed_results.items()} == {
        "cold_warm_net": 3,
        "no_group_attention": 3,
        "dssm": 3,
        "fake_learnt": 3,
        "most_popular": 1,  # deterministic: once
    }
    assert outcome.spread["most_popular"].runs == 1 and outcome.spread["dssm"].runs == 3
    seed_means = [r.groups["all"]["recall@50"] for r in outcome.seed_results["dssm"]]
    assert outcome.results["dssm"].groups["all"]["recall@50"] == pytest.approx(np.mean(seed_means))
    assert outcome.spread["dssm"].groups["all"]["recall@50"] == pytest.approx(np.std(seed_means, ddof=1))
    assert outcome.spread["dssm"].groups["all"]["recall@50"] > 0
    # The registered learnt baseline counts as a baseline, and beats the others everywhere.
    assert outcome.significance is not None
    assert {c["recall@50"].baseline for c in outcome.significance.comparisons.values()} == {"fake_learnt"}
    assert outcome.details["seeds"] == [5, 6, 7]
    assert [r["seed"] for r in outcome.details["seed_training"]["dssm"]] == [5, 6, 7]


# ----- stored runs standing in for training ------------------------------------------------------------


def test_stored_runs_stand_in_only_for_the_models_asked_and_only_under_the_same_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    data = generate_synthetic(n_users=200)
    split = split_users(data)
    settings = Settings(train=TrainConfig(seed=3))
    context = TrainingContext.build(data, split, FeatureEncoder.fit(data, split.train, settings.features))
    trainings: list[tuple[str, int]] = []

    def train_variant(name, context, model_config, train_config, groups, progress) -> SimpleNamespace:
        trainings.append((name, train_config.seed))
        return fake_model(name, train_config.seed)

    monkeypatch.setattr(experiments, "train_variant", train_variant)
    monkeypatch.setattr(experiments, "fit_user_groups", lambda *args: torch.zeros(1))
    monkeypatch.setattr(experiments, "ModelRanker", FakeRanker)
    store = RunStore(tmp_path / "runs")
    models = ["dssm", "youtube_dnn"]
    first = run_experiments(context, settings, models, progress=False, seeds=2, reuse=RunReuse(store))
    assert sorted(trainings) == [("dssm", 3), ("dssm", 4), ("youtube_dnn", 3), ("youtube_dnn", 4)]
    assert "reused_runs" not in first.details

    trainings.clear()
    again = run_experiments(
        context, settings, models, progress=False, seeds=2, reuse=RunReuse(store, frozenset({"dssm"}))
    )
    assert sorted(trainings) == [("youtube_dnn", 3), ("youtube_dnn", 4)]  # dssm's stored runs stood in
    np.testing.assert_array_equal(
        again.results["dssm"].per_point["recall@50"], first.results["dssm"].per_point["recall@50"]
    )
    assert again.results["dssm"].groups == first.results["dssm"].groups
    assert [r["seed"] for r in again.details["reused_runs"]["dssm"]] == [3, 4]
    assert again.details["reused_runs"]["dssm"][0]["commit"]

    trainings.clear()
    other = settings.model_copy(update={"train": settings.train.model_copy(update={"learning_rate": 0.01})})
    run_experiments(
        context, other, ["dssm"], progress=False, seeds=1, reuse=RunReuse(store, frozenset({"dssm"}))
    )
    assert trainings == [("dssm", 3)]  # other settings: nothing stored under them, so it trains

    trainings.clear()
    own_switch = settings.model_copy(
        update={"model": settings.model.model_copy(update={"warm_pooling": "attention"})}
    )
    own_phase = settings.model_copy(
        update={"train": settings.train.model_copy(update={"warm_phase_epochs": 3})}
    )
    wider = settings.model_copy(update={"model": settings.model.model_copy(update={"embedding_dim": 32})})
    for changed in (own_switch, own_phase, wider):
        run_experiments(
            context, changed, ["dssm"], progress=False, seeds=1, reuse=RunReuse(store, frozenset({"dssm"}))
        )
    # A switch of Cold & Warm Net's own (model or training) leaves the baseline's run valid; the
    # baseline's own shape does not.
    assert trainings == [("dssm", 3)]

    # One process per seed: --only-seeds trains one of the seeds; a later run takes it from the store.
    split_store = RunReuse(RunStore(tmp_path / "split"), frozenset({"dssm"}))
    trainings.clear()
    alone = run_experiments(
        context, settings, ["dssm"], progress=False, seeds=2, reuse=split_store, only_seeds=[4]
    )
    assert trainings == [("dssm", 4)] and alone.seeds == [4]
    trainings.clear()
    joined = run_experiments(context, settings, ["dssm"], progress=False, seeds=2, reuse=split_store)
    assert trainings == [("dssm", 3)]
    assert [r["seed"] for r in joined.details["reused_runs"]["dssm"]] == [4]
    with pytest.raises(ValueError, match="none of the seeds"):
        run_experiments(context, settings, ["dssm"], progress=False, seeds=2, only_seeds=[9])

    # Stored runs only: the stored seed counts, the missing one is left out, nothing is trained.
    trainings.clear()
    only_stored = RunReuse(RunStore(tmp_path / "partial"), frozenset({"dssm"}))
    run_experiments(context, settings, ["dssm"], progress=False, seeds=2, reuse=only_stored, only_seeds=[3])
    trainings.clear()
    partial = run_experiments(
        context,
        settings,
        ["dssm"],
        progress=False,
        seeds=2,
        reuse=RunReuse(only_stored.store, frozenset({"dssm"}), stored_only=True),
    )
    assert trainings == [] and len(partial.seed_results["dssm"]) == 1
    assert partial.spread["dssm"].runs == 1

    # A context whose samples were drawn otherwise (another seed) holds other runs: nothing reused.
    other_samples = TrainingContext.build(
        data, split, FeatureEncoder.fit(data, split.train, settings.features), TrainConfig(seed=9)
    )
    trainings.clear()
    run_experiments(
        other_samples, settings, ["dssm"], progress=False, seeds=1, reuse=RunReuse(store, frozenset({"dssm"}))
    )
    assert trainings == [("dssm", 3)]
