"""Bias folding: the model's score as one inner product, so that retrieval stays exact.

score(u, i) = s·cos(e_u, e_i) + b_u + b_i. With item vectors [s·e_i, b_i] and queries [e_u, 1],
<query, item> = s·cos(e_u, e_i) + b_i (e_u and e_i are unit-norm). b_u is the same for every item of
one query, so it cannot change the ranking: the caller adds it to the returned scores. Nothing here
needs unit norms: a model scoring by the inner product (s = 1) or mixing its experts' scores (e_u and
e_i concatenations) folds the same way.
"""

from __future__ import annotations

import numpy as np


def fold_bias(embeddings: np.ndarray, bias: np.ndarray, scale: float) -> np.ndarray:
    """float32 (n, d + 1) item vectors [s·e_i, b_i]."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32).reshape(-1)
    if embeddings.ndim != 2 or len(bias) != len(embeddings):
        raise ValueError(f"need embeddings (n, d) and bias (n,), got {embeddings.shape} and {bias.shape}")
    n, d = embeddings.shape
    out = np.empty((n, d + 1), dtype=np.float32)
    out[:, :d] = embeddings * np.float32(scale)
    out[:, d] = bias
    return out


def query_vectors(user_embeddings: np.ndarray) -> np.ndarray:
    """float32 (B, d + 1) queries [e_u, 1]."""
    user_embeddings = np.asarray(user_embeddings, dtype=np.float32)
    if user_embeddings.ndim != 2:
        raise ValueError(f"need user embeddings (B, d), got {user_embeddings.shape}")
    b, d = user_embeddings.shape
    out = np.ones((b, d + 1), dtype=np.float32)
    out[:, :d] = user_embeddings
    return out


# The id FAISS gives empty result slots; no item may have it.
EMPTY_ID = -1


def checked_catalog(vectors: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (n, d) vectors and int64 (n,) ids that every search backend accepts: as many ids as
    vectors, at least one, unique, none the empty-slot id, every value finite (no faiss import: the
    torch backend uses it where FAISS is not installed)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    item_ids = np.ascontiguousarray(item_ids, dtype=np.int64).reshape(-1)
    if vectors.ndim != 2 or len(vectors) != len(item_ids):
        raise ValueError(f"need vectors (n, d) and item_ids (n,), got {vectors.shape} and {item_ids.shape}")
    if len(vectors) == 0:
        raise ValueError("cannot search over no vectors")
    if np.any(item_ids == EMPTY_ID):
        raise ValueError(f"item id {EMPTY_ID} is reserved for empty result slots")
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError("item ids must be unique")
    if not np.all(np.isfinite(vectors)):
        raise ValueError("vectors contain NaN or infinity")
    return vectors, item_ids
