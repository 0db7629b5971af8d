"""The parts of Cold & Warm Net, each against a hand computation: gate, group attention, distillation,
losses and candidates, mutual-information selection, and the score of the whole net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.distillation import distillation_loss, distillation_mask
from model.features import COUNT_COLUMN, FeatureEncoder
from model.losses import bce_candidates, per_sample_loss, softmax_candidates
from model.mutual_info import select_bias_features, select_by_mutual_information
from model.nn.cold_warm_net import (
    USER_BIAS_CANDIDATES,
    ColdWarmNet,
    item_bias_candidate_names,
)
from model.nn.gate import StateGate
from model.nn.group_attention import GroupAttention
from model.samples import (
    TrainingSamples,
    UserSequences,
    build_training_samples,
    history_lengths,
    length_balance_weights,
)
from model.settings import FeatureConfig, ModelConfig, TrainConfig
from model.train import item_log_frequencies, training_step, user_bias_candidates

# The experts read the profile alone, as the paper has them: the tests of the state in the experts
# switch it on themselves.
SMALL = ModelConfig(
    embedding_dim=8, hidden_dim=16, feature_dim=4, n_user_groups=5, bias_features=6, expert_state_input=False
)


@pytest.fixture(scope="module")
def world() -> tuple[FeatureEncoder, TrainingSamples]:
    data = generate_synthetic(n_users=150, n_items=60, seed=5)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=10))
    sequences = UserSequences.from_interactions(data.interactions, split.train)
    # Each prefix towards its next action only: the target window has its own tests.
    next_action = TrainConfig(session_start_share=0.0, target_window=1)
    return encoder, build_training_samples(data.users, sequences, encoder, next_action)


# ----- gate ------------------------------------------------------------------------------------------


def random_state(n: int, cardinalities: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for c in cardinalities], dim=1)


def test_gate_weights_are_a_distribution_per_row() -> None:
    torch.manual_seed(0)
    cards = (14, 12, 12)
    gate = StateGate(cards, feature_dim=4, hidden_dim=16, use_cold=True, use_warm=True)
    with torch.no_grad():
        for p in gate.parameters():
            p.mul_(5.0)  # sharpen, so the weights are far from (0.5, 0.5)
        weights = gate(random_state(200, cards))
    assert weights.shape == (200, 2)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(200))
    assert float(weights[:, 0].max() - weights[:, 0].min()) > 0.1  # depends on the state


@pytest.mark.parametrize(
    ("use_cold", "use_warm", "expected"), [(True, False, [1.0, 0.0]), (False, True, [0.0, 1.0])]
)
def test_gate_is_fixed_one_hot_with_one_expert_off(
    use_cold: bool, use_warm: bool, expected: list[float]
) -> None:
    cards = (14, 12, 12)
    gate = StateGate(cards, feature_dim=4, hidden_dim=16, use_cold=use_cold, use_warm=use_warm)
    weights = gate(random_state(50, cards))
    torch.testing.assert_close(weights, torch.tensor([expected] * 50))


@pytest.mark.parametrize(("switch", "expert"), [("use_warm_expert", "cold"), ("use_cold_expert", "warm")])
def test_user_tower_with_one_expert_off_is_that_expert(world, switch: str, expert: str) -> None:
    encoder, samples = world
    torch.manual_seed(0)
    net = ColdWarmNet(encoder, SMALL.model_copy(update={switch: False})).eval()
    profile, history, state, _ = samples.batch(torch.arange(64))
    with torch.no_grad():
        e_u, _, gate, e_cold, e_warm = net.user_tower.experts(profile, history, state)
    only = e_cold if expert == "cold" else e_warm
    torch.testing.assert_close(e_u, only)
    assert torch.all(gate[:, 0 if expert == "cold" else 1] == 1.0)


# ----- group attention -------------------------------------------------------------------------------


def test_group_attention_is_a_convex_combination_of_the_groups() -> None:
    torch.manual_seed(1)
    m, d = 6, 8
    groups = torch.randn(m, d) * 3
    attention = GroupAttention(m, d)
    attention.set_groups(groups)
    query = torch.randn(10, d) * 3
    out = attention(query)
    weights = torch.softmax(query @ groups.t() / math.sqrt(d), dim=1)
    torch.testing.assert_close(out, weights @ groups)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(10))
    # Inside the groups' bounding box, coordinate by coordinate (a necessary condition of convexity).
    assert (out <= groups.max(dim=0).values + 1e-5).all() and (out >= groups.min(dim=0).values - 1e-5).all()
    # Recovering the weights from the output: least squares on [groups^T; 1] gives back the softmax.
    system = torch.cat([groups.t(), torch.ones(1, m)], dim=0).double()
    target = torch.cat([out.t(), torch.ones(1, 10)], dim=0).double()
    recovered = torch.linalg.lstsq(system, target).solution.t()
    torch.testing.assert_close(recovered.float(), weights, atol=1e-4, rtol=1e-4)


def test_group_attention_with_one_group_returns_that_group() -> None:
    group = torch.tensor([[0.5, -2.0, 3.0, 1.0]])
    attention = GroupAttention(1, 4)
    attention.set_groups(group)
    out = attention(torch.randn(7, 4) * 10)
    torch.testing.assert_close(out, group.expand(7, -1))


def test_group_embeddings_are_a_fixed_buffer_not_a_parameter() -> None:
    attention = GroupAttention(3, 4)
    assert "group_embeddings" in dict(attention.named_buffers())
    assert not list(attention.parameters())


# ----- distillation ----------------------------------------------------------------------------------


def test_distillation_mask_is_on_exactly_where_cold_loss_exceeds_warm_loss() -> None:
    cold = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.0, 7.0])
    warm = torch.tensor([0.5, 2.0, 4.0, 0.1, 0.0, 6.9])
    assert distillation_mask(cold, warm).tolist() == [True, False, False, True, False, True]


def test_distillation_mask_keeps_to_its_scope() -> None:
    cold, warm = torch.tensor([2.0, 1.0, 3.0, 5.0]), torch.tensor([1.0, 2.0, 1.0, 1.0])
    scope = torch.tensor([True, True, False, True])
    assert distillation_mask(cold, warm, scope).tolist() == [True, False, False, True]
    logits = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    # Only samples 0 and 3 count: gap 1 each, over a batch of 4.
    loss = distillation_loss(logits, torch.zeros(4, 1), cold, warm, scope)
    assert float(loss) == pytest.approx(0.5)


def test_distillation_loss_is_zero_with_an_empty_mask() -> None:
    cold_logits = torch.randn(4, 5, requires_grad=True)
    warm_logits = torch.randn(4, 5)
    loss = distillation_loss(
        cold_logits, warm_logits, torch.tensor([1.0, 2.0, 0.0, 3.0]), torch.tensor([1.0, 2.5, 0.0, 3.0])
    )
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.all(cold_logits.grad == 0)


def test_distillation_loss_hand_computed_and_warm_side_detached() -> None:
    cold_logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 2.0]], requires_grad=True)
    warm_logits = torch.tensor([[0.0, 0.0, 1.0], [5.0, 5.0, 5.0], [1.0, 1.0, 1.0]], requires_grad=True)
    cold_loss = torch.tensor([0.9, 0.1, 0.7])
    warm_loss = torch.tensor([0.2, 0.5, 0.7])  # rows 0 on, 1 off (cold better), 2 off (a tie)
    loss = distillation_loss(cold_logits, warm_logits, cold_loss, warm_loss)
    # Row 0: gaps (1, 2, -1) → mean square 2; divided by the batch size 3, not the masked count.
    assert float(loss.detach()) == pytest.approx(2.0 / 3.0)
    loss.backward()
    assert warm_logits.grad is None or torch.all(warm_logits.grad == 0)
    # d/dc of (1/3) * mean_j (c_j - w_j)^2 on row 0 = 2 (c - w) / (3 * 3); other rows zero.
    expected = torch.zeros(3, 3)
    expected[0] = 2.0 * torch.tensor([1.0, 2.0, -1.0]) / 9.0
    torch.testing.assert_close(cold_logits.grad, expected)


def test_distillation_mask_ignores_gradients_of_the_losses() -> None:
    cold_logits = torch.randn(3, 2, requires_grad=True)
    cold_loss = torch.tensor([2.0, 0.0, 1.0], requires_grad=True)
    warm_loss = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    distillation_loss(cold_logits, torch.zeros(3, 2), cold_loss, warm_loss).backward()
    assert cold_loss.grad is None and warm_loss.grad is None


# ----- per-sample losses and candidates -------------------------------------------------------------


def test_bce_per_sample_loss_equals_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.2, -2.0]])
    candidates = bce_candidates(torch.tensor([0, 1]), 2, 10, torch.Generator().manual_seed(0))
    got = per_sample_loss(logits, candidates)

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    # Column 0 positive: -log sigmoid(x) = softplus(-x); negatives: -log(1 - sigmoid(x)) = softplus(x).
    expected = [
        (softplus(-2.0) + softplus(-1.0) + softplus(0.5)) / 3,
        (softplus(0.3) + softplus(1.2) + softplus(-2.0)) / 3,
    ]
    torch.testing.assert_close(got, torch.tensor(expected))


def test_bce_candidates_put_the_target_first() -> None:
    targets = torch.tensor([4, 9, 0])
    candidates = bce_candidates(targets, 5, 10, torch.Generator().manual_seed(3))
    assert candidates.positions.shape == (3, 6)
    torch.testing.assert_close(candidates.positions[:, 0], targets)
    assert int(candidates.positions.min()) >= 0 and int(candidates.positions.max()) < 10
    assert candidates.log_q is None


def test_softmax_candidates_mask_accidental_hits() -> None:
    n_items = 20
    targets = torch.tensor([3, 5, 3, 7])  # target 3 twice in the batch
    item_log_q = torch.log(torch.full((n_items,), 1.0 / n_items))
    generator = torch.Generator().manual_seed(0)
    candidates = softmax_candidates(targets, 6, n_items, item_log_q, generator)
    shared = candidates.positions[4:]
    assert candidates.positions[:4].tolist() == targets.tolist()
    hits = candidates.accidental_hits
    assert hits.shape == (4, 10)
    for row in range(4):
        for col in range(10):
            expected = col != row and int(candidates.positions[col]) == int(targets[row])
            assert bool(hits[row, col]) == expected, (row, col)
    assert hits[0, 2] and hits[2, 0] and not hits[0, 0] and not hits[2, 2]
    assert candidates.positive_column.tolist() == [0, 1, 2, 3]
    # log Q: in-batch items log(B * q(item)); shared uniform draws log(n_shared / n_items).
    torch.testing.assert_close(candidates.log_q[:4], torch.full((4,), math.log(4 / n_items)))
    torch.testing.assert_close(candidates.log_q[4:], torch.full((6,), math.log(6 / n_items)))
    assert len(shared) == 6

    # The loss treats a duplicate target as neither positive nor negative: with a huge logit on the
    # duplicate column, the loss is unchanged; a huge logit on a genuine negative raises it.
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    base = per_sample_loss(logits, candidates)
    bumped = logits.clone()
    bumped[0, 2] = 50.0
    torch.testing.assert_close(per_sample_loss(bumped, candidates), base)
    negative_col = next(c for c in range(1, 10) if not hits[0, c] and int(candidates.positions[c]) != 3)
    bumped = logits.clone()
    bumped[0, negative_col] = 50.0
    assert float(per_sample_loss(bumped, candidates)[0]) > float(base[0]) + 10


def test_softmax_per_sample_loss_equals_hand_computation() -> None:
    n_items = 8
    item_log_q = torch.log(torch.tensor([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]))
    targets = torch.tensor([0, 2, 0])
    candidates = softmax_candidates(targets, 2, n_items, item_log_q, torch.Generator().manual_seed(1))
    logits = torch.tensor([[1.0, 0.5, -0.5, 0.2, 0.1], [0.0, 2.0, 1.0, -1.0, 0.3], [0.4, 0.4, 0.9, 0.0, 0.0]])
    got = per_sample_loss(logits, candidates)
    positions = candidates.positions.tolist()
    log_q = candidates.log_q.tolist()
    expected = []
    for row in range(3):
        kept = [
            logits[row, c].item() - log_q[c]
            for c in range(len(positions))
            if c == row or positions[c] != int(targets[row])
        ]
        positive = logits[row, row].item() - log_q[row]
        expected.append(-positive + math.log(sum(math.exp(v) for v in kept)))
    torch.testing.assert_close(got, torch.tensor(expected))


# ----- mutual information -----------------------------------------------------------------------------


def test_mutual_information_finds_a_planted_feature() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    noise = rng.integers(0, 6, size=(n, 5))
    planted = rng.integers(0, 4, size=n)
    labels = ((planted >= 2) ^ (rng.random(n) < 0.1)).astype(np.int64)  # 90% determined by the feature
    features = np.column_stack([noise[:, :3], planted, noise[:, 3:]])
    names = ["n0", "n1", "n2", "planted", "n3", "n4"]
    chosen, scores = select_by_mutual_information(features, labels, names, beta=1)
    assert chosen == [3]
    assert set(scores) == set(names)
    assert scores["planted"] > 10 * max(scores[n] for n in names if n != "planted")
    chosen3, _ = select_by_mutual_information(features, labels, names, beta=3)
    assert 3 in chosen3 and len(chosen3) == 3 and chosen3 == sorted(chosen3)


def test_select_bias_features_on_synthetic_samples(world) -> None:
    encoder, samples = world
    probe = ColdWarmNet(encoder, SMALL)
    user_names = list(USER_BIAS_CANDIDATES)
    item_names = item_bias_candidate_names(encoder)
    candidates = probe.item_scorer.bias_candidates
    assert candidates.shape[1] == len(item_names)
    for beta in (1, 4, 10):
        selection = select_bias_features(samples, candidates, user_names, item_names, beta, seed=0)
        assert len(selection.user_columns) + len(selection.item_columns) == min(
            beta, len(user_names) + len(item_names)
        )
        assert all(0 <= c < len(user_names) for c in selection.user_columns)
        assert all(0 <= c < len(item_names) for c in selection.item_columns)
        assert selection.names == [user_names[c] for c in selection.user_columns] + [
            item_names[c] for c in selection.item_columns
        ]
        assert set(selection.scores) == set(user_names) | set(item_names)
        # The chosen ones are the highest-scoring.
        chosen = set(selection.names)
        lowest_chosen = min(selection.scores[n] for n in chosen)
        assert all(selection.scores[n] <= lowest_chosen for n in selection.scores if n not in chosen)
    # Activity is what separates positives from uniformly drawn users: the count must be informative.
    ten = select_bias_features(samples, candidates, user_names, item_names, 10, seed=0)
    assert "interaction_count" in ten.names


def test_select_bias_features_without_user_names_picks_item_columns_only(world) -> None:
    encoder, samples = world
    candidates = ColdWarmNet(encoder, SMALL).item_scorer.bias_candidates
    item_names = item_bias_candidate_names(encoder)
    selection = select_bias_features(samples, candidates, [], item_names, 4, seed=0)
    assert selection.user_columns == []
    assert len(selection.item_columns) == 4
    assert selection.names == [item_names[c] for c in selection.item_columns]
    assert set(selection.scores) == set(item_names)
    # The item side ranks the same as when chosen alongside the user side.
    both = select_bias_features(samples, candidates, list(USER_BIAS_CANDIDATES), item_names, 40, seed=0)
    ranked = sorted(item_names, key=lambda n: -both.scores[n])
    assert set(selection.names) == set(ranked[:4])


def test_user_bias_candidates_only_under_bce() -> None:
    assert user_bias_candidates(TrainConfig(loss="bce")) == list(USER_BIAS_CANDIDATES)
    assert user_bias_candidates(TrainConfig(loss="sampled_softmax")) == []


def test_a_per_user_constant_gets_no_gradient_under_softmax_but_does_under_bce() -> None:
    """Why the user bias is BCE-only: a softmax over one user's candidates is invariant to b_u."""
    torch.manual_seed(0)
    n_items, batch = 30, 6
    targets = torch.tensor([1, 4, 4, 9, 0, 17])  # a duplicate target: masked columns too
    item_log_q = torch.log(torch.full((n_items,), 1.0 / n_items))
    softmax = softmax_candidates(targets, 8, n_items, item_log_q, torch.Generator().manual_seed(0))
    b_u = torch.randn(batch, requires_grad=True)
    logits = torch.randn(batch, batch + 8) + b_u.unsqueeze(1)
    per_sample_loss(logits, softmax).sum().backward()
    assert float(b_u.grad.abs().max()) < 1e-6
    b_u = torch.randn(batch, requires_grad=True)
    bce = bce_candidates(targets, 4, n_items, torch.Generator().manual_seed(0))
    per_sample_loss(torch.randn(batch, 5) + b_u.unsqueeze(1), bce).sum().backward()
    assert float(b_u.grad.abs().min()) > 1e-3


# ----- the whole net's score ---------------------------------------------------------------------------


def test_score_all_is_scaled_cosine_plus_both_biases(world) -> None:
    encoder, samples = world
    torch.manual_seed(2)
    user_names = list(USER_BIAS_CANDIDATES)
    config = SMALL.model_copy(update={"expert_mixing": "embedding"})  # the paper's form
    net = ColdWarmNet(encoder, config, user_bias_columns=[0, 4, 5], item_bias_columns=[0, 2, 3]).eval()
    net.user_tower.attention.set_groups(torch.randn(SMALL.n_user_groups, SMALL.embedding_dim))
    with torch.no_grad():
        net.log_scale.fill_(math.log(3.7))
    assert user_names[4] == "interaction_count"
    profile, history, state, _ = samples.batch(torch.arange(0, len(samples), max(1, len(samples) // 40)))
    # An empty-history user as well.
    history[0] = 0
    with torch.no_grad():
        scores = net.score_all(profile, history, state)
        e_u, b_u, _ = net.user_tower(profile, history, state)
        e_i, b_i = net.item_scorer(torch.arange(net.n_items))
        profile_f = net.user_tower.profile(profile)
        raw_cold = net.user_tower.cold(profile_f)
        raw_warm = net.user_tower.warm(
            profile_f, net.user_tower.pooling(net.user_tower.item_inputs(history), history)
        )
        gate = net.user_tower.gate(state)
        raw_item = net.item_scorer.tower(torch.arange(net.n_items))
    mixed = gate[:, :1] * raw_cold + gate[:, 1:] * raw_warm
    cosine = F.cosine_similarity(mixed.unsqueeze(1), raw_item.unsqueeze(0), dim=2)
    expected = 3.7 * cosine + b_u.unsqueeze(1) + b_i.unsqueeze(0)
    assert scores.shape == (len(profile), encoder.catalog_item_ids.shape[0])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_u.norm(dim=1), torch.ones(len(e_u)))
    torch.testing.assert_close(e_i.norm(dim=1), torch.ones(len(e_i)))
    assert float(b_u.abs().max()) > 0 and float(b_u.std()) > 0  # user bias really takes part
    assert float(b_i.std()) > 0


def test_dot_similarity_scores_the_raw_mixed_vectors_with_a_fixed_unit_scale(world) -> None:
    encoder, samples = world
    torch.manual_seed(3)
    config = SMALL.model_copy(update={"similarity": "dot", "expert_mixing": "embedding"})
    net = ColdWarmNet(encoder, config, [0, 4], [0, 2]).eval()
    assert float(net.scale) == 1.0 and "log_scale" not in dict(net.named_parameters())
    profile, history, state, _ = samples.batch(torch.arange(32))
    with torch.no_grad():
        scores = net.score_all(profile, history, state)
        _, b_u, gate = net.user_tower(profile, history, state)
        _, b_i = net.all_items()
        profile_f = net.user_tower.profile(profile)
        raw_cold = net.user_tower.cold(profile_f)
        raw_warm = net.user_tower.warm(
            profile_f, net.user_tower.pooling(net.user_tower.item_inputs(history), history)
        )
        raw_item = net.item_scorer.tower(torch.arange(net.n_items))
    mixed = gate[:, :1] * raw_cold + gate[:, 1:] * raw_warm
    expected = mixed @ raw_item.t() + b_u.unsqueeze(1) + b_i.unsqueeze(0)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert float((raw_item.norm(dim=1) - 1).abs().max()) > 1e-3  # really not normalised


def test_score_mixing_is_the_gated_sum_of_each_experts_cosine_in_its_own_item_space(world) -> None:
    encoder, samples = world
    torch.manual_seed(4)
    config = SMALL.model_copy(update={"expert_mixing": "score"})
    net = ColdWarmNet(encoder, config, [], [0, 2]).eval()
    with torch.no_grad():
        net.log_scale.fill_(math.log(5.0))
    profile, history, state, _ = samples.batch(torch.arange(32))
    positions = torch.arange(net.n_items)
    with torch.no_grad():
        scores = net.score_all(profile, history, state)
        e_u, b_u, gate, own_cold, own_warm = net.user_tower.experts(profile, history, state)
        _, b_i = net.all_items()
        profile_f = net.user_tower.profile(profile)
        raw_cold = net.user_tower.cold(profile_f)
        raw_warm = net.user_tower.warm(
            profile_f, net.user_tower.pooling(net.user_tower.item_inputs(history), history)
        )
        cold_items, warm_items = net.item_scorer.tower(positions), net.item_scorer.warm_tower(positions)
        e_i, _ = net.all_items()
    cos_cold = F.cosine_similarity(raw_cold.unsqueeze(1), cold_items.unsqueeze(0), dim=2)
    cos_warm = F.cosine_similarity(raw_warm.unsqueeze(1), warm_items.unsqueeze(0), dim=2)
    expected = 5.0 * (gate[:, :1] * cos_cold + gate[:, 1:] * cos_warm) + b_u.unsqueeze(1) + b_i.unsqueeze(0)
    assert e_u.shape == (32, 2 * SMALL.embedding_dim)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # Each expert's own vector scores as that expert alone (what distillation compares).
    torch.testing.assert_close(own_cold @ e_i.t(), cos_cold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own_warm @ e_i.t(), cos_warm, atol=1e-5, rtol=1e-5)
    scripted = torch.jit.script(net.user_tower)
    torch.testing.assert_close(scripted(profile, history, state)[0], e_u)


@pytest.mark.parametrize(
    ("update", "k"), [({"state_item_dims": 4}, 4), ({"stage_popularity": True}, 8)], ids=["learnt", "stage"]
)
def test_the_state_term_adds_a_state_dependent_item_affinity_to_every_score(
    world, update: dict[str, object], k: int
) -> None:
    """The score gains <g(state), v_i>, unscaled by s (the query carries g / s), as one inner product
    of the wider vectors: v_i learnt (state_item_dims = k) or the items' stage popularity (one value
    per interaction-count bucket, set by training); users alike but for their state rank
    differently, each expert's own vector still scores as that expert alone, and the term gives s no
    gradient (scaled by s, it pulled s down and softened the experts' cosines)."""
    encoder, samples = world
    torch.manual_seed(5)
    config = SMALL.model_copy(update=update)
    net = ColdWarmNet(encoder, config, [], [0, 2]).eval()
    plain = ColdWarmNet(encoder, SMALL, [], [0, 2]).eval()
    plain.load_state_dict(net.state_dict(), strict=False)  # the same net without the term
    v = torch.randn(net.n_items, k)
    with torch.no_grad():
        net.log_scale.fill_(math.log(5.0))
        plain.log_scale.fill_(math.log(5.0))
        if config.stage_popularity:
            net.set_stage_popularity(v, v - 1.0)
        else:
            net.item_scorer.state_items.weight.copy_(v)
    profile, history, state, _ = samples.batch(torch.arange(32))
    with torch.no_grad():
        scores = net.score_all(profile, history, state)
        e_u, _, _, own_cold, own_warm = net.user_tower.experts(profile, history, state)
        _, _, _, plain_cold, plain_warm = plain.user_tower.experts(profile, history, state)
        e_i, _ = net.all_items()
        plain_e_i, _ = plain.all_items()
        g = net.user_tower.state_items(state)
        expected = plain.score_all(profile, history, state) + g @ v.t()  # outside the scale, as b_i
        other_state = net.score_all(profile, history, state.roll(1, dims=0))
    width = 2 * SMALL.embedding_dim + k
    assert e_u.shape == (32, width) and e_i.shape == (net.n_items, width)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert float((scores - other_state).abs().max()) > 1e-3
    torch.testing.assert_close(own_cold @ e_i.t(), plain_cold @ plain_e_i.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own_warm @ e_i.t(), plain_warm @ plain_e_i.t(), atol=1e-5, rtol=1e-5)
    scripted = torch.jit.script(net.user_tower)
    torch.testing.assert_close(scripted(profile, history, state)[0], e_u)
    assert torch.jit.script(plain.user_tower)(profile, history, state)[0].shape[1] == 2 * SMALL.embedding_dim
    e_u, _, _ = net.user_tower(profile, history, state)
    e_i, _ = net.all_items()
    (net.scale * (e_u[:, -k:] @ e_i[:, -k:].t())).sum().backward()
    assert abs(float(net.log_scale.grad)) < 1e-4
    assert any(float(p.grad.abs().sum()) > 0 for p in net.user_tower.state_items.parameters())


def test_training_scores_each_sample_s_own_target_without_its_own_count(world) -> None:
    """With stage popularity, training's logit of a sample's own target reads the counts without that
    sample in the columns that counted it (its stage and later); every other logit, and the scores
    served, read the table."""
    encoder, samples = world
    torch.manual_seed(6)
    # Columns for the count buckets from the one holding 1 action (the second) on: 2, 3, ..., 13.
    config = SMALL.model_copy(update={"stage_popularity": True, "stage_popularity_from": 2})
    net = ColdWarmNet(encoder, config, [], [0, 2]).eval()
    table = torch.randn(net.n_items, 12)
    without_own = table - torch.rand(net.n_items, 12) - 0.5
    net.set_stage_popularity(table, without_own)
    profile, history, state, targets = samples.batch(torch.arange(16))
    positions = torch.cat([targets, torch.arange(net.n_items)])
    positives = torch.arange(16)
    with torch.no_grad():
        plain = net(profile, history, state, positions).logits
        left_out = net(profile, history, state, positions, positives=positives).logits
        g = net.user_tower.state_items(state)
    stages = state[:, COUNT_COLUMN]
    counted_it = (torch.arange(2, 14).unsqueeze(0) >= stages.unsqueeze(1)).float()
    assert 0 < float(counted_it.mean()) < 1  # some samples' stages come after some columns
    change = (g * (without_own[targets] - table[targets]) * counted_it).sum(dim=1)
    expected = plain.clone()
    expected[positives, positives] += change
    torch.testing.assert_close(left_out, expected, atol=1e-5, rtol=1e-5)
    assert float(change.abs().min()) > 0  # every sample's target moved
    # Per-sample candidate lists (bce): column 0 is the positive.
    per_sample = torch.stack([targets, targets.roll(1)], dim=1)
    with torch.no_grad():
        bce_plain = net(profile, history, state, per_sample).logits
        bce_left_out = net(
            profile, history, state, per_sample, positives=torch.zeros(16, dtype=torch.long)
        ).logits
    torch.testing.assert_close(bce_left_out[:, 0], bce_plain[:, 0] + change, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bce_left_out[:, 1], bce_plain[:, 1])


def test_no_bias_net_means_zero_biases(world) -> None:
    encoder, samples = world
    net = ColdWarmNet(encoder, SMALL.model_copy(update={"use_bias_net": False}), [0, 1], [0, 1]).eval()
    profile, history, state, _ = samples.batch(torch.arange(16))
    with torch.no_grad():
        _, b_u, _ = net.user_tower(profile, history, state)
        _, b_i = net.all_items()
    assert torch.all(b_u == 0) and torch.all(b_i == 0)


# ----- distillation inside a training step --------------------------------------------------------


def distillation_gradients(world, alpha: float) -> dict[str, torch.Tensor]:
    """Gradients of one training step's loss with DKD weight ``alpha``, same batch and candidates."""
    encoder, samples = world
    torch.manual_seed(0)
    net = ColdWarmNet(encoder, SMALL, [], [0, 1])
    batch = samples.batch(torch.arange(64))
    config = TrainConfig(shared_negatives=32)
    log_q = item_log_frequencies(samples, net.n_items)
    model_config = SMALL.model_copy(update={"dkd_alpha": alpha})
    loss, _ = training_step(net, batch, config, model_config, True, log_q, torch.Generator().manual_seed(1))
    loss.backward()
    return {
        name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in net.named_parameters()
    }


def test_distillation_moves_only_the_cold_expert(world) -> None:
    """The difference between a step with and without the distillation term is its own gradient."""
    without, with_dkd = distillation_gradients(world, 0.0), distillation_gradients(world, 10.0)
    moved = {name for name in without if not torch.allclose(without[name], with_dkd[name], atol=1e-7)}
    assert moved, "the distillation term had no effect at all"
    # The cold expert's own layers (and the profile embeddings that feed it) are what it may move.
    assert all(name.startswith(("user_tower.cold.", "user_tower.profile.")) for name in moved), sorted(moved)
    assert any(name.startswith("user_tower.cold.") for name in moved)


def test_history_balance_weights_give_each_history_length_its_share() -> None:
    # Histories of lengths 0, 1, 1, 2, 2, 2 (0 = padding).
    lengths = history_lengths(torch.tensor([[0, 0], [5, 0], [6, 0], [5, 6], [6, 7], [7, 8]]))
    alike = length_balance_weights(lengths, 0.0)
    torch.testing.assert_close(alike, torch.ones(6))
    balanced = length_balance_weights(lengths, 1.0)
    assert float(balanced.mean()) == pytest.approx(1.0)
    totals = [float(balanced[rows].sum()) for rows in ([0], [1, 2], [3, 4, 5])]
    assert totals == pytest.approx([2.0, 2.0, 2.0])  # every length the same total weight


def test_the_warm_action_skip_adds_the_newest_reading_past_the_mlps() -> None:
    from model.nn.experts import WarmExpert

    torch.manual_seed(0)
    dim, hidden, profile_dim = 8, 16, 6
    attention = GroupAttention(4, dim)
    plain = WarmExpert(profile_dim, 2 * dim, dim, hidden, attention, True)
    skipping = WarmExpert(profile_dim, 2 * dim, dim, hidden, attention, True, action_skip=True)
    skipping.load_state_dict(plain.state_dict())
    profile, actions = torch.randn(3, profile_dim), torch.randn(3, 2 * dim)
    # The last d action features are the pooling's newest reading (attention output / recent mean).
    torch.testing.assert_close(skipping(profile, actions), plain(profile, actions) + actions[:, dim:])


def test_the_sequence_warm_expert_is_sasrecs_reading_plus_a_profile_term() -> None:
    from model.nn.experts import NewestReading, SequenceWarmExpert
    from model.nn.sequence import SequenceEncoder

    torch.manual_seed(0)
    dim, hidden, length = 8, 16, 5
    reading = NewestReading(dim, hidden, length, 2, 1, 0.0).eval()
    history = torch.tensor([[3, 2, 1, 0, 0], [0, 0, 0, 0, 0]])  # newest first, 0 = padding
    embedded = torch.randn(2, length, dim)
    out = reading(embedded, history)
    # The first user's reading is the encoder over their 3 items, oldest → newest; the second, who has
    # no history, gets the learnt empty-history vector.
    encoder: SequenceEncoder = reading.encoder
    expected = encoder(embedded[:1, :3].flip(1), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(out[:1], expected)
    torch.testing.assert_close(out[1], reading.empty_history.detach())
    expert = SequenceWarmExpert(6, dim, hidden)
    profile = torch.randn(2, 6)
    torch.testing.assert_close(expert(profile, out), out + expert.profile(profile))


def test_training_runs_where_the_settings_say() -> None:
    from model.train import training_device

    assert training_device(TrainConfig(device="cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training_device(TrainConfig(device="auto")).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="COLDWARM_TRAIN__DEVICE"):
            training_device(TrainConfig(device="cuda"))


@pytest.mark.parametrize("columns", ["all", "count"])
def test_the_experts_read_the_state_columns_they_are_given(
    world: tuple[FeatureEncoder, TrainingSamples], columns: str
) -> None:
    """With expert_state_columns=count the experts' own vectors move with the interaction count and
    not with the days since the first and last action; with all they move with every column."""
    encoder, samples = world
    torch.manual_seed(0)
    config = SMALL.model_copy(update={"expert_state_input": True, "expert_state_columns": columns})
    net = ColdWarmNet(encoder, config, [], []).eval()
    profile, history, state, _ = samples.batch(torch.arange(16))
    cards = encoder.state_cardinalities()

    def cold(state: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net.user_tower.experts(profile, history, state)[3]

    base = cold(state)
    for column in range(len(cards)):
        moved = state.clone()
        moved[:, column] = (moved[:, column] + 1) % cards[column]
        changed = not torch.allclose(cold(moved), base)
        assert changed == (columns == "all" or column == COUNT_COLUMN), column
