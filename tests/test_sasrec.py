"""The SASRec baseline: causal attention, what e_u depends on, cold users, TorchScript, registration,
and a short training run that must beat most-popular for users with history."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_fixtures import one_torch_thread

from model.baselines.popular import MostPopular
from model.baselines.sasrec import SASRec
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.evaluation.protocol import EvaluationResult, build_eval_points, evaluate
from model.experiments import ALL_MODELS, LEARNT_BASELINES
from model.features import FeatureEncoder
from model.nn.sequence import blocked_pairs, oldest_first
from model.ranker import ModelRanker
from model.settings import FeatureConfig, ModelConfig, TrainConfig
from model.train import TrainedModel, TrainingContext, fit_two_tower

MAX_HISTORY = 10
SMALL = ModelConfig(embedding_dim=8, hidden_dim=16)


@pytest.fixture(scope="module")
def encoder() -> FeatureEncoder:
    data = generate_synthetic(n_users=60, n_items=40, seed=7)
    return FeatureEncoder.fit(data, split_users(data).train, FeatureConfig(max_history=MAX_HISTORY))


@pytest.fixture(scope="module")
def net(encoder: FeatureEncoder) -> SASRec:
    torch.manual_seed(0)
    return SASRec(encoder, SMALL).eval()


def histories(*rows: list[int]) -> torch.Tensor:
    """Encoder-shaped histories: newest first, catalog position + 1, 0-padded to MAX_HISTORY."""
    out = torch.zeros(len(rows), MAX_HISTORY, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row)
    return out


def user_vectors(net: SASRec, history: torch.Tensor) -> torch.Tensor:
    batch = history.shape[0]
    profile = torch.zeros(batch, 4, dtype=torch.long)
    state = torch.zeros(batch, 3, dtype=torch.long)
    with torch.no_grad():
        return net.user_tower(profile, history, state)[0]


def all_positions(net: SASRec, history: torch.Tensor) -> torch.Tensor:
    """(B, L, d): every position's output, each block run over the whole sequence (no shortcut)."""
    tower = net.user_tower.encoder
    sequence = history.flip(1)
    valid = sequence > 0
    keep = valid.unsqueeze(-1).float()
    with torch.no_grad():
        inputs = net.user_tower.item_inputs(sequence)
        x = (inputs * tower.input_scale + tower.positions.weight.unsqueeze(0)) * keep
        for block in tower.blocks:
            x = block(x, blocked_pairs(valid), False) * keep
        return tower.final_norm(x)


# ----- attention mask and sequence layout ----------------------------------------------------------------


def test_blocked_pairs_hide_the_future_and_padding_but_never_the_query_itself() -> None:
    valid = torch.tensor([[False, True, True]])
    expected = torch.tensor([[[False, True, True], [True, False, True], [True, False, False]]])
    assert torch.equal(blocked_pairs(valid), expected)


def test_oldest_first_reverses_and_cuts_columns_that_are_padding_in_every_row() -> None:
    history = torch.tensor([[7, 5, 0, 0], [9, 0, 0, 0]])
    assert oldest_first(history).tolist() == [[5, 7], [0, 9]]
    assert oldest_first(torch.zeros(2, 4, dtype=torch.long)).tolist() == [[0], [0]]


def test_a_position_never_sees_later_items(net: SASRec) -> None:
    """Causality: changing the newest item leaves every earlier position's output as it was."""
    before = all_positions(net, histories([3, 8, 5, 1]))
    after = all_positions(net, histories([12, 8, 5, 1]))
    torch.testing.assert_close(before[:, :-1], after[:, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, -1], after[:, -1], atol=1e-4)


def test_the_last_block_computing_only_the_newest_query_changes_nothing(net: SASRec) -> None:
    history = histories([3, 8, 5, 1], [6], [2, 9, 4, 7, 11, 10, 13, 14, 15, 16])
    torch.testing.assert_close(user_vectors(net, history), all_positions(net, history)[:, -1])


# ----- what e_u depends on -------------------------------------------------------------------------------


def test_e_u_does_not_depend_on_padding_or_the_rest_of_the_batch(net: SASRec) -> None:
    short = histories([3, 8, 5])
    alone = user_vectors(net, short)
    narrow = user_vectors(net, short[:, :3])  # no padding column at all
    batched = user_vectors(net, histories([3, 8, 5], [2, 9, 4, 7, 11, 10, 13, 14, 15, 16], []))
    torch.testing.assert_close(alone, narrow)
    torch.testing.assert_close(alone[0], batched[0])


def test_older_items_their_order_and_the_newest_item_all_change_e_u(net: SASRec) -> None:
    base = user_vectors(net, histories([3, 8, 5, 1]))
    older_changed = user_vectors(net, histories([3, 8, 5, 12]))
    older_permuted = user_vectors(net, histories([3, 5, 1, 8]))  # same items, same newest
    newest_changed = user_vectors(net, histories([12, 8, 5, 1]))
    for other in (older_changed, older_permuted, newest_changed):
        assert not torch.allclose(base, other, atol=1e-4)


def test_empty_history_gets_the_learned_empty_sequence_vector(net: SASRec) -> None:
    empty = net.user_tower.empty_sequence.detach()
    mixed = user_vectors(net, histories([], [3, 8], []))
    only_cold = user_vectors(net, histories([], []))
    for row in (mixed[0], mixed[2], only_cold[0], only_cold[1]):
        assert torch.equal(row, empty)
    assert not torch.allclose(mixed[1], empty)


def test_no_user_bias_and_an_all_warm_gate(net: SASRec) -> None:
    history = histories([3, 8], [])
    _, b_u, gate = net.user_tower(torch.zeros(2, 4, dtype=torch.long), history, torch.zeros(2, 3).long())
    assert torch.equal(b_u, torch.zeros(2))
    assert torch.equal(gate, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


# ----- shape of the net: shared items, TorchScript, registration, checkpoints ------------------------------


def test_history_items_use_the_output_item_vectors(net: SASRec) -> None:
    assert net.user_tower.item_inputs.tower.weight is net.item_scorer.vectors.weight
    assert net.scale.item() == pytest.approx(1.0)  # dot product, no learnt scale


def test_scripted_user_tower_gives_the_eager_outputs(net: SASRec) -> None:
    scripted = torch.jit.script(net.user_tower)
    for history in (histories([3, 8, 5, 1], [], [2, 9, 4, 7, 11, 10, 13, 14, 15, 16]), histories([], [])):
        batch = history.shape[0]
        inputs = (torch.zeros(batch, 4, dtype=torch.long), history, torch.zeros(batch, 3, dtype=torch.long))
        with torch.no_grad():
            for eager, script in zip(net.user_tower(*inputs), scripted(*inputs), strict=True):
                torch.testing.assert_close(script, eager, rtol=0, atol=1e-6)


def test_heads_must_divide_the_embedding_dimension(encoder: FeatureEncoder) -> None:
    with pytest.raises(ValueError, match="divisible"):
        SASRec(encoder, SMALL.model_copy(update={"sasrec_heads": 3}))


def test_registered_as_a_learnt_baseline_trained_with_the_sampled_softmax() -> None:
    assert LEARNT_BASELINES["sasrec"] == (SASRec, "sampled_softmax")
    assert "sasrec" in ALL_MODELS


def test_checkpoint_round_trip_keeps_the_scores(net: SASRec, encoder: FeatureEncoder, tmp_path: Path) -> None:
    trained = TrainedModel("sasrec", net, encoder, SMALL, TrainConfig(), None)
    loaded = load_checkpoint(save_checkpoint(trained, tmp_path / "sasrec.pt"))
    loaded_net = loaded.net
    assert isinstance(loaded_net, SASRec)
    assert loaded_net.user_tower.item_inputs.tower.weight is loaded_net.item_scorer.vectors.weight
    history = histories([3, 8, 5, 1], [])
    inputs = (torch.zeros(2, 4, dtype=torch.long), history, torch.zeros(2, 3, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(loaded_net.score_all(*inputs), net.score_all(*inputs))


# ----- a short training run ------------------------------------------------------------------------------

# Users with history: the protocol's h >= 10 points.
WARM_HISTORY_LENGTHS = (10, 20, 30, 50)


@pytest.mark.slow
def test_short_training_beats_most_popular_for_users_with_history() -> None:
    # 400 users and 150 items, not fewer: with 80 items Recall@50 saturates (most-popular reaches
    # 0.93) and 200 users give ~25 warm points per split, where SASRec and most-popular are a coin
    # flip apart. max_history 20 keeps the run at a few seconds.
    data = generate_synthetic(n_users=400, n_items=150, seed=0)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=20))
    model_config = ModelConfig(embedding_dim=32, hidden_dim=64)
    train_config = TrainConfig(loss="sampled_softmax", epochs=2, batch_size=128, seed=0)
    catalog = data.catalog_item_ids()
    with one_torch_thread():
        context = TrainingContext.build(data, split, encoder, train_config)
        torch.manual_seed(train_config.seed)
        trained = fit_two_tower(
            context, SASRec(encoder, model_config), model_config, train_config, "sasrec", progress=False
        )
    popular = MostPopular.fit(data, split.train, catalog)
    sasrec = ModelRanker("sasrec", trained.net, encoder, data.users, catalog)
    for users in (split.validation, split.test):
        points = build_eval_points(data, users, WARM_HISTORY_LENGTHS)
        assert len(points) >= 50
        ours: EvaluationResult = evaluate(sasrec, points, catalog, progress=False)
        theirs = evaluate(popular, points, catalog, progress=False)
        recall, baseline = ours.groups["all"]["recall@50"], theirs.groups["all"]["recall@50"]
        # Recall@50 validation / test, SASRec against most-popular 0.677 / 0.724: 0.762 / 0.802 with
        # train seed 0, 0.744-0.765 / 0.783-0.790 with train seeds 1-4 (data seed 0); data seeds 1-3
        # (train seed 0) beat it by 0.028-0.131.
        assert recall > baseline + 0.03, (recall, baseline)
        assert ours.groups["all"]["ndcg@50"] > theirs.groups["all"]["ndcg@50"]
