"""User groups E_ug: k-means over a pre-trained model's embeddings of the most active train users;
each group's embedding is the mean of its members'."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from model.samples import TrainingSamples


def most_active_rows(samples: TrainingSamples, n_users: int) -> np.ndarray:
    """For the ``n_users`` users with the most samples, the index of their latest sample."""
    users, first, counts = np.unique(samples.user_row, return_index=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:n_users]
    return (first + counts - 1)[order]


def cluster_group_embeddings(embeddings: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
    """(m, d) group embeddings: member means of k-means clusters (fewer users than m: users repeat)."""
    if len(embeddings) < n_groups:
        embeddings = np.resize(embeddings, (n_groups, embeddings.shape[1]))
    kmeans = KMeans(n_clusters=n_groups, n_init=4, random_state=seed).fit(embeddings)
    groups = np.zeros((n_groups, embeddings.shape[1]), dtype=np.float32)
    for group in range(n_groups):
        members = embeddings[kmeans.labels_ == group]
        groups[group] = members.mean(axis=0) if len(members) else kmeans.cluster_centers_[group]
    return groups


@torch.no_grad()
def embed_rows(user_tower: torch.nn.Module, samples: TrainingSamples, rows: np.ndarray) -> np.ndarray:
    index = torch.as_tensor(rows, dtype=torch.long)
    profile, history, state, _ = samples.batch(index)
    embedding, _, _ = user_tower(profile, history, state)
    return embedding.numpy()
