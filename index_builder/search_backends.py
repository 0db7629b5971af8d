"""Which engine runs the top-k search over the bias-folded item vectors, and on which device.

Every backend keeps the contract of ``faiss_index.search``: (scores float32 (B, k), item ids int64
(B, k)), best first, empty slots id -1 and score -inf when k exceeds the catalog.

- faiss-cpu: the built index (flat, IVF or HNSW) as loaded. The default on a CPU.
- faiss-gpu: the same index copied to GPU 0 (flat and IVF only: FAISS has no GPU HNSW). Needs a FAISS
  build with GPU support, which CUDA 13 hosts do not have.
- torch-cpu / torch-cuda: exact search with a matmul and ``torch.topk`` over one tensor of the folded
  vectors. On a GPU it is exact and still fast at a million items, and needs nothing but torch.

Concurrency: a GPU FAISS index is not safe for concurrent searches (its scratch memory and stream are
shared by all callers), and neither is a CUDA stream that several threads queue work on unordered.
The service calls ``search`` from its one model thread only; any other caller must serialise too.

Precision: on a GPU, torch runs float32 matmuls in TF32 when ``torch.set_float32_matmul_precision``
is not "highest"; that perturbs scores by ~1e-3 relative and reorders near-ties. The default is
"highest"; a warning is logged when a torch-cuda backend is built under another setting.

faiss is imported lazily, only by the functions that need it: GPU images without faiss can run the
torch backends (``bench/gpu_check.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Set
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch

from index_builder.vectors import EMPTY_ID, checked_catalog
from model.catalog import catalog_indices

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

BackendName = Literal["faiss-cpu", "faiss-gpu", "torch-cpu", "torch-cuda"]

# Scores held at once by a torch search: 2**26 floats = 256 MiB, e.g. 64 queries × 1M items.
DEFAULT_MAX_SCORES = 2**26
GPU_ID = 0  # one GPU per serving process: CUDA_VISIBLE_DEVICES selects which


def resolve_device(requested: str) -> torch.device:
    """The torch device for a COLDWARM_DEVICE value: "auto" (CUDA when available), "cpu" or "cuda"."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "COLDWARM_DEVICE=cuda, but this torch build sees no CUDA device "
                f"(torch {torch.__version__}); set COLDWARM_DEVICE=cpu or auto"
            )
        return torch.device("cuda")
    raise ValueError(f"COLDWARM_DEVICE must be auto, cpu or cuda, got {requested!r}")


class SearchBackend(Protocol):
    name: BackendName
    n_items: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (B, k), item ids int64 (B, k)), best first; empty slots -1 / -inf."""
        ...


def _tensor(array: np.ndarray) -> torch.Tensor:
    # torch.from_numpy shares memory and warns on a read-only array (a memory map, np.load's mmap mode).
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _matmul_is_reduced_precision() -> bool:
    # Two switches lead to TF32: the global precision and, since torch 2.9, the per-backend one.
    per_backend = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    return torch.get_float32_matmul_precision() != "highest" or per_backend == "tf32"


class TorchExactSearch:
    """Exact inner-product top-k over one (n, d) tensor of folded vectors on ``device``.

    On the CPU the tensor shares memory with ``vectors`` when they are already contiguous float32
    (no second copy of a large catalog): do not modify them afterwards.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        item_ids: np.ndarray,
        device: torch.device,
        max_scores: int = DEFAULT_MAX_SCORES,
    ) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"torch search runs on cpu or cuda, not {device}")
        if max_scores < 1:
            raise ValueError(f"max_scores must be >= 1, got {max_scores}")
        vectors, item_ids = checked_catalog(vectors, item_ids)
        self.name: BackendName = "torch-cuda" if device.type == "cuda" else "torch-cpu"
        self.device = device
        self.n_items, self.dim = vectors.shape
        self.max_scores = max_scores
        self._vectors = _tensor(vectors).to(device)
        self._item_ids = _tensor(item_ids).to(device)
        # Item id -> row position by bisection: a dict over a million ids would cost ~100 MB.
        self._id_order = np.argsort(item_ids, kind="stable")
        self._sorted_ids = item_ids[self._id_order]
        if device.type == "cuda" and _matmul_is_reduced_precision():
            logger.warning("float32 matmul precision is not 'highest': %s scores run in TF32", self.name)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search_arrays(queries, k, None)

    def search_excluding(
        self, queries: np.ndarray, k: int, exclude: Sequence[Set[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(exclude) != len(queries):
            raise ValueError(f"need one exclusion set per query ({len(queries)}), got {len(exclude)}")
        return self._search_arrays(queries, k, self.excluded_positions(exclude))

    def _search_arrays(
        self, queries: np.ndarray, k: int, excluded: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self.search_tensor(_tensor(queries), k, excluded)
        return scores.cpu().numpy(), ids.cpu().numpy()

    def excluded_positions(self, exclude: Sequence[Set[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(query rows, catalog positions) of the excluded items the catalog holds, on this device."""
        sizes = np.fromiter((len(items) for items in exclude), dtype=np.int64, count=len(exclude))
        wanted = np.fromiter(
            (item for items in exclude for item in items), dtype=np.int64, count=int(sizes.sum())
        )
        rows = np.repeat(np.arange(len(exclude), dtype=np.int64), sizes)
        at = catalog_indices(self._sorted_ids, wanted)
        held = at >= 0
        positions = self._id_order[at[held]]
        return torch.from_numpy(rows[held]).to(self.device), torch.from_numpy(positions).to(self.device)

    def search_tensor(
        self, queries: torch.Tensor, k: int, excluded: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``search`` for queries already in a tensor (a GPU tower's output need not visit the host):
        float32 scores and int64 item ids (B, k) on this backend's device. ``excluded`` (query rows,
        catalog positions), from ``excluded_positions``, leaves those items out of those rows."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"need queries (B, {self.dim}), got {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = queries.to(self.device, torch.float32)
        found = min(k, self.n_items)
        with torch.no_grad():  # a tower's output may still require grad: build no graph
            if len(queries) == 0:
                scores = queries.new_empty((0, found))
                positions = torch.empty((0, found), dtype=torch.int64, device=self.device)
            else:
                scores, positions = self._top_positions(queries, found, excluded)
            ids = self._item_ids[positions]
            if excluded is not None:
                # Left-out items rank last, at -inf: where fewer than k remain they fill the tail.
                ids = ids.masked_fill(scores == -torch.inf, EMPTY_ID)
            if k > found:
                scores = torch.nn.functional.pad(scores, (0, k - found), value=-torch.inf)
                ids = torch.nn.functional.pad(ids, (0, k - found), value=EMPTY_ID)
        return scores, ids

    def _top_positions(
        self, queries: torch.Tensor, k: int, excluded: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k row positions, in blocks of at most ``max_scores`` scores: rows of queries against the
        whole catalog, or, when one row alone is over budget, one query against item blocks in turn."""
        block = min(self.n_items, self.max_scores)
        rows = self.max_scores // block
        parts = [
            self._top_in_blocks(
                queries[start : start + rows],
                k,
                block,
                excluded if rows >= len(queries) else _rows_within(excluded, start, rows),
            )
            for start in range(0, len(queries), rows)
        ]
        return torch.cat([s for s, _ in parts]), torch.cat([p for _, p in parts])

    def _top_in_blocks(
        self,
        queries: torch.Tensor,
        k: int,
        block: int,
        excluded: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        for start in range(0, self.n_items, block):
            block_scores = queries @ self._vectors[start : start + block].T
            if excluded is not None:
                _leave_out(block_scores, excluded, start, whole=block == self.n_items)
            scores, positions = torch.topk(block_scores, min(k, block_scores.shape[1]), dim=1)
            top = (scores, positions + start)
            best = top if best is None else _merge_top(best, top, k)
        assert best is not None  # the catalog is never empty
        return best


def _leave_out(
    scores: torch.Tensor, excluded: tuple[torch.Tensor, torch.Tensor], start: int, whole: bool
) -> None:
    """Scores the excluded (row, position) pairs -inf in a block of the catalog's positions from
    ``start``; ``whole``: the block is the whole catalog (no pair to leave aside, and boolean
    indexing costs more than the rest of a one-query search)."""
    rows, positions = excluded
    if not whole:
        inside = (positions >= start) & (positions < start + scores.shape[1])
        rows, positions = rows[inside], positions[inside] - start
    scores.index_put_((rows, positions), torch.tensor(-torch.inf, device=scores.device))


def _rows_within(
    excluded: tuple[torch.Tensor, torch.Tensor] | None, start: int, count: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exclusions of query rows [start, start + count), renumbered from 0."""
    if excluded is None:
        return None
    rows, positions = excluded
    inside = (rows >= start) & (rows < start + count)
    return rows[inside] - start, positions[inside]


def _merge_top(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k (scores, positions) of two top lists of the same queries."""
    scores = torch.cat([first[0], second[0]], dim=1)
    positions = torch.cat([first[1], second[1]], dim=1)
    scores, order = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return scores, torch.gather(positions, 1, order)


class FaissSearch:
    """A loaded FAISS index (``faiss_index.search``), on the CPU or, via ``on_gpu``, on GPU 0."""

    def __init__(self, index: faiss.Index, name: BackendName = "faiss-cpu") -> None:
        self.index = index
        self.name: BackendName = name
        self.n_items = int(index.ntotal)
        self._gpu_resources: object | None = None

    @classmethod
    def on_gpu(cls, index: faiss.Index) -> FaissSearch:
        """A GPU copy of a CPU index (flat or IVF). Not safe for concurrent searches (module docstring)."""
        import faiss

        if not _faiss_has_gpu():
            raise ValueError("this FAISS build has no GPU support or sees no GPU")
        # index_cpu_to_gpu would silently return a CPU copy of an HNSW graph: say so instead.
        if _is_hnsw(index):
            raise ValueError("FAISS has no GPU HNSW: use a flat or IVF index, or the torch backend")
        resources = faiss.StandardGpuResources()
        backend = cls(faiss.index_cpu_to_gpu(resources, GPU_ID, index), "faiss-gpu")
        backend._gpu_resources = resources  # must outlive the GPU index, which does not own it
        return backend

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from index_builder import faiss_index

        return faiss_index.search(self.index, queries, k)


def _faiss_has_gpu() -> bool:
    from index_builder import faiss_index

    return faiss_index.gpu_available()


def _is_hnsw(index: faiss.Index) -> bool:
    import faiss

    from index_builder import faiss_index

    return isinstance(faiss_index._unwrap(index), faiss.IndexHNSW)


def choose_backend(
    index: faiss.Index,
    vectors: np.ndarray,
    item_ids: np.ndarray,
    backend: str,
    device: torch.device,
) -> SearchBackend:
    """The search backend for a ``search_backend`` setting on a resolved device.

    auto: on CUDA, FAISS on the GPU when it can hold this index, else exact torch on the GPU; on the
    CPU, the FAISS index as built (an IVF or HNSW index was chosen for its speed at this size).
    faiss: the index on ``device``; torch: exact torch search on ``device``.
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"search backend must be auto, faiss or torch, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "faiss" and on_cuda and not _faiss_has_gpu():
        raise ValueError(
            "search backend faiss on cuda needs a FAISS build with GPU support (CUDA 13 has none); "
            "set COLDWARM_INDEX_SEARCH_BACKEND=torch or auto, or COLDWARM_DEVICE=cpu"
        )
    if backend == "auto" and on_cuda:
        backend = "faiss" if _faiss_has_gpu() and not _is_hnsw(index) else "torch"
    chosen: SearchBackend
    if backend == "torch":
        chosen = TorchExactSearch(vectors, item_ids, device)
    elif on_cuda:
        chosen = FaissSearch.on_gpu(index)
    else:
        chosen = FaissSearch(index)
    logger.info("search backend %s over %d items on %s", chosen.name, chosen.n_items, device)
    return chosen
