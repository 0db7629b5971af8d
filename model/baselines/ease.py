"""EASE (Steck, WWW 2019): the closed-form item-item model, as the protocol's strongest warm baseline.

B = I - P diag(1/diag(P)), P = (X^T X + lambda I)^-1, so diag(B) = 0 exactly. X is train users' binary
interaction matrix over the catalog. A point is scored by its history's binary vector times B; with an
empty history that is all zeros, so h = 0 falls back to most-popular, as the protocol prescribes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from model.baselines.popular import item_counts
from model.baselines.tuning import GridTuning, tune_on_validation
from model.data.schema import InteractionData
from model.data.split import UserSplit
from model.evaluation.protocol import EvalPoint, catalog_indices

LAMBDA_GRID: tuple[float, ...] = (50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000)
TUNING_METRIC = "recall@50"


def interaction_matrix(
    data: InteractionData, user_ids: np.ndarray, catalog_item_ids: np.ndarray
) -> sp.csr_matrix:
    """Binary (n_users, n_catalog) matrix; repeated interactions count once."""
    inter = data.interactions
    user_ids = np.unique(np.asarray(user_ids, dtype=np.int64))
    mask = inter["user_id"].isin(user_ids).to_numpy()
    rows = np.searchsorted(user_ids, inter["user_id"].to_numpy(np.int64)[mask])
    cols = catalog_indices(catalog_item_ids, inter["item_id"].to_numpy(np.int64)[mask])
    keep = cols >= 0
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float64), (rows[keep], cols[keep])),
        shape=(len(user_ids), len(catalog_item_ids)),
    )
    matrix.data[:] = 1.0  # csr construction sums duplicates; binarise afterwards
    return matrix


def gram_matrix(x: sp.csr_matrix) -> np.ndarray:
    """Dense float64 X^T X; computed once and reused across the lambda grid."""
    return np.asarray((x.T @ x).toarray(), dtype=np.float64)


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """float32 B from X^T X and lambda; the inverse is taken in float64 and cast once at the end."""
    if lam <= 0:
        raise ValueError(f"EASE needs lambda > 0, got {lam}")
    g = gram.copy()
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)  # Cholesky (potrf/potri) measured no faster here once symmetrised
    b = p / (-np.diag(p))[None, :]  # column j scaled by -1/P_jj
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def history_matrix(points: Sequence[EvalPoint], catalog_item_ids: np.ndarray) -> np.ndarray:
    """float32 (len(points), n_catalog) binary history vectors."""
    x = np.zeros((len(points), len(catalog_item_ids)), np.float32)
    for row, point in enumerate(points):
        cols = catalog_indices(catalog_item_ids, point.history_item_ids)
        x[row, cols[cols >= 0]] = 1.0
    return x


@dataclass
class Ease:
    weights: np.ndarray = field(repr=False)  # float32 (n_catalog, n_catalog), zero diagonal
    popularity: np.ndarray = field(repr=False)  # float32 (n_catalog,), the h = 0 fallback
    catalog_item_ids: np.ndarray = field(repr=False)
    lam: float = 500.0
    name: str = "ease"

    @classmethod
    def fit(
        cls, data: InteractionData, train_user_ids: np.ndarray, catalog_item_ids: np.ndarray, lam: float
    ) -> Ease:
        gram = gram_matrix(interaction_matrix(data, train_user_ids, catalog_item_ids))
        return cls.from_gram(gram, data, train_user_ids, catalog_item_ids, lam)

    @classmethod
    def from_gram(
        cls,
        gram: np.ndarray,
        data: InteractionData,
        train_user_ids: np.ndarray,
        catalog_item_ids: np.ndarray,
        lam: float,
    ) -> Ease:
        popularity = item_counts(data, train_user_ids, catalog_item_ids).astype(np.float32)
        return cls(ease_weights(gram, lam), popularity, np.asarray(catalog_item_ids, np.int64), float(lam))

    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        x = history_matrix(points, self.catalog_item_ids)
        scores = x @ self.weights
        # Only a truly empty history falls back; a history of out-of-catalog items keeps its zero row.
        empty = np.array([len(p.history_item_ids) == 0 for p in points], dtype=bool)
        scores[empty] = self.popularity
        return scores


class EaseTuning(GridTuning[Ease]):
    """The tuning of lambda; ``validation`` is Recall@50 over all groups."""

    @property
    def best_lambda(self) -> float:
        return self.best


def tune_lambda(
    data: InteractionData,
    split: UserSplit,
    catalog: np.ndarray,
    grid: Sequence[float] = LAMBDA_GRID,
) -> EaseTuning:
    """Picks lambda maximising validation users' Recall@50 (all groups); ties go to the smaller lambda."""
    gram = gram_matrix(interaction_matrix(data, split.train, catalog))
    tuning = tune_on_validation(
        lambda lam: Ease.from_gram(gram, data, split.train, catalog, lam),
        grid, data, split, catalog, "all", TUNING_METRIC,
    )  # fmt: skip
    return EaseTuning(tuning.best, tuning.validation, tuning.seconds, tuning.model)
