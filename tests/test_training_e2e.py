"""End to end on synthetic data: Cold & Warm Net learns something popularity cannot, reproducibly.

The synthetic generator builds taste from the profile and sequential locality from the history, so a
model that uses both must beat most-popular once users have some history (the warm-up group).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_fixtures import one_torch_thread

from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.experiments import ExperimentOutcome, run_experiments
from model.features import FeatureEncoder
from model.nn.cold_warm_net import stage_popularity_stages
from model.settings import ModelConfig, Settings, TrainConfig
from model.stage_popularity import stage_popularity_columns
from model.train import TrainingContext, fit_cold_warm_net, validation_score

pytestmark = pytest.mark.slow

MODEL = ModelConfig(embedding_dim=32, hidden_dim=64)
TRAIN = TrainConfig(epochs=3, pretrain_epochs=1, batch_size=256)


def context_for(n_users: int, n_items: int, seed: int, train: TrainConfig | None = None) -> TrainingContext:
    data = generate_synthetic(n_users=n_users, n_items=n_items, seed=seed)
    split = split_users(data)
    settings = Settings()
    encoder = FeatureEncoder.fit(data, split.train, settings.features)
    return TrainingContext.build(data, split, encoder, train)


@pytest.fixture(scope="module")
def outcome() -> ExperimentOutcome:
    context = context_for(800, 300, seed=0)
    settings = Settings(model=MODEL, train=TRAIN)
    with one_torch_thread():
        return run_experiments(context, settings, ["cold_warm_net", "most_popular"], progress=False)


def test_cold_warm_net_beats_most_popular_on_warm_up_users(outcome: ExperimentOutcome) -> None:
    cwn, popular = outcome.results["cold_warm_net"], outcome.results["most_popular"]
    assert cwn.points == popular.points  # the same test points
    assert cwn.points["warm_up"] >= 80
    cwn_recall = cwn.groups["warm_up"]["recall@50"]
    popular_recall = popular.groups["warm_up"]["recall@50"]
    # Warm-up R@50, Cold & Warm Net / most-popular, seen on data seeds 0-5 (train seed 0): 0.535/0.460,
    # 0.548/0.423, 0.552/0.447, 0.487/0.355, 0.485/0.433, 0.518/0.495; on data seed 0 with train
    # seeds 1-4 the net gives 0.518-0.545.
    assert cwn_recall > popular_recall + 0.02, (cwn_recall, popular_recall)
    assert cwn.groups["warm_up"]["ndcg@50"] > popular.groups["warm_up"]["ndcg@50"]


def test_training_records_and_early_stopping_bookkeeping(outcome: ExperimentOutcome) -> None:
    trained = outcome.trained["cold_warm_net"]
    epochs = trained.epochs
    main = [e for e in epochs if "validation" in e]
    phase = [e for e in epochs if "warm_phase_validation" in e]
    assert 1 <= len(main) <= TRAIN.epochs and 1 <= len(phase) <= TRAIN.warm_phase_epochs
    assert epochs == main + phase  # the warm phase comes after the main loop
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
    for record in epochs:
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert 0.0 <= record["distilled"] <= 1.0  # fraction of samples distilled (DKD on)
        assert 0.0 < record.get("validation", record.get("warm_phase_validation", 0.0)) <= 1.0
    assert main[-1]["loss"] < main[0]["loss"]
    assert not trained.net.training
    assert trained.bias_features is not None and 1 <= len(trained.bias_features.names) <= MODEL.bias_features


def fit_once(context: TrainingContext, seed: int):
    train = TRAIN.model_copy(update={"epochs": 1, "seed": seed})
    model = MODEL.model_copy(update={"n_user_groups": 8})
    with one_torch_thread():
        return fit_cold_warm_net(context, model, train, progress=False)


def test_training_is_reproducible() -> None:
    context = context_for(200, 150, seed=3)
    first, second = fit_once(context, seed=0), fit_once(context, seed=0)
    assert first.epochs[0]["validation"] == second.epochs[0]["validation"]
    assert first.epochs == second.epochs  # loss and distilled fraction too, exactly
    assert first.bias_features == second.bias_features
    for (name, a), (_, b) in zip(
        first.net.state_dict().items(), second.net.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    other = fit_once(context, seed=1)
    assert other.epochs[0]["loss"] != first.epochs[0]["loss"]


@pytest.mark.parametrize(
    "update",
    [
        {"expert_mixing": "embedding"},
        {"expert_mixing": "score"},
        {"expert_mixing": "score", "state_item_dims": 4},
        {"expert_mixing": "score", "stage_popularity": True},
    ],
    ids=["embedding", "score", "score+learnt-state-term", "score+stage-popularity"],
)
def test_the_warm_phase_trains_the_warm_side_and_leaves_the_cold_side_as_it_was(
    update: dict[str, object],
) -> None:
    """The cold side after main loop + warm phase equals the cold side after the main loop alone (same
    seed); the warm side moved; the phase's records carry their own validation figure."""
    # Each prefix towards its next action only, whatever the default: which parameters a phase moves
    # does not depend on the targets, and a target window's copies would double the samples.
    train = TRAIN.model_copy(update={"epochs": 1, "seed": 0, "warm_phase_epochs": 0, "target_window": 1})
    context = context_for(300, 150, seed=3, train=train)
    model = MODEL.model_copy(update={"n_user_groups": 8, **update})
    with one_torch_thread():
        main_only = fit_cold_warm_net(context, model, train, progress=False)
        phased = fit_cold_warm_net(
            context,
            model,
            train.model_copy(
                update={
                    "warm_phase_epochs": 2,
                    "patience": 5,
                    "warm_phase_validation_group": "warm_up",
                    "warm_phase_validation_metric": "recall@50",
                }
            ),
            progress=False,
        )
    assert len(phased.epochs) == 1 + 2
    assert "validation" in phased.epochs[0]
    assert all("warm_phase_validation" in e and "validation" not in e for e in phased.epochs[1:])
    assert [e["epoch"] for e in phased.epochs] == [1, 2, 3]
    before, after = main_only.net.state_dict(), phased.net.state_dict()
    cold = (
        "user_tower.profile.", "user_tower.cold.", "user_tower.state_items.",
        "item_scorer.tower.", "item_scorer.item_bias.", "item_scorer.state_items.",
    )  # fmt: skip
    warm = ("user_tower.warm.trunk.", "user_tower.pooling.", "user_tower.gate.")
    for name, value in after.items():
        if name.startswith(cold) or name == "log_scale":
            assert torch.equal(value, before[name]), name
    # The phase keeps the better of where it started and its best epoch, by its own figure.
    phase = train.model_copy(update={"validation_group": "warm_up", "validation_metric": "recall@50"})
    start = validation_score(main_only.net, context, phase)
    best = max(e["warm_phase_validation"] for e in phased.epochs[1:])
    assert validation_score(phased.net, context, phase) == pytest.approx(max(start, best), abs=1e-9)
    # After one main epoch the warm side is far from trained: here a phase epoch is better, and kept.
    assert best > start, (start, best)
    changed = [n for n, v in after.items() if not torch.equal(v, before[n])]
    moved = {n.split(".")[1] for n in changed if n.startswith(warm)}
    assert moved == {"warm", "pooling", "gate"}, moved
    if model.state_item_dims or model.stage_popularity:  # the term exists, frozen with the cold side
        assert any(n.startswith("item_scorer.state_items.") for n in after)
    if model.stage_popularity:  # counted from the training samples, not learnt
        stages = stage_popularity_stages(context.encoder, model)
        counted = stage_popularity_columns(context.samples, stages, phased.net.n_items)
        np.testing.assert_array_equal(after["item_scorer.state_items.table"].numpy(), counted.counted)
        np.testing.assert_array_equal(
            after["item_scorer.state_items.without_own"].numpy(), counted.without_own
        )
    if model.expert_mixing == "score":
        warm_tower = [n for n in after if n.startswith("item_scorer.warm_tower.")]
        assert any(not torch.equal(after[n], before[n]) for n in warm_tower)
