"""The model and index being served, and the computation of one answer.

A ``ServingBundle`` is the TorchScript user tower, the encoder and the FAISS index of one model
version, loaded and checked together. The ``Recommender`` holds exactly one bundle and swaps it whole,
so a request sees one model and its index, never a mix. Model and search run on one dedicated
thread: off the event loop, and serialised, which GPU FAISS requires and CPU FAISS does not mind.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from index_builder.build import load_index
from index_builder.faiss_index import exact_search, search
from index_builder.settings import IndexSettings
from index_builder.vectors import fold_bias, query_vectors
from model.artifacts import ArtifactError, Artifacts, artifacts_root, load_artifacts
from service.feature_store import UserRecord, records_to_raw_users

log = logging.getLogger(__name__)

# Items kept of the cold-start answer for shedding: k up to the API's maximum plus room for exclusions.
COLD_ANSWER_SIZE = 2000


@dataclass(frozen=True)
class ServingBundle:
    artifacts: Artifacts
    index: faiss.Index
    index_manifest: dict[str, Any]
    index_version: str
    # The folded item vectors, for the exact fallback when an approximate index returns too few items.
    vectors: np.ndarray
    # The answer for a user the service knows nothing of, ranked once at load: what an overloaded
    # service hands out instead of queueing (cold-start quality, no model or search cost).
    cold_answer: Recommendation | None = None

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
        # Also the warm-up: first-call costs (TorchScript profiling, FAISS allocations) are paid here.
        cold = compute(bundle, UserRecord.unknown(0), int(time.time()), COLD_ANSWER_SIZE, set())
    except Exception as error:  # a tower that loads but cannot run is as broken as a missing file
        raise ArtifactError(f"{artifacts.directory}: warm-up request failed: {error}") from error
    return dataclasses.replace(bundle, cold_answer=cold)


def shed_answer(bundle: ServingBundle, k: int, exclude: set[int]) -> Recommendation:
    """The precomputed cold-start answer, minus exclusions: at most k items, possibly fewer."""
    cold = bundle.cold_answer
    assert cold is not None, "load_bundle always sets it"
    kept = [(i, s) for i, s in zip(cold.item_ids, cold.scores, strict=True) if i not in exclude][:k]
    return dataclasses.replace(
        cold,
        item_ids=[i for i, _ in kept],
        scores=[s for _, s in kept],
        model_seconds=0.0,
        search_seconds=0.0,
    )


def embed_user(
    bundle: ServingBundle, record: UserRecord, now: int
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(FAISS query (1, d + 1), user bias b_u (1,), gate weights (1, 2)) of one user at time ``now``."""
    encoder = bundle.artifacts.encoder
    encoded = encoder.encode_users(records_to_raw_users([record], now, encoder.config.max_history))
    embedding, user_bias, gate = bundle.artifacts.embed_users(encoded)
    return query_vectors(embedding.numpy()), user_bias, gate


def compute(bundle: ServingBundle, record: UserRecord, now: int, k: int, exclude: set[int]) -> Recommendation:
    """Top-k items for one user: encode → user tower → FAISS → drop excluded items → add b_u."""
    started = time.perf_counter()
    queries, user_bias, gate = embed_user(bundle, record, now)
    model_done = time.perf_counter()
    # Over-fetching by the number of exclusions guarantees k survivors whenever the catalog has them.
    fetch = min(k + len(exclude), bundle.n_items)
    scores, ids = search(bundle.index, queries, fetch)
    keep = survivors(ids[0], scores[0], exclude, k)
    if len(keep) < k and (ids[0] < 0).any():
        # An approximate index (IVF probing few lists, HNSW's reachable graph) ran short of the
        # catalog; exact search over the same folded vectors always has every item.
        scores, ids = exact_search(bundle.vectors, bundle.artifacts.items.item_ids, queries, fetch)
        keep = survivors(ids[0], scores[0], exclude, k)
    search_done = time.perf_counter()
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
    # tolist() first: Python ints and floats in one C call, instead of a numpy scalar per element.
    kept = [(i, s) for i, s in zip(ids.tolist(), scores.tolist(), strict=True) if i >= 0 and i not in exclude]
    return kept[:k]


class NotLoadedError(RuntimeError):
    """No model is being served: the artifacts at start-up were missing or refused."""


class OverloadedError(RuntimeError):
    """More requests wait for the model than the service admits; the caller should shed this one."""


class Recommender:
    """Serves the current bundle; ``reload`` replaces it atomically.

    It may start without a bundle (the artifacts were refused at start-up): it then answers nothing,
    says why, and the first successful ``reload`` makes it ready. ``history_cap`` is the number of
    actions the feature store keeps per user, fixed for the life of the process.
    """

    def __init__(
        self,
        bundle: ServingBundle | None,
        history_cap: int,
        load_error: str | None = None,
        max_queue_ms: float = 25.0,
    ) -> None:
        self._bundle = bundle
        self.history_cap = history_cap
        self.max_queue_s = max_queue_ms / 1000
        self.pending = 0
        # Moving average of one computation's seconds, to turn the queue length into a wait.
        self.service_seconds = 0.001
        self.load_error = load_error if bundle is None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coldwarm-model")
        self._reload_lock = asyncio.Lock()

    @property
    def bundle(self) -> ServingBundle | None:
        return self._bundle

    @property
    def expected_wait_s(self) -> float:
        """How long a request admitted now would wait for the model thread."""
        return self.pending * self.service_seconds

    async def recommend(self, record: UserRecord, now: int, k: int, exclude: set[int]) -> Recommendation:
        bundle = self._bundle  # one snapshot per request: the model and the index it was built for
        if bundle is None:
            raise NotLoadedError(f"no model loaded: {self.load_error}")
        if self.expected_wait_s > self.max_queue_s:
            # Shedding on the expected wait, not on a queue length: a standing queue of any length
            # would make every admitted answer late by that much, for as long as the overload lasts.
            raise OverloadedError(
                f"{self.pending} requests already wait for the model (~{self.expected_wait_s * 1e3:.1f} ms)"
            )
        # Counted on the event loop only, so no lock: incremented here, decremented when the answer is in.
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, compute, bundle, record, now, k, exclude)
        finally:
            self.pending -= 1
        seconds = result.model_seconds + result.search_seconds
        self.service_seconds += 0.1 * (seconds - self.service_seconds)
        return result

    def shed(self, k: int, exclude: set[int]) -> Recommendation:
        """The cold-start answer without touching the model: for requests an overload turned away."""
        bundle = self._bundle
        if bundle is None:
            raise NotLoadedError(f"no model loaded: {self.load_error}")
        return shed_answer(bundle, k, exclude)

    async def reload(self, artifacts_dir: Path, index_settings: IndexSettings) -> ServingBundle:
        """Loads and warms a new bundle off the serving thread, then swaps; on error the old one stays."""
        async with self._reload_lock:
            bundle = await asyncio.to_thread(load_bundle, artifacts_dir, index_settings)
            cap = bundle.artifacts.encoder.config.max_history
            if cap != self.history_cap:
                # The feature store keeps history_cap actions per user, fixed when the service started.
                raise ArtifactError(
                    f"{bundle.artifacts.directory}: max_history {cap} differs from the served "
                    f"{self.history_cap}; restart the service to change it"
                )
            self._bundle, self.load_error = bundle, None
            log.info("now serving model %s with index %s", bundle.model_version, bundle.index_version)
            del bundle
            # The old bundle is freed once in-flight requests finish; hand its pages back to the OS so
            # that repeated reloads do not ratchet the resident size up.
            await asyncio.to_thread(release_memory)
            return self._bundle

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def release_memory() -> None:
    """Frees what a swapped-out bundle left, then freezes what is loaded now.

    Frozen objects (the model, the index wrappers, the imported modules) are skipped by the cyclic
    garbage collector, so its full collections stay short: they otherwise walk every object of a
    loaded model and show as multi-millisecond pauses in the p99. Unfreezing first lets a collection
    reach the old bundle's cycles.
    """
    gc.unfreeze()
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    gc.freeze()


def _load_libc() -> ctypes.CDLL | None:
    try:  # glibc only: malloc_trim does not exist on musl or macOS, where nothing is needed
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def resolve_reload_dir(configured: Path, requested: str | None) -> Path:
    """What a reload loads: the configured directory again, or a version (name or path) inside its root.

    Anything that resolves outside the root (``..``, an absolute path elsewhere, a symlink out) is
    refused: a reload request must not make the service deserialise files from arbitrary places.
    """
    if not requested:
        return Path(configured)
    root = artifacts_root(configured).resolve()
    candidate = Path(requested)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"artifacts_dir must lie inside the artifacts root {root}, got {requested!r}")
    return resolved


def configure_threads(torch_threads: int, faiss_threads: int) -> None:
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)
