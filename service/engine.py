"""The model and index being served, and the computation of one answer.

A ``ServingBundle`` is the TorchScript user tower, the encoder and the FAISS index of one model
version, loaded and checked together. The ``Recommender`` holds exactly one bundle and swaps it whole,
so a request sees one model and its index, never a mix. Model and search run on one dedicated
thread: off the event loop, and serialised, which GPU FAISS requires and CPU FAISS does not mind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from index_builder.build import load_index
from index_builder.faiss_index import search
from index_builder.settings import IndexSettings
from index_builder.vectors import fold_bias, query_vectors
from model.artifacts import ArtifactError, Artifacts, load_artifacts
from service.feature_store import UserRecord, records_to_raw_users

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingBundle:
    artifacts: Artifacts
    index: faiss.Index
    index_manifest: dict[str, Any]
    index_version: str
    # The folded item vectors, for the exact fallback when an approximate index returns too few items.
    vectors: np.ndarray

    @property
    def model_version(self) -> str:
        return self.artifacts.version

    @property
    def n_items(self) -> int:
        return int(self.index.ntotal)


@dataclass(frozen=True)
class Recommendation:
    item_ids: list[int]
    scores: list[float]
    gate_cold: float
    gate_warm: float
    model_seconds: float
    search_seconds: float
    model_version: str
    index_version: str


def load_bundle(artifacts_dir: Path, index_settings: IndexSettings) -> ServingBundle:
    """Loads artifacts and their index, checks they belong together, and runs one request through them."""
    artifacts = load_artifacts(Path(artifacts_dir))
    index, manifest = load_index(artifacts.directory, index_settings, artifacts.version)
    vectors = fold_bias(artifacts.items.embeddings, artifacts.items.bias, artifacts.scale)
    bundle = ServingBundle(artifacts, index, manifest, str(manifest.get("index_version", "")), vectors)
    try:
        compute(bundle, UserRecord.unknown(0), int(time.time()), 1, set())  # warm-up: first-call costs here
    except Exception as error:  # a tower that loads but cannot run is as broken as a missing file
        raise ArtifactError(f"{artifacts.directory}: warm-up request failed: {error}") from error
    return bundle


def compute(bundle: ServingBundle, record: UserRecord, now: int, k: int, exclude: set[int]) -> Recommendation:
    """Top-k items for one user: encode → user tower → FAISS → drop excluded items → add b_u."""
    started = time.perf_counter()
    encoder = bundle.artifacts.encoder
    encoded = encoder.encode_users(records_to_raw_users([record], now, encoder.config.max_history))
    with torch.no_grad():
        embedding, user_bias, gate = bundle.artifacts.user_tower(
            torch.from_numpy(encoded.profile),
            torch.from_numpy(encoded.history),
            torch.from_numpy(encoded.state),
        )
    queries = query_vectors(embedding.numpy())
    model_done = time.perf_counter()
    # Over-fetching by the number of exclusions guarantees k survivors whenever the catalog has them.
    fetch = min(k + len(exclude), bundle.n_items)
    scores, ids = search(bundle.index, queries, fetch)
    search_done = time.perf_counter()
    keep = [
        (int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and int(i) not in exclude
    ]
    keep = keep[:k]
    bias = float(user_bias[0])
    return Recommendation(
        item_ids=[i for i, _ in keep],
        scores=[s + bias for _, s in keep],
        gate_cold=float(gate[0, 0]),
        gate_warm=float(gate[0, 1]),
        model_seconds=model_done - started,
        search_seconds=search_done - model_done,
        model_version=bundle.model_version,
        index_version=bundle.index_version,
    )


def survivors(ids: np.ndarray, scores: np.ndarray, exclude: set[int], k: int) -> list[tuple[int, float]]:
    kept = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0 and int(i) not in exclude]
    return kept[:k]


class Recommender:
    """Serves the current bundle; ``swap`` replaces it atomically."""

    def __init__(self, bundle: ServingBundle) -> None:
        self._bundle = bundle
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coldwarm-model")
        self._reload_lock = asyncio.Lock()

    @property
    def bundle(self) -> ServingBundle:
        return self._bundle

    async def recommend(self, record: UserRecord, now: int, k: int, exclude: Iterable[int]) -> Recommendation:
        bundle = self._bundle  # one snapshot per request: the model and the index it was built for
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, compute, bundle, record, now, k, set(exclude))

    async def reload(self, artifacts_dir: Path, index_settings: IndexSettings) -> ServingBundle:
        """Loads and warms a new bundle off the serving thread, then swaps; on error the old one stays."""
        async with self._reload_lock:
            bundle = await asyncio.to_thread(load_bundle, artifacts_dir, index_settings)
            served, new = self._bundle.artifacts.encoder.config, bundle.artifacts.encoder.config
            if new.max_history != served.max_history:
                # The feature store keeps max_history actions per user, fixed when the service started.
                raise ArtifactError(
                    f"{bundle.artifacts.directory}: max_history {new.max_history} differs from the served "
                    f"{served.max_history}; restart the service to change it"
                )
            self._bundle = bundle
            log.info("now serving model %s with index %s", bundle.model_version, bundle.index_version)
            return bundle

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def configure_threads(torch_threads: int, faiss_threads: int) -> None:
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)
