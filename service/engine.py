"""The model and index being served, and the computation of one answer.

A ``ServingBundle`` is the TorchScript user tower, the encoder and the FAISS index of one model
version, loaded and checked together. The ``Recommender`` holds exactly one bundle and swaps it whole,
so a request sees one model and its index, never a mix. Model and search run on one dedicated
thread: off the event loop, and serialised, which GPU FAISS requires and CPU FAISS does not mind.
Requests reach that thread through a ``MicroBatcher`` (``service/batching.py``): whatever waits when the
thread frees up is computed as one batch by ``compute_batch``.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from index_builder.build import load_index
from index_builder.search_backends import SearchBackend, TorchExactSearch, choose_backend, resolve_device
from index_builder.settings import IndexSettings
from index_builder.vectors import fold_bias, query_vectors
from model.artifacts import ArtifactError, Artifacts, artifacts_root, load_artifacts
from service.batching import BatchStats, MicroBatcher
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
    # What runs the top-k search: this index with FAISS (CPU or GPU), or exact torch search on the
    # tower's device (index_builder/search_backends.py).
    searcher: SearchBackend
    # Exact search over ``vectors`` on the CPU, for rows an approximate index leaves short: its catalog
    # is checked once, here, not on every call (np.unique and isfinite over n × (d + 1) values).
    exact: TorchExactSearch
    # The answer for a user the service knows nothing of, ranked once at load: what an overloaded
    # service hands out instead of queueing (cold-start quality, no model or search cost).
    cold_answer: Recommendation | None = None
    # Batches of at least this many queries go to ``exact`` with their exclusions masked (a flat index on
    # the CPU only: the same ranking as the index's); None: the searcher takes every batch.
    exact_batch_from: int | None = None

    def masked_searcher(self, batch: int) -> TorchExactSearch | None:
        """What leaves a batch's exclusions out inside its search, or None (over-fetch and filter)."""
        if isinstance(self.searcher, TorchExactSearch):
            return self.searcher
        if self.exact_batch_from is not None and batch >= self.exact_batch_from:
            return self.exact
        return None

    @property
    def model_version(self) -> str:
        return self.artifacts.version

    @property
    def n_items(self) -> int:
        return int(self.index.ntotal)

    @property
    def device(self) -> str:
        """Where the tower runs: "cpu" or "cuda"."""
        return self.artifacts.device.type

    @property
    def tower_format(self) -> str:
        """What runs the tower: "aoti" (the compiled package) or "torchscript"."""
        return self.artifacts.tower_format


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
    # Requests computed in the same model call (1: alone); the seconds above are that call's.
    batch_size: int = 1
    # Seconds the request waited for the model thread before its batch started.
    queue_seconds: float = 0.0


def load_bundle(
    artifacts_dir: Path, index_settings: IndexSettings, device: str = "auto", tower_format: str = "auto"
) -> ServingBundle:
    """Loads artifacts and their index, checks they belong together, and runs one request through them.

    ``device`` (COLDWARM_DEVICE: auto, cpu or cuda) is where the tower runs; the search runs where
    ``index_settings.search_backend`` and the device say (``choose_backend``). ``tower_format``
    (COLDWARM_TOWER_FORMAT) chooses between the compiled tower and TorchScript (``load_artifacts``)."""
    torch_device = resolve_device(device)
    artifacts = load_artifacts(Path(artifacts_dir), map_location=torch_device, tower_format=tower_format)
    index, manifest = load_index(artifacts.directory, index_settings, artifacts.version)
    vectors = fold_bias(artifacts.items.embeddings, artifacts.items.bias, artifacts.scale)
    searcher = choose_backend(
        index, vectors, artifacts.items.item_ids, index_settings.search_backend, torch_device
    )
    version = str(manifest.get("index_version", ""))
    # The torch backend on the CPU is that exact search already: its catalog is not checked twice.
    exact = (
        searcher
        if searcher.name == "torch-cpu"
        else TorchExactSearch(vectors, artifacts.items.item_ids, torch.device("cpu"))
    )
    exact_from = exact_batch_from(manifest, searcher, index_settings)
    bundle = ServingBundle(
        artifacts, index, manifest, version, vectors, searcher, exact=exact, exact_batch_from=exact_from
    )
    try:
        # Also the warm-up: first-call costs (TorchScript profiling, FAISS allocations) are paid here.
        cold = compute(bundle, UserRecord.unknown(0), int(time.time()), COLD_ANSWER_SIZE, set())
    except Exception as error:  # a tower that loads but cannot run is as broken as a missing file
        raise ArtifactError(f"{artifacts.directory}: warm-up request failed: {error}") from error
    return dataclasses.replace(bundle, cold_answer=cold)


def exact_batch_from(
    manifest: dict[str, Any], searcher: SearchBackend, index_settings: IndexSettings
) -> int | None:
    """The batch size from which the torch search takes over from FAISS: only a flat index on the CPU,
    which is exact like it, may hand batches over (an approximate index would change the answers)."""
    flat_on_cpu = manifest.get("type") == "flat" and searcher.name == "faiss-cpu"
    return index_settings.exact_batch_from if flat_on_cpu and index_settings.exact_batch_from else None


def shed_answer(bundle: ServingBundle, k: int, exclude: Set[int]) -> Recommendation:
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
        batch_size=0,
        queue_seconds=0.0,
    )


@dataclass(frozen=True)
class RecommendQuery:
    """One user's ask: the record read from the store, the moment it is for, k and the items to drop."""

    record: UserRecord
    now: int
    k: int
    exclude: Set[int] = frozenset()


def embed_users(
    bundle: ServingBundle, records: Sequence[UserRecord], nows: Sequence[int]
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(FAISS queries (B, d + 1), user biases b_u (B,), gate weights (B, 2)) of users, each at its time."""
    encoder = bundle.artifacts.encoder
    encoded = encoder.encode_users(records_to_raw_users(records, nows, encoder.config.max_history))
    embedding, user_bias, gate = bundle.artifacts.embed_users(encoded)
    return query_vectors(embedding.cpu().numpy()), user_bias, gate


def embed_user(
    bundle: ServingBundle, record: UserRecord, now: int
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(FAISS query (1, d + 1), user bias b_u (1,), gate weights (1, 2)) of one user at time ``now``."""
    return embed_users(bundle, [record], [now])


def compute_batch(bundle: ServingBundle, queries: Sequence[RecommendQuery]) -> list[Recommendation]:
    """Top-k items for each query: one encode, one tower call and one search for the whole batch, then
    each query's exclusions, k and b_u. Answers equal those of each query computed alone."""
    started = time.perf_counter()
    vectors, user_bias, gate = embed_users(bundle, [q.record for q in queries], [q.now for q in queries])
    model_done = time.perf_counter()
    masked = bundle.masked_searcher(len(queries))
    if masked is not None:
        kept = top_items_excluding(masked, vectors, queries)
    else:
        kept = top_items_filtered(bundle, vectors, queries)
    search_done = time.perf_counter()
    biases, gates = user_bias.tolist(), gate.tolist()
    return [
        Recommendation(
            item_ids=item_ids,
            scores=[s + biases[row] for s in scores],
            gate_cold=gates[row][0],
            gate_warm=gates[row][1],
            model_seconds=model_done - started,
            search_seconds=search_done - model_done,
            model_version=bundle.model_version,
            index_version=bundle.index_version,
            batch_size=len(queries),
        )
        for row, (item_ids, scores) in enumerate(kept)
    ]


Ranked = tuple[list[int], list[float]]  # one answer's item ids and their scores before b_u, best first


def top_items_excluding(
    searcher: TorchExactSearch, vectors: np.ndarray, queries: Sequence[RecommendQuery]
) -> list[Ranked]:
    """Each query's top k with its exclusions left out inside the search: one exact search at the
    batch's largest k, nothing fetched to be thrown away."""
    k = max(q.k for q in queries)
    scores, ids = searcher.search_excluding(vectors, k, [q.exclude for q in queries])
    # Left-out items and the slots past the catalog's end sit at the tail of each row, as id -1.
    found = (ids >= 0).sum(axis=1).tolist()
    id_rows, score_rows = ids.tolist(), scores.tolist()
    return [
        (id_rows[row][: min(q.k, found[row])], score_rows[row][: min(q.k, found[row])])
        for row, q in enumerate(queries)
    ]


def top_items_filtered(
    bundle: ServingBundle, vectors: np.ndarray, queries: Sequence[RecommendQuery]
) -> list[Ranked]:
    """Each query's top k from an index that cannot leave items out: fetch k plus the exclusions, drop
    the excluded ones after."""
    # Over-fetching by the exclusions guarantees k survivors whenever the catalog has them. The batch
    # fetches what most of its queries need; a query with far more exclusions than its batchmates (one
    # with thousands would make every row fetch thousands) is searched again alone if it runs short.
    needs = [min(q.k + len(q.exclude), bundle.n_items) for q in queries]
    fetch = sorted(needs)[(len(needs) - 1) * 3 // 4]
    scores, ids = bundle.searcher.search(vectors, fetch)
    kept = [survivors(ids[row], scores[row], q.exclude, q.k) for row, q in enumerate(queries)]
    ran_short = (ids < 0).any(axis=1).tolist()
    for row, query in enumerate(queries):
        if len(kept[row]) < query.k and needs[row] > fetch:
            alone_scores, alone_ids = bundle.searcher.search(vectors[row : row + 1], needs[row])
            kept[row] = survivors(alone_ids[0], alone_scores[0], query.exclude, query.k)
            ran_short[row] = bool((alone_ids[0] < 0).any())
    short = [row for row, q in enumerate(queries) if len(kept[row]) < q.k and ran_short[row]]
    if short:
        # An approximate index (IVF probing few lists, HNSW's reachable graph) ran short of the
        # catalog for these rows; exact search over the same folded vectors always has every item.
        exact_scores, exact_ids = bundle.exact.search(vectors[short], max(needs[row] for row in short))
        for at, row in enumerate(short):
            kept[row] = survivors(exact_ids[at], exact_scores[at], queries[row].exclude, queries[row].k)
    return [([i for i, _ in keep], [s for _, s in keep]) for keep in kept]


def compute(bundle: ServingBundle, record: UserRecord, now: int, k: int, exclude: Set[int]) -> Recommendation:
    """Top-k items for one user: encode → user tower → FAISS → drop excluded items → add b_u."""
    return compute_batch(bundle, [RecommendQuery(record, now, k, exclude)])[0]


def survivors(ids: np.ndarray, scores: np.ndarray, exclude: Set[int], k: int) -> list[tuple[int, float]]:
    # tolist() first: Python ints and floats in one C call, instead of a numpy scalar per element.
    kept = [(i, s) for i, s in zip(ids.tolist(), scores.tolist(), strict=True) if i >= 0 and i not in exclude]
    return kept[:k]


class NotLoadedError(RuntimeError):
    """No model is being served: the artifacts at start-up were missing or refused."""


class OverloadedError(RuntimeError):
    """More requests wait for the model than the service admits; the caller should shed this one."""


class Recommender:
    """Serves the current bundle through a ``MicroBatcher``; ``reload`` replaces the bundle atomically.

    It may start without a bundle (the artifacts were refused at start-up): it then answers nothing,
    says why, and the first successful ``reload`` makes it ready. ``history_cap`` is the number of
    actions the feature store keeps per user, fixed for the life of the process. Each batch is computed
    with the bundle current when it starts: one model and its index per batch, never a mix.
    """

    def __init__(
        self,
        bundle: ServingBundle | None,
        history_cap: int,
        load_error: str | None = None,
        max_queue_ms: float = 25.0,
        max_batch: int = 64,
        batch_wait_us: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        device: str = "auto",
        tower_format: str = "auto",
    ) -> None:
        self._bundle = bundle
        # How reloaded bundles are loaded: as the first one.
        self.device, self.tower_format = device, tower_format
        self.history_cap = history_cap
        self.max_queue_s = max_queue_ms / 1000
        self.load_error = load_error if bundle is None else None
        self.batcher: MicroBatcher[RecommendQuery, Recommendation] = MicroBatcher(
            self._compute_current, max_batch, batch_wait_us / 1e6, on_batch
        )
        self._reload_lock = asyncio.Lock()

    @property
    def bundle(self) -> ServingBundle | None:
        return self._bundle

    @property
    def pending(self) -> int:
        return self.batcher.pending

    @property
    def expected_wait_s(self) -> float:
        """How long a request admitted now would wait for the model thread."""
        return self.batcher.expected_wait_s

    def _compute_current(self, queries: Sequence[RecommendQuery]) -> list[Recommendation]:
        bundle = self._bundle  # one snapshot per batch: the model and the index it was built for
        if bundle is None:
            raise NotLoadedError(f"no model loaded: {self.load_error}")
        return compute_batch(bundle, queries)

    def admit(self, requests: int = 1) -> None:
        """Raises unless a model is loaded and ``requests`` more may queue within the budget."""
        if self._bundle is None:
            raise NotLoadedError(f"no model loaded: {self.load_error}")
        if self.expected_wait_s > self.max_queue_s:
            # Shedding on the expected wait, not on a queue length: a standing queue of any length
            # would make every admitted answer late by that much, for as long as the overload lasts.
            raise OverloadedError(
                f"{self.pending} requests already wait for the model (~{self.expected_wait_s * 1e3:.1f} ms)"
            )

    async def recommend(self, record: UserRecord, now: int, k: int, exclude: Set[int]) -> Recommendation:
        [outcome] = await self.recommend_many([RecommendQuery(record, now, k, exclude)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def recommend_many(self, queries: Sequence[RecommendQuery]) -> list[Recommendation | BaseException]:
        """One outcome per query, in order: its answer, or the error computing it raised (the others'
        answers stand). Admitted or refused as a whole; computed in one model call when the queue is
        empty, else with whatever else waits."""
        self.admit(len(queries))
        answered = await self.batcher.submit(queries)
        return [
            outcome
            if isinstance(outcome, BaseException)
            else dataclasses.replace(outcome, queue_seconds=waited)
            for outcome, waited in answered
        ]

    def shed(self, k: int, exclude: Set[int]) -> Recommendation:
        """The cold-start answer without touching the model: for requests an overload turned away."""
        bundle = self._bundle
        if bundle is None:
            raise NotLoadedError(f"no model loaded: {self.load_error}")
        return shed_answer(bundle, k, exclude)

    async def reload(self, artifacts_dir: Path, index_settings: IndexSettings) -> ServingBundle:
        """Loads and warms a new bundle off the serving thread, then swaps; on error the old one stays."""
        async with self._reload_lock:
            bundle = await asyncio.to_thread(
                load_bundle, artifacts_dir, index_settings, self.device, self.tower_format
            )
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
        self.batcher.close()


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
