"""Recall of an approximate index against exact search, on queries that look like real traffic.

Recall measured on random queries says little: real user embeddings sit in a few dense regions of the
sphere, and a cold-start user's embedding (profile only) is not where a long-history user's is. So the
queries are real users, each embedded as of a random point of their history, empty histories included.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from index_builder.faiss_index import EMPTY_ID
from index_builder.vectors import query_vectors
from model.artifacts import Artifacts
from model.data.schema import InteractionData
from model.evaluation.protocol import HISTORY_LENGTHS, EvalPoint, build_eval_points
from model.ranker import encode_points

logger = logging.getLogger(__name__)

USER_TOWER_BATCH = 1024


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k; empty (-1) slots never count as hits.

    The denominator stays k even when the catalog is smaller, so pass k <= the catalog size.
    """
    approx_ids = np.asarray(approx_ids, dtype=np.int64)[:, :k]
    exact_ids = np.asarray(exact_ids, dtype=np.int64)[:, :k]
    if len(approx_ids) != len(exact_ids):
        raise ValueError(f"{len(approx_ids)} approximate vs {len(exact_ids)} exact result rows")
    if len(approx_ids) == 0:
        raise ValueError("no queries")
    hits = [
        len(np.intersect1d(a[a != EMPTY_ID], e[e != EMPTY_ID], assume_unique=True))
        for a, e in zip(approx_ids, exact_ids, strict=True)
    ]
    return float(np.mean(hits) / k)


def sample_points(data: InteractionData, n: int, seed: int) -> list[EvalPoint]:
    """n (user, h) points: users drawn at random, h from the protocol's history lengths (0 included).

    n_targets=1 keeps every h the user has lived past, so long histories are represented too.
    """
    rng = np.random.default_rng(seed)
    users = np.unique(data.interactions["user_id"].to_numpy(np.int64))
    if len(users) == 0:
        raise ValueError(f"{data.name}: no interactions to sample users from")
    chosen = rng.choice(users, size=min(n, len(users)), replace=False)
    points = build_eval_points(data, chosen, HISTORY_LENGTHS, n_targets=1)
    picks = rng.choice(len(points), size=n, replace=n > len(points))
    return [points[i] for i in picks]


def sample_user_queries(
    artifacts: Artifacts, data: InteractionData, n: int, seed: int = 0, progress: bool = False
) -> np.ndarray:
    """float32 (n, d + 1) queries from the artifact's own user tower, as the service would compute them."""
    points = sample_points(data, n, seed)
    embeddings = []
    starts = range(0, len(points), USER_TOWER_BATCH)
    for start in tqdm(starts, desc="user queries", unit="batch", disable=not progress, leave=False):
        encoded = encode_points(points[start : start + USER_TOWER_BATCH], data.users, artifacts.encoder)
        e_u, _, _ = artifacts.embed_users(encoded)
        embeddings.append(e_u.float().cpu().numpy())
    lengths = np.bincount([p.h for p in points])
    logger.info(
        "embedded %d user queries; history lengths %s",
        len(points),
        {h: int(c) for h, c in enumerate(lengths) if c},
    )
    return query_vectors(np.concatenate(embeddings))


def synthetic_queries(item_vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """float32 (n, d + 1) queries when no user data is at hand: half uniform on the sphere, half near items.

    The near-item half mimics users whose taste sits where the items are; the uniform half probes the
    empty regions, where an approximate index is often at its worst.
    """
    rng = np.random.default_rng(seed)
    item_vectors = np.asarray(item_vectors, dtype=np.float32)
    d = item_vectors.shape[1] - 1
    n_random = n // 2
    random = rng.standard_normal((n_random, d))
    anchors = item_vectors[rng.integers(0, len(item_vectors), n - n_random), :d].astype(np.float64)
    anchors /= np.maximum(np.linalg.norm(anchors, axis=1, keepdims=True), 1e-12)
    near = anchors + rng.standard_normal(anchors.shape) * (0.5 / np.sqrt(d))
    users = np.concatenate([random, near])
    users /= np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
    return query_vectors(users[rng.permutation(n)].astype(np.float32))
