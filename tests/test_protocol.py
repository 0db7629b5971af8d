"""Evaluation points, ranking (history exclusion, tie-breaking) and group means on tiny data."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from model.data.schema import InteractionData, make_interaction_data
from model.evaluation.protocol import (
    ACTIVE_FROM,
    EMPTY_SLOT,
    HISTORY_LENGTHS,
    WARM_UP_FROM,
    EvalPoint,
    build_eval_points,
    evaluate,
    group_of,
    groups_of,
    summarise,
    top_k,
    user_group,
)

# The protocol's groups as shared/DESIGN.md defines them over its history lengths, written out
# independently of user_group: the one definition must reproduce them exactly.
PROTOCOL_GROUPS = (
    {h: "cold_start" for h in (0, 1, 2, 3, 5)}
    | {h: "warm_up" for h in (10, 20, 30)}
    | {h: "active" for h in (50, 100)}
)


def make_data(rows: list[tuple[int, int, int]]) -> InteractionData:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return make_interaction_data(frame, None, None, name="tiny")


@pytest.fixture()
def data() -> InteractionData:
    rows: list[tuple[int, int, int]] = []
    # User 1: 25 interactions, items 100..124 at times 1000..1024, given shuffled.
    rows += [(1, 100 + i, 1000 + i) for i in reversed(range(25))]
    # User 2: 9 interactions, too few for any point.
    rows += [(2, 100 + i, 50 + i) for i in range(9)]
    # User 3: 12 interactions, all at one timestamp: the item id decides the order.
    rows += [(3, 130 - i, 7) for i in range(12)]
    return make_data(rows)


class FixedRanker:
    """Scores every point with the same vector."""

    def __init__(self, scores: np.ndarray, name: str = "fixed") -> None:
        self.scores = scores.astype(np.float32)
        self.name = name

    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        return np.repeat(self.scores[None, :], len(points), axis=0)


def test_points_per_user_and_h(data: InteractionData) -> None:
    points = build_eval_points(data, [3, 2, 1])
    # user 3: h + 10 <= 12 -> h in {0, 1, 2}; user 2: none; user 1: h + 10 <= 25 -> h <= 15.
    assert [(p.user_id, p.h) for p in points] == [(3, 0), (3, 1), (3, 2)] + [
        (1, h) for h in (0, 1, 2, 3, 5, 10)
    ]
    assert HISTORY_LENGTHS == (0, 1, 2, 3, 5, 10, 20, 30, 50, 100)


def test_history_and_target_boundaries(data: InteractionData) -> None:
    point = next(p for p in build_eval_points(data, [1]) if p.h == 5)
    np.testing.assert_array_equal(point.history_item_ids, [100, 101, 102, 103, 104])
    np.testing.assert_array_equal(point.history_timestamps, [1000, 1001, 1002, 1003, 1004])
    np.testing.assert_array_equal(point.target_item_ids, np.arange(105, 115))
    assert point.request_time == 1005
    assert point.history_item_ids.dtype == np.int64 and point.target_item_ids.dtype == np.int64


def test_same_timestamp_orders_by_item_id(data: InteractionData) -> None:
    point = next(p for p in build_eval_points(data, [3]) if p.h == 2)
    np.testing.assert_array_equal(point.history_item_ids, [119, 120])
    np.testing.assert_array_equal(point.target_item_ids, np.arange(121, 131))
    assert point.request_time == 7


def test_h_zero_has_empty_history(data: InteractionData) -> None:
    point = build_eval_points(data, [1], history_lengths=(0,))[0]
    assert len(point.history_item_ids) == 0 and point.h == 0
    np.testing.assert_array_equal(point.target_item_ids, np.arange(100, 110))


def test_group_assignment() -> None:
    assert [group_of(h) for h in HISTORY_LENGTHS] == ["cold_start"] * 5 + ["warm_up"] * 3 + ["active"] * 2
    assert groups_of(0) == ("cold_start", "all")
    assert groups_of(30) == ("warm_up", "all")


def test_user_groups_over_the_history_lengths_are_the_protocols() -> None:
    assert set(PROTOCOL_GROUPS) == set(HISTORY_LENGTHS)
    for h in HISTORY_LENGTHS:
        assert user_group(h) == group_of(h) == PROTOCOL_GROUPS[h], h
        assert groups_of(h) == (PROTOCOL_GROUPS[h], "all"), h


def test_user_group_boundaries() -> None:
    # The service labels every count, also those between the protocol's history lengths.
    assert (WARM_UP_FROM, ACTIVE_FROM) == (10, 50)
    assert [user_group(n) for n in (0, 9, 10, 49, 50, 10_000)] == [
        "cold_start",
        "cold_start",
        "warm_up",
        "warm_up",
        "active",
        "active",
    ]


def test_evaluation_group_means_are_the_protocol_groups_means() -> None:
    # Three users long enough for points at every history length, ranked by random fixed scores.
    rng = np.random.default_rng(0)
    n_items = 150
    rows = [
        (user, int(item), t)
        for user in (1, 2, 3)
        for t, item in enumerate(rng.permutation(n_items)[: 110 + 10 * user])
    ]
    data = make_data(rows)
    catalog = data.catalog_item_ids()
    points = build_eval_points(data, [1, 2, 3])
    assert {p.h for p in points} == set(HISTORY_LENGTHS)
    result = evaluate(FixedRanker(rng.normal(size=len(catalog))), points, catalog, progress=False)
    for group in ("cold_start", "warm_up", "active"):
        mask = np.array([PROTOCOL_GROUPS[int(h)] == group for h in result.point_h])
        assert result.points[group] == int(mask.sum()) > 0, group
        for metric, values in result.per_point.items():
            assert result.groups[group][metric] == pytest.approx(float(values[mask].mean())), (group, metric)
    assert result.points["all"] == len(points)


def test_top_k_breaks_ties_by_lower_index() -> None:
    scores = np.array([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k(scores, 2), [[1, 2], [0, 1]])
    np.testing.assert_array_equal(top_k(scores, 4), [[1, 2, 3, 0], [0, 1, 2, 3]])


def test_top_k_matches_a_full_sort_on_heavy_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(50, 40)).astype(np.float32)
    expected = np.stack([np.lexsort((np.arange(40), -row))[:7] for row in scores])
    np.testing.assert_array_equal(top_k(scores, 7), expected)


def test_top_k_leaves_excluded_items_out() -> None:
    scores = np.array([[3.0, -np.inf, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k(scores, 4), [[0, 2, EMPTY_SLOT, EMPTY_SLOT]])


def test_evaluate_excludes_history_and_counts_groups(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()  # items 100..130
    points = build_eval_points(data, [1])
    # Highest scores on the earliest items, i.e. on user 1's history: only exclusion lets targets in.
    ranker = FixedRanker(-np.arange(len(catalog), dtype=np.float32))
    result = evaluate(ranker, points, catalog, ks=(10,), progress=False)
    # After excluding h history items the top 10 are exactly the 10 targets, for every h.
    for h, metrics in result.curve.items():
        assert metrics["recall@10"] == pytest.approx(1.0), h
        assert metrics["ndcg@10"] == pytest.approx(1.0), h
    assert result.points == {"cold_start": 5, "warm_up": 1, "active": 0, "all": 6}
    assert "active" not in result.groups
    assert result.curve_points == {0: 1, 1: 1, 2: 1, 3: 1, 5: 1, 10: 1}


def test_evaluate_without_exclusion_would_miss(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    points = build_eval_points(data, [1], history_lengths=(10,))
    # Ranking is fixed: 100..109 (history, excluded), then 110..119 (targets) come first.
    result = evaluate(
        FixedRanker(-np.arange(len(catalog), dtype=np.float32)), points, catalog, ks=(10,), progress=False
    )
    assert result.groups["warm_up"]["recall@10"] == pytest.approx(1.0)
    assert result.groups["warm_up"]["hr@10"] == pytest.approx(1.0)


def test_evaluate_ties_follow_catalog_order(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    points = build_eval_points(data, [3], history_lengths=(0,))  # targets 119..128
    result = evaluate(FixedRanker(np.zeros(len(catalog))), points, catalog, ks=(10, 20), progress=False)
    # All scores tie, so the ranking is 100, 101, ...: targets 119..128 sit at ranks 20..29.
    assert result.groups["all"]["recall@10"] == 0.0
    assert result.groups["all"]["recall@20"] == pytest.approx(0.1)
    ideal = (1 / np.log2(np.arange(2, 12))).sum()
    assert result.groups["all"]["ndcg@20"] == pytest.approx((1 / np.log2(21)) / ideal)


def test_group_means_weight_points_equally() -> None:
    per_point = {"recall@10": np.array([0.0, 0.2, 0.4, 1.0, 0.6])}
    h = np.array([0, 5, 10, 50, 7])  # 7 is no protocol length; 7 interactions are cold-start
    result = summarise("x", per_point, h, np.arange(5))
    assert result.groups["cold_start"]["recall@10"] == pytest.approx(0.8 / 3)
    assert result.groups["warm_up"]["recall@10"] == pytest.approx(0.4)
    assert result.groups["active"]["recall@10"] == pytest.approx(1.0)
    assert result.groups["all"]["recall@10"] == pytest.approx(0.44)
    assert result.points == {"cold_start": 3, "warm_up": 1, "active": 1, "all": 5}
    assert result.curve[7]["recall@10"] == pytest.approx(0.6)


def test_result_is_json_serialisable(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    points = build_eval_points(data, [1, 3])
    result = evaluate(FixedRanker(np.zeros(len(catalog))), points, catalog, progress=False)
    payload = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    expected = {f"{m}@{k}" for m in ("recall", "ndcg", "hr") for k in (10, 50, 100)}
    assert set(payload["groups"]["all"]) == expected
    assert payload["points"]["all"] == 9


def test_wrong_score_shape_is_rejected(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    points = build_eval_points(data, [1], history_lengths=(0,))
    with pytest.raises(ValueError, match="expected"):
        evaluate(FixedRanker(np.zeros(len(catalog) - 1)), points, catalog, progress=False)
