"""The normalised interaction table: schema dtypes, (user, timestamp, item) order, ties in input order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from model.data.schema import normalise_interactions


def pandas_sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """The definition: pandas' stable sort by the three keys, after the casts."""
    out = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype(np.int64),
            "item_id": frame["item_id"].astype(np.int64),
            "timestamp": frame["timestamp"].astype(np.int64),
            "rating": frame["rating"].astype(np.float32),
        }
    )
    return out.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)


# Inputs already sorted by a prefix of the keys: the order check must look at every key.
@pytest.mark.parametrize(
    "presorted", [[], ["user_id"], ["user_id", "timestamp"], ["user_id", "timestamp", "item_id"]]
)
def test_the_order_is_a_stable_sort_by_user_time_item(presorted: list[str]) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(0, 80))
        frame = pd.DataFrame(
            {
                "user_id": rng.integers(0, 4, n).astype(np.int32),
                "item_id": rng.integers(0, 5, n),
                "timestamp": rng.integers(0, 4, n).astype(np.float64),
                "rating": rng.random(n),  # tells tied rows apart: their order must be the input's
            },
            index=rng.permutation(n) + 10,
        )
        if presorted:
            frame = frame.sort_values(presorted, kind="stable")
        pd.testing.assert_frame_equal(normalise_interactions(frame), pandas_sorted(frame))


def test_without_ratings_and_independent_of_the_input() -> None:
    frame = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5], "timestamp": [10, 20, 5]})
    out = normalise_interactions(frame)
    assert [str(t) for t in out.dtypes] == ["int64", "int64", "int64", "float32"]
    assert out["rating"].isna().all()
    frame.loc[0, "user_id"] = 9  # already in order, so nothing was copied by a sort: still not shared
    assert out["user_id"].tolist() == [1, 1, 2]
