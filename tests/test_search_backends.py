"""index_builder.search_backends: exact torch search against FAISS, chunking, validation, device and
backend choice. CPU only; the GPU branches run with CPU stand-ins (bench/gpu_check.py runs the real ones).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from index_builder import faiss_index, search_backends
from index_builder.faiss_index import build_index, exact_search, search
from index_builder.search_backends import (
    DEFAULT_MAX_SCORES,
    FaissSearch,
    TorchExactSearch,
    choose_backend,
    resolve_device,
)
from index_builder.settings import IndexSettings
from index_builder.vectors import fold_bias, query_vectors

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device name only: nothing is put on it without a stand-in
N_ITEMS, DIM = 50, 8
REPO = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def catalog(n: int = N_ITEMS, d: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Folded vectors and shuffled ids far from 0..n-1, so that row positions never pass as ids."""
    rng = np.random.default_rng(seed)
    vectors = fold_bias(unit(rng.standard_normal((n, d))), rng.normal(0.0, 0.5, n), scale=10.0)
    return vectors, rng.permutation(np.arange(n, dtype=np.int64) * 7 + 1_000)


def user_queries(b: int, d: int = DIM, seed: int = 1) -> np.ndarray:
    return query_vectors(unit(np.random.default_rng(seed).standard_normal((b, d))))


@pytest.mark.parametrize("b", [1, 7])
@pytest.mark.parametrize("k", [5, N_ITEMS, N_ITEMS + 3], ids=["k<n", "k==n", "k>n"])
def test_torch_cpu_equals_faiss_exact_and_flat_index(b: int, k: int) -> None:
    vectors, ids = catalog()
    queries = user_queries(b)
    scores, found = TorchExactSearch(vectors, ids, CPU).search(queries, k)
    assert scores.shape == found.shape == (b, k)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    flat = build_index(vectors, ids, IndexSettings(type="flat"))
    for want_scores, want_ids in (exact_search(vectors, ids, queries, k), search(flat, queries, k)):
        np.testing.assert_array_equal(found, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    filled = min(k, N_ITEMS)
    assert (found[:, filled:] == -1).all() and np.isneginf(scores[:, filled:]).all()
    assert np.isfinite(scores[:, :filled]).all()
    assert all(set(row[:filled]) <= set(ids) for row in found)


def test_ids_are_mapped_from_positions_in_score_order() -> None:
    vectors, ids = catalog()
    queries = user_queries(4)
    scores, found = TorchExactSearch(vectors, ids, CPU).search(queries, 10)
    brute = queries @ vectors.T
    order = np.argsort(-brute, axis=1)[:, :10]  # continuous random data: no ties
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize(
    "max_scores",
    [1, 7, N_ITEMS, 2 * N_ITEMS + 1],
    ids=["one-score", "item-blocks", "one-row", "row-chunks"],
)
@pytest.mark.parametrize("k", [3, N_ITEMS + 2])
def test_chunked_search_equals_unchunked(max_scores: int, k: int) -> None:
    vectors, ids = catalog()
    queries = user_queries(7)
    want_scores, want_ids = TorchExactSearch(vectors, ids, CPU).search(queries, k)
    chunked = TorchExactSearch(vectors, ids, CPU, max_scores=max_scores)
    got_scores, got_ids = chunked.search(queries, k)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-6)


def exclusions(ids: np.ndarray, b: int, seed: int = 2) -> list[set[int]]:
    """Per query: none, a few, most of the catalog, all of it, and ids the catalog does not hold."""
    rng = np.random.default_rng(seed)
    shapes = [0, 3, N_ITEMS - 4, N_ITEMS]
    chosen = [set(rng.choice(ids, size=shapes[row % 4], replace=False).tolist()) for row in range(b)]
    chosen[1] |= {-5, 3, 10**12}  # not items: ignored
    return chosen


@pytest.mark.parametrize(
    "max_scores",
    [DEFAULT_MAX_SCORES, 1, 7, 2 * N_ITEMS + 1],
    ids=["whole", "one-score", "item-blocks", "row-chunks"],
)
@pytest.mark.parametrize("k", [5, N_ITEMS + 2])
def test_search_excluding_equals_the_filtered_full_ranking(max_scores: int, k: int) -> None:
    """Each row is the brute-force ranking without that row's items, then empty slots."""
    vectors, ids = catalog()
    queries = user_queries(9)
    exclude = exclusions(ids, len(queries))
    scores, found = TorchExactSearch(vectors, ids, CPU, max_scores=max_scores).search_excluding(
        queries, k, exclude
    )
    assert scores.shape == found.shape == (len(queries), k)
    brute = queries @ vectors.T
    for row, left_out in enumerate(exclude):
        order = [p for p in np.argsort(-brute[row]) if int(ids[p]) not in left_out][:k]
        filled = len(order)
        np.testing.assert_array_equal(found[row, :filled], ids[order])
        np.testing.assert_allclose(scores[row, :filled], brute[row, order], atol=1e-5)
        assert (found[row, filled:] == -1).all() and np.isneginf(scores[row, filled:]).all()


def test_search_excluding_needs_one_set_per_query() -> None:
    vectors, ids = catalog()
    with pytest.raises(ValueError, match="one exclusion set per query"):
        TorchExactSearch(vectors, ids, CPU).search_excluding(user_queries(3), 4, [set(), set()])


def test_no_block_holds_more_scores_than_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors, ids = catalog()
    blocks: list[int] = []
    real_matmul = torch.Tensor.__matmul__

    def recording_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        scores = real_matmul(left, right)
        blocks.append(scores.numel())
        return scores

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording_matmul)
    for budget, most in ((7, 7), (2 * N_ITEMS + 1, 2 * N_ITEMS)):
        blocks.clear()
        TorchExactSearch(vectors, ids, CPU, max_scores=budget).search(user_queries(7), 5)
        assert sum(blocks) == 7 * N_ITEMS and max(blocks) == most


def test_search_tensor_keeps_tensors_and_builds_no_graph() -> None:
    vectors, ids = catalog()
    backend = TorchExactSearch(vectors, ids, CPU)
    queries = torch.from_numpy(user_queries(3)).requires_grad_()
    scores, found = backend.search_tensor(queries, 4)
    assert isinstance(scores, torch.Tensor) and isinstance(found, torch.Tensor)
    assert scores.dtype == torch.float32 and found.dtype == torch.int64 and not scores.requires_grad
    want_scores, want_ids = backend.search(user_queries(3), 4)
    np.testing.assert_array_equal(found.numpy(), want_ids)
    np.testing.assert_array_equal(scores.numpy(), want_scores)


def test_empty_batch_gives_empty_results() -> None:
    vectors, ids = catalog()
    scores, found = TorchExactSearch(vectors, ids, CPU).search(np.zeros((0, DIM + 1), np.float32), 4)
    assert scores.shape == found.shape == (0, 4)


def test_bad_catalogs_are_refused_at_construction() -> None:
    vectors, ids = catalog(n=4)
    for bad in (np.nan, np.inf, -np.inf):
        broken = vectors.copy()
        broken[2, 1] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            TorchExactSearch(broken, ids, CPU)
    for bad_ids in (np.array([1, 2, 2, 3]), np.array([1, 2, -1, 3]), np.array([1, 2, 3])):
        with pytest.raises(ValueError):
            TorchExactSearch(vectors, bad_ids, CPU)
    with pytest.raises(ValueError):
        TorchExactSearch(vectors[:0], ids[:0], CPU)
    with pytest.raises(ValueError):
        TorchExactSearch(vectors, ids, CPU, max_scores=0)


def test_bad_queries_are_refused_like_faiss() -> None:
    vectors, ids = catalog()
    backend = TorchExactSearch(vectors, ids, CPU)
    with pytest.raises(ValueError, match=f"need queries \\(B, {DIM + 1}\\)"):
        backend.search(np.zeros((2, DIM), np.float32), 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        backend.search(user_queries(2), 0)


def test_empty_marker_is_faiss_one() -> None:
    assert search_backends.EMPTY_ID == faiss_index.EMPTY_ID


# ----- devices -----------------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="COLDWARM_DEVICE"):
        resolve_device("gpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="COLDWARM_DEVICE=cuda"):
            resolve_device("cuda")


# ----- backend choice ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexes() -> dict[str, faiss.Index]:
    vectors, ids = catalog()
    return {kind: build_index(vectors, ids, IndexSettings(type=kind, hnsw_m=8)) for kind in ("flat", "hnsw")}


def test_choose_backend_on_cpu(indexes: dict[str, faiss.Index]) -> None:
    vectors, ids = catalog()
    queries = user_queries(7)
    for setting, name in (("auto", "faiss-cpu"), ("faiss", "faiss-cpu"), ("torch", "torch-cpu")):
        backend = choose_backend(indexes["hnsw"], vectors, ids, setting, CPU)
        assert backend.name == name and backend.n_items == N_ITEMS
    auto = choose_backend(indexes["hnsw"], vectors, ids, "auto", CPU)
    assert isinstance(auto, FaissSearch) and auto.index is indexes["hnsw"]  # the index as built
    for got, want in zip(auto.search(queries, 9), search(indexes["hnsw"], queries, 9), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="auto, faiss or torch"):
        choose_backend(indexes["flat"], vectors, ids, "gpu", CPU)


@pytest.mark.skipif(faiss_index.gpu_available(), reason="this FAISS build has a GPU")
def test_faiss_on_cuda_without_faiss_gpu_is_refused(indexes: dict[str, faiss.Index]) -> None:
    vectors, ids = catalog()
    with pytest.raises(ValueError, match="GPU support"):
        choose_backend(indexes["flat"], vectors, ids, "faiss", CUDA)
    with pytest.raises(ValueError, match="GPU support"):
        FaissSearch.on_gpu(indexes["flat"])


class FakeCudaTorch:
    """Stands in for TorchExactSearch on a CUDA device this machine does not have."""

    def __init__(self, vectors: np.ndarray, item_ids: np.ndarray, device: torch.device) -> None:
        self.name = f"torch-{device.type}"
        self.n_items = len(item_ids)


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """FAISS GPU calls replaced by CPU clones; returns the inner index types moved to the "GPU"."""
    moved: list[str] = []

    def to_gpu(resources: object, device: int, index: faiss.Index) -> faiss.Index:
        moved.append(type(faiss.downcast_index(index.index)).__name__)
        return faiss.clone_index(index)

    monkeypatch.setattr(search_backends, "TorchExactSearch", FakeCudaTorch)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    return moved


def test_auto_on_cuda_takes_faiss_gpu_when_it_can(
    indexes: dict[str, faiss.Index], fake_gpus: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, ids = catalog()
    monkeypatch.setattr(faiss_index, "gpu_available", lambda: True)
    backend = choose_backend(indexes["flat"], vectors, ids, "auto", CUDA)
    assert backend.name == "faiss-gpu" and fake_gpus == ["IndexFlatIP"]
    queries = user_queries(3)
    for got, want in zip(backend.search(queries, 5), search(indexes["flat"], queries, 5), strict=True):
        np.testing.assert_array_equal(got, want)
    # No GPU HNSW in FAISS: auto falls back to exact torch, an explicit "faiss" is refused.
    assert choose_backend(indexes["hnsw"], vectors, ids, "auto", CUDA).name == "torch-cuda"
    with pytest.raises(ValueError, match="HNSW"):
        choose_backend(indexes["hnsw"], vectors, ids, "faiss", CUDA)
    assert fake_gpus == ["IndexFlatIP"]


def test_auto_on_cuda_without_faiss_gpu_takes_torch(
    indexes: dict[str, faiss.Index], fake_gpus: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, ids = catalog()
    monkeypatch.setattr(faiss_index, "gpu_available", lambda: False)
    for setting in ("auto", "torch"):
        assert choose_backend(indexes["flat"], vectors, ids, setting, CUDA).name == "torch-cuda"
    assert fake_gpus == []


# ----- images without faiss ----------------------------------------------------------------------


def test_module_imports_and_searches_without_faiss() -> None:
    """GPU images have torch but no faiss (bench/gpu_check.py): only the FAISS backends may need it."""
    script = (
        "import sys; sys.modules['faiss'] = None\n"
        "import numpy as np, torch\n"
        "from index_builder.search_backends import TorchExactSearch, resolve_device\n"
        "backend = TorchExactSearch(np.eye(3, dtype=np.float32), np.arange(3) + 5, resolve_device('cpu'))\n"
        "print(backend.search(np.eye(3, dtype=np.float32)[[2]], 1)[1][0, 0])\n"
        "assert 'index_builder.faiss_index' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "7"
