"""Chooses the bias net's beta features by mutual information with user behaviour.

Behaviour is "did this (user state, item) pair interact": positives are training interactions,
negatives pair a user drawn uniformly over users (at a random point of their history) with an item
drawn uniformly over the catalog. Drawing negative users uniformly is what lets user-side features
(activity, recency) carry information: with per-positive negatives they would carry none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.feature_selection import mutual_info_classif

from model.samples import TrainingSamples


@dataclass(frozen=True)
class BiasFeatureSelection:
    user_columns: list[int]
    item_columns: list[int]
    names: list[str]
    scores: dict[str, float]


def select_by_mutual_information(
    features: np.ndarray, labels: np.ndarray, names: list[str], beta: int, seed: int = 0
) -> tuple[list[int], dict[str, float]]:
    """The ``beta`` columns with the highest MI with ``labels`` (ties: lower index), and every score."""
    scores = mutual_info_classif(features, labels, discrete_features=True, random_state=seed)
    order = sorted(range(len(names)), key=lambda c: (-scores[c], c))
    return sorted(order[:beta]), {name: float(score) for name, score in zip(names, scores, strict=True)}


def behaviour_rows(
    samples: TrainingSamples, max_positives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample rows of the positives, drawn as the loss weighs them (a target window's copies of one
    prefix share one sample's chance), and of as many negatives: a uniformly drawn user, at a
    uniformly drawn prefix of theirs (copies sit side by side and share its features: the first
    stands for them all)."""
    n = len(samples)
    weights = None if samples.window_weight is None else samples.window_weight.numpy().astype(np.float64)
    chance = None if weights is None else weights / weights.sum()
    positives = rng.choice(n, size=min(n, max_positives), replace=False, p=chance)
    user_row, position = np.asarray(samples.user_row), samples.position.numpy()
    prefix_starts = np.flatnonzero(
        np.r_[True, (user_row[1:] != user_row[:-1]) | (position[1:] != position[:-1])]
    )
    _, starts, counts = np.unique(user_row[prefix_starts], return_index=True, return_counts=True)
    users = rng.integers(0, len(starts), size=len(positives))
    negatives = prefix_starts[starts[users] + rng.integers(0, counts[users])]
    return positives, negatives


def behaviour_sample(
    samples: TrainingSamples, item_candidates: torch.Tensor, max_positives: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user feature codes, item feature codes, label) for positives and as many negatives."""
    rng = np.random.default_rng(seed)
    positives, negatives = behaviour_rows(samples, max_positives, rng)
    negative_items = rng.integers(0, item_candidates.shape[0], size=len(positives))
    rows = np.concatenate([positives, negatives])
    index = torch.as_tensor(rows)
    user_codes = torch.cat([samples.profiles(index), samples.state[index].long()], dim=1).numpy()
    items = np.concatenate([samples.target[positives].numpy(), negative_items])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(positives))]).astype(np.int64)
    return user_codes, item_candidates[items].numpy(), labels


def select_bias_features(
    samples: TrainingSamples,
    item_candidates: torch.Tensor,
    user_names: list[str],
    item_names: list[str],
    beta: int,
    seed: int,
    max_positives: int = 100_000,
) -> BiasFeatureSelection:
    """The top ``beta`` of the user-side and item-side candidates; passing no ``user_names`` limits the
    choice to the item side (the user columns of the sample are then left out)."""
    user_codes, item_codes, labels = behaviour_sample(samples, item_candidates, max_positives, seed)
    user_codes = user_codes[:, : len(user_names)]
    chosen, scores = select_by_mutual_information(
        np.concatenate([user_codes, item_codes], axis=1), labels, [*user_names, *item_names], beta, seed
    )
    n_user = len(user_names)
    names = [*user_names, *item_names]
    return BiasFeatureSelection(
        user_columns=[c for c in chosen if c < n_user],
        item_columns=[c - n_user for c in chosen if c >= n_user],
        names=[names[c] for c in chosen],
        scores=scores,
    )
