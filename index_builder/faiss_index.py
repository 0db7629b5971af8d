"""The FAISS calls in one place: build, tune, persist and search the item index.

Every index is an ``IndexIDMap2`` around an inner inner-product index (flat, IVF-flat or HNSW-flat),
so searches return item ids, never row positions, and ``reconstruct(item_id)`` works for debugging.
Vectors are bias-folded (see ``index_builder.vectors``): the inner product is the model's score less b_u.

GPU: only IVF is built on the GPU (k-means training and list assignment are what a GPU speeds up; a
flat index has nothing to build and HNSW has no GPU implementation). The GPU index is copied back to
the CPU before it is returned, so what is written is always a CPU index, readable by faiss-cpu.

Concurrency: searching a CPU index is a const operation, safe from several threads at once. A GPU
index is not: its scratch memory and stream are shared by all callers, so concurrent searches on one
GPU index corrupt each other's results. A service that moves an index to the GPU must serialise its
searches (one lock around ``search``, or one worker that batches requests); this module keeps no lock.

Threads: FAISS parallelises one search call with OpenMP. For one query at a time on a busy machine that
only costs: on 2 shared cores, single-query latency went from ~0.6 ms (flat, 100k items, 1 thread) to
12-36 ms (2 threads, waiting on descheduled OpenMP workers). A per-request server should call
``faiss.omp_set_num_threads(1)`` and get its parallelism from concurrent requests.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from index_builder.settings import IndexSettings
from index_builder.vectors import EMPTY_ID, checked_catalog

logger = logging.getLogger(__name__)

# Vectors added per faiss call: small enough for a progress bar to move, large enough not to slow the add.
ADD_CHUNK = 20_000
# FAISS warns below 39 training points per IVF list: the k-means centroids get unreliable.
MIN_POINTS_PER_LIST = 39


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and a GPU is visible; never raises on a CPU build."""
    try:
        return "GPU" in faiss.get_compile_options() and faiss.get_num_gpus() > 0
    except Exception:  # an old or CPU-only build may lack either function
        return False


def builds_on_gpu(settings: IndexSettings) -> bool:
    return settings.type == "ivf" and settings.use_gpu and gpu_available()


def default_nlist(n: int) -> int:
    """About 4·sqrt(n) lists, capped so that each list still gets enough training points."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def resolve_nlist(n: int, requested: int | None) -> int:
    if requested is None:
        return default_nlist(n)
    # k-means cannot make more centroids than it has points.
    nlist = max(1, min(requested, n))
    if nlist != requested:
        logger.warning("nlist %d reduced to %d: only %d vectors to train on", requested, nlist, n)
    return nlist


def index_params(settings: IndexSettings, n: int) -> dict[str, int]:
    """The parameters that define an index of this type over n vectors (recorded in its manifest)."""
    if settings.type == "ivf":
        return {"nlist": resolve_nlist(n, settings.nlist), "nprobe": settings.nprobe}
    if settings.type == "hnsw":
        return {
            "m": settings.hnsw_m,
            "ef_construction": settings.ef_construction,
            "ef_search": settings.ef_search,
        }
    return {}


def _inner_index(settings: IndexSettings, d: int, n: int) -> faiss.Index:
    if settings.type == "flat":
        return faiss.IndexFlatIP(d)
    if settings.type == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, resolve_nlist(n, settings.nlist), faiss.METRIC_INNER_PRODUCT)
        return index
    if settings.type == "hnsw":
        index = faiss.IndexHNSWFlat(d, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        return index
    raise ValueError(f"unknown index type {settings.type!r}")


def _train_and_add(index: faiss.Index, vectors: np.ndarray, item_ids: np.ndarray, progress: bool) -> None:
    if not index.is_trained:
        index.train(vectors)
    bar = tqdm(total=len(vectors), desc="index add", unit="vec", disable=not progress, leave=False)
    with bar:
        for start in range(0, len(vectors), ADD_CHUNK):
            stop = min(start + ADD_CHUNK, len(vectors))
            index.add_with_ids(vectors[start:stop], item_ids[start:stop])
            bar.update(stop - start)


def build_index(
    vectors: np.ndarray, item_ids: np.ndarray, settings: IndexSettings, progress: bool = False
) -> faiss.Index:
    """A CPU ``IndexIDMap2`` over the vectors, keyed by item id, search parameters applied."""
    vectors, item_ids = checked_catalog(vectors, item_ids)
    n, d = vectors.shape
    index = faiss.IndexIDMap2(_inner_index(settings, d, n))
    if builds_on_gpu(settings):
        # The resources object must outlive every use of the GPU index, so it stays in this scope.
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        _train_and_add(gpu_index, vectors, item_ids, progress)
        index = faiss.index_gpu_to_cpu(gpu_index)
        del gpu_index, resources
    else:
        _train_and_add(index, vectors, item_ids, progress)
    apply_search_params(index, settings)
    return index


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The inner index of an id map (FAISS returns it as a bare ``Index`` that needs downcasting).

    The result is owned by ``index``: using it after ``index`` is garbage-collected is a segfault.
    """
    if isinstance(index, faiss.IndexIDMap):  # IndexIDMap2 included
        return faiss.downcast_index(index.index)
    return index


def apply_search_params(index: faiss.Index, settings: IndexSettings) -> None:
    """Sets nprobe / efSearch on the inner index.

    The file keeps the values it was built with; the serving settings may differ (search breadth is
    tuned without rebuilding), so ``read_index`` applies them again.
    """
    inner = _unwrap(index)
    if hasattr(inner, "nprobe"):
        inner.nprobe = settings.nprobe
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = settings.ef_search


def write_index(index: faiss.Index, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))


def read_index(path: Path, settings: IndexSettings) -> faiss.Index:
    """The index at ``path``, memory-mapped when ``settings.mmap`` (read-only: never add to it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index file")
    # IO_FLAG_MMAP_IFC maps the codes of flat (IndexFlatCodes) and HNSW indexes and the inverted lists
    # of IVF ones: several processes serving one file share its pages instead of each holding a copy.
    flags = faiss.IO_FLAG_MMAP_IFC if settings.mmap else 0
    index = faiss.read_index(str(path), flags)
    apply_search_params(index, settings)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 (B, k), item ids int64 (B, k)), best first; empty slots have id -1 and score -inf.

    Slots are empty when k exceeds the catalog (or, for HNSW, the part of the graph a search reaches).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"need queries (B, {index.d}), got {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores, ids = index.search(queries, k)
    scores[ids == EMPTY_ID] = -np.inf
    return scores, ids.astype(np.int64, copy=False)


def exact_search(
    vectors: np.ndarray, item_ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force ground truth: the same contract as ``search``, over the raw vectors."""
    vectors, item_ids = checked_catalog(vectors, item_ids)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    # knn searches the array in place: no index, no copy of a catalog that may be large.
    scores, positions = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
    if k > len(vectors):
        pad = k - len(vectors)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=EMPTY_ID)
    scores = np.where(positions == EMPTY_ID, -np.inf, scores).astype(np.float32)
    ids = np.where(positions == EMPTY_ID, EMPTY_ID, item_ids[np.maximum(positions, 0)])
    return scores, ids.astype(np.int64)
