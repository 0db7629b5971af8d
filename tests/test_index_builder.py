"""index_builder: bias folding, FAISS build/search/persistence, recall, versioned index artifacts.

Synthetic data only; the artifacts are a tiny untrained Cold & Warm Net, which is all the index needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from index_builder import faiss_index
from index_builder.build import (
    INDEX_DIR,
    INDEX_FILE,
    INDEX_MANIFEST_FILE,
    IndexArtifactError,
    build_index_artifacts,
    load_index,
)
from index_builder.faiss_index import (
    apply_search_params,
    build_index,
    builds_on_gpu,
    default_nlist,
    exact_search,
    gpu_available,
    read_index,
    search,
    write_index,
)
from index_builder.recall import recall_at_k, sample_points, sample_user_queries, synthetic_queries
from index_builder.settings import IndexSettings
from index_builder.vectors import fold_bias, query_vectors
from model.artifacts import ArtifactError, ItemTable, load_artifacts, write_artifacts
from model.data.schema import InteractionData
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.features import FeatureEncoder
from model.nn.cold_warm_net import ColdWarmNet
from model.ranker import encode_points
from model.settings import FeatureConfig, ModelConfig

# Small HNSW graph: builds 20k vectors in about a second on two cores, recall well above 0.9.
FAST_HNSW = {"hnsw_m": 16, "ef_construction": 64, "ef_search": 128}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_items(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit embeddings, biases and shuffled, non-contiguous item ids (so positions never pass as ids)."""
    rng = np.random.default_rng(seed)
    embeddings = unit(rng.standard_normal((n, d))).astype(np.float32)
    bias = rng.normal(0.0, 0.5, n).astype(np.float32)
    ids = rng.permutation(np.arange(n, dtype=np.int64) * 7 + 1_000)
    return embeddings, bias, ids


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20k folded item vectors in 200 clusters (cos ≈ 0.7 to their centre), ids, and 200 user queries.

    Loose enough that a query's top 100 spans several clusters, so the ANN indexes have work to do.
    """
    rng = np.random.default_rng(0)
    n, d, clusters = 20_000, 64, 200
    centres = unit(rng.standard_normal((clusters, d)))
    embeddings = unit(centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) / np.sqrt(d))
    vectors = fold_bias(embeddings, rng.normal(0.0, 0.5, n), scale=10.0)
    ids = rng.permutation(n).astype(np.int64) * 3 + 11
    users = unit(centres[rng.integers(0, clusters, 200)] + rng.standard_normal((200, d)) / np.sqrt(d))
    return vectors, ids, query_vectors(users)


# ----- bias folding ------------------------------------------------------------------------------


def test_folded_inner_product_is_scaled_cosine_plus_item_bias() -> None:
    embeddings, bias, _ = random_items(50, 8)
    users = unit(np.random.default_rng(1).standard_normal((5, 8))).astype(np.float32)
    scale = 7.5
    items, queries = fold_bias(embeddings, bias, scale), query_vectors(users)
    assert items.shape == (50, 9) and queries.shape == (5, 9)
    assert items.dtype == queries.dtype == np.float32
    np.testing.assert_array_equal(queries[:, -1], 1.0)
    np.testing.assert_allclose(queries @ items.T, scale * users @ embeddings.T + bias[None, :], atol=1e-5)


def test_fold_bias_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        fold_bias(np.zeros((3, 4)), np.zeros(2), 1.0)
    with pytest.raises(ValueError):
        query_vectors(np.zeros(4))


# ----- build and search --------------------------------------------------------------------------


def test_flat_search_equals_numpy_brute_force_and_returns_item_ids() -> None:
    embeddings, bias, ids = random_items(2_000, 16)
    vectors = fold_bias(embeddings, bias, 10.0)
    queries = query_vectors(unit(np.random.default_rng(2).standard_normal((20, 16))))
    index = build_index(vectors, ids, IndexSettings())
    scores, found = search(index, queries, 10)

    brute = queries @ vectors.T
    order = np.argsort(-brute, axis=1)[:, :10]  # continuous random data: no ties
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, axis=1), rtol=1e-5, atol=1e-4)
    assert found.dtype == np.int64 and scores.dtype == np.float32
    exact_scores, exact_ids = exact_search(vectors, ids, queries, 10)
    np.testing.assert_array_equal(exact_ids, found)
    np.testing.assert_allclose(exact_scores, scores, rtol=1e-6)


def test_empty_slots_are_minus_one_with_minus_infinity() -> None:
    embeddings, bias, ids = random_items(5, 4)
    index = build_index(fold_bias(embeddings, bias, 1.0), ids, IndexSettings())
    scores, found = search(index, query_vectors(embeddings[:2]), 8)
    assert (found[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert set(found[0, :5]) == set(ids)


def test_build_rejects_bad_ids() -> None:
    embeddings, bias, _ = random_items(4, 4)
    vectors = fold_bias(embeddings, bias, 1.0)
    for bad in (np.array([1, 2, 2, 3]), np.array([1, 2, -1, 3]), np.array([1, 2, 3])):
        with pytest.raises(ValueError):
            build_index(vectors, bad, IndexSettings())


@pytest.mark.parametrize(
    "settings",
    [IndexSettings(type="ivf"), IndexSettings(type="hnsw", **FAST_HNSW)],
    ids=["ivf", "hnsw"],
)
def test_approximate_indexes_reach_recall_0_9(clustered, settings: IndexSettings) -> None:
    vectors, ids, queries = clustered
    index = build_index(vectors, ids, settings)
    _, approx = search(index, queries, 100)
    _, exact = exact_search(vectors, ids, queries, 100)
    assert set(np.unique(approx)) <= set(ids)  # item ids, not row positions
    assert recall_at_k(approx, exact, 100) >= 0.9


def mapped_paths() -> set[str]:
    """Files this process has memory-mapped (Linux)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_write_read_round_trip_gives_identical_results(tmp_path: Path, kind: str, mmap: bool) -> None:
    embeddings, bias, ids = random_items(3_000, 16)
    vectors = fold_bias(embeddings, bias, 10.0)
    settings = IndexSettings(type=kind, mmap=mmap, **FAST_HNSW)
    queries = synthetic_queries(vectors, 50, seed=3)
    index = build_index(vectors, ids, settings)
    path = tmp_path / "x" / INDEX_FILE
    write_index(index, path)
    again = read_index(path, settings)
    assert isinstance(again, faiss.IndexIDMap2) and again.ntotal == len(ids)
    for got, want in zip(search(again, queries, 20), search(index, queries, 20), strict=True):
        np.testing.assert_array_equal(got, want)
    # Memory-mapped, the index's codes are the file's pages (shared by every process serving it).
    assert (str(path.resolve()) in mapped_paths()) is mmap


def inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index)


def test_search_params_are_reapplied_after_load(tmp_path: Path) -> None:
    embeddings, bias, ids = random_items(2_000, 8)
    vectors = fold_bias(embeddings, bias, 10.0)
    built = IndexSettings(nprobe=3, ef_search=40, hnsw_m=8)
    serving = IndexSettings(nprobe=24, ef_search=150)
    ivf = build_index(vectors, ids, built.model_copy(update={"type": "ivf"}))
    hnsw = build_index(vectors, ids, built.model_copy(update={"type": "hnsw"}))
    assert (inner(ivf).nprobe, inner(hnsw).hnsw.efSearch) == (3, 40)
    write_index(ivf, tmp_path / "ivf.faiss")
    write_index(hnsw, tmp_path / "hnsw.faiss")
    # The files keep the build-time values; the serving settings must win.
    ivf, hnsw = read_index(tmp_path / "ivf.faiss", serving), read_index(tmp_path / "hnsw.faiss", serving)
    assert (inner(ivf).nprobe, inner(hnsw).hnsw.efSearch) == (24, 150)
    apply_search_params(ivf, IndexSettings(nprobe=5))
    assert inner(ivf).nprobe == 5


def test_default_nlist_follows_sqrt_rule_with_training_floor() -> None:
    assert default_nlist(100_000) == 1265
    assert default_nlist(20_000) == 512  # 4·sqrt = 566, but 20k / 39 = 512
    assert default_nlist(10) == 1


def test_settings_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLDWARM_INDEX_TYPE", "hnsw")
    monkeypatch.setenv("COLDWARM_INDEX_EF_SEARCH", "256")
    settings = IndexSettings()
    assert settings.type == "hnsw" and settings.ef_search == 256 and settings.nlist is None


# ----- GPU / CPU path ----------------------------------------------------------------------------


@pytest.mark.skipif("GPU" in faiss.get_compile_options(), reason="a GPU build of faiss")
def test_cpu_path_taken_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu_available() is False  # CI and this machine run faiss-cpu
    assert not builds_on_gpu(IndexSettings(type="ivf", use_gpu=True))

    def boom() -> str:
        raise AttributeError("no such function in this build")

    monkeypatch.setattr(faiss, "get_compile_options", boom)
    assert gpu_available() is False


def test_gpu_path_copies_back_a_cpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU branch's plumbing, with CPU clones standing in for the GPU copies."""
    moved: list[str] = []

    def to_gpu(resources: object, device: int, index: faiss.Index) -> faiss.Index:
        moved.append(type(inner(index)).__name__)
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss_index, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", faiss.clone_index, raising=False)
    embeddings, bias, ids = random_items(2_000, 8)
    vectors = fold_bias(embeddings, bias, 10.0)
    for kind in ("flat", "ivf", "hnsw"):
        index = build_index(vectors, ids, IndexSettings(type=kind, nprobe=7, hnsw_m=8))
        assert isinstance(index, faiss.IndexIDMap2) and index.ntotal == len(ids)
        assert set(search(index, query_vectors(embeddings[:3]), 5)[1].ravel()) <= set(ids)
    assert moved == ["IndexIVFFlat"]  # flat has nothing to build, HNSW has no GPU version
    assert inner(index).hnsw.efSearch == 128


# ----- recall ------------------------------------------------------------------------------------


def test_recall_at_k_counts_overlap_and_ignores_empty_slots() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [-1, -1, -1, -1]])
    assert recall_at_k(approx, exact, 4) == pytest.approx((2 / 4 + 0) / 2)
    assert recall_at_k(exact, exact, 4) == 1.0
    assert recall_at_k(approx, exact, 2) == 0.0  # only the first 2 of each count


def test_synthetic_queries_are_unit_users_with_a_one() -> None:
    embeddings, bias, _ = random_items(100, 8)
    queries = synthetic_queries(fold_bias(embeddings, bias, 5.0), 31, seed=0)
    assert queries.shape == (31, 9)
    np.testing.assert_allclose(np.linalg.norm(queries[:, :8], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(queries[:, 8], 1.0)


# ----- artifacts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InteractionData, ColdWarmNet]:
    """An artifacts root with one version of an untrained tiny Cold & Warm Net, biases switched on."""
    torch.manual_seed(0)
    data = generate_synthetic(n_users=60, n_items=40)
    encoder = FeatureEncoder.fit(data, split_users(data).train, FeatureConfig())
    config = ModelConfig(embedding_dim=8, hidden_dim=16, feature_dim=4, n_user_groups=2)
    # Bias columns chosen by hand (training picks them by MI), so that b_u and b_i are not zero.
    net = ColdWarmNet(encoder, config, user_bias_columns=[0, 4], item_bias_columns=[0, 2])
    net.eval()
    with torch.no_grad():
        embeddings, bias = net.all_items()
    items = ItemTable(encoder.catalog_item_ids.copy(), embeddings.numpy(), bias.numpy())
    root = tmp_path_factory.mktemp("artifacts")
    write_artifacts(root, net.user_tower, items, encoder, {"scale": float(net.scale.detach())})
    return root, data, net


def test_build_index_artifacts_writes_manifest_and_latest(tiny) -> None:
    root, data, _ = tiny
    version_dir = build_index_artifacts(
        root, settings=IndexSettings(recall_sample=50), data=data, progress=True
    )
    artifacts = load_artifacts(root)
    assert version_dir.parent == artifacts.directory / INDEX_DIR
    assert (version_dir.parent / "LATEST").read_text().strip() == version_dir.name
    assert not [p for p in version_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left
    manifest = json.loads((version_dir / INDEX_MANIFEST_FILE).read_text())
    for field in (
        "index_version",
        "model_version",
        "type",
        "params",
        "n_items",
        "dim",
        "built_on",
        "build_seconds",
        "recall_at_40",  # k is capped at the 40-item catalog
        "recall_queries",
        "created_at",
    ):
        assert field in manifest, field
    assert manifest["index_version"] == version_dir.name
    assert manifest["model_version"] == artifacts.version
    # The default net mixes its experts' scores: 2 × 8 wide, plus the folded bias.
    assert (manifest["n_items"], manifest["dim"]) == (40, 17)
    assert manifest["built_on"] == "cpu" and manifest["type"] == "flat"
    assert manifest["recall_at_40"] == pytest.approx(1.0)
    assert manifest["recall_queries"] == 50 and manifest["recall_query_source"].startswith("users:")


def test_index_scores_plus_user_bias_equal_model_scores(tiny) -> None:
    root, data, net = tiny
    build_index_artifacts(root, settings=IndexSettings(recall_sample=10))
    index, _ = load_index(root)
    artifacts = load_artifacts(root)
    points = sample_points(data, 12, seed=1)
    encoded = encode_points(points, data.users, artifacts.encoder)
    tensors = [torch.as_tensor(a) for a in (encoded.profile, encoded.history, encoded.state)]
    with torch.no_grad():
        e_u, b_u, _ = artifacts.user_tower(*tensors)
        model_scores = net.score_all(*tensors).numpy()
    assert b_u.abs().min() > 0 and np.abs(artifacts.items.bias).min() > 0
    scores, ids = search(index, query_vectors(e_u.numpy()), 40)
    columns = artifacts.encoder.catalog_positions(ids)
    want = np.take_along_axis(model_scores, columns, axis=1)
    np.testing.assert_allclose(scores + b_u.numpy()[:, None], want, rtol=1e-4, atol=1e-4)


def test_user_queries_cover_empty_and_long_histories(tiny) -> None:
    root, data, _ = tiny
    points = sample_points(data, 200, seed=0)
    assert min(p.h for p in points) == 0 and max(p.h for p in points) >= 20
    queries = sample_user_queries(load_artifacts(root), data, 200, seed=0)
    assert queries.shape == (200, 17) and queries.dtype == np.float32
    # [w_cold · ê_cold ; w_warm · ê_warm ; 1]: each half is a unit vector scaled by its gate weight.
    halves = np.linalg.norm(queries[:, :8], axis=1) + np.linalg.norm(queries[:, 8:16], axis=1)
    np.testing.assert_allclose(halves, 1.0, rtol=1e-5)
    np.testing.assert_array_equal(queries[:, 16], 1.0)


def test_load_index_accepts_each_level_of_the_layout(tiny) -> None:
    root, _, _ = tiny
    version_dir = build_index_artifacts(root, settings=IndexSettings(type="ivf", recall_sample=20))
    artifacts_dir = version_dir.parent.parent
    for path in (root, artifacts_dir, artifacts_dir / INDEX_DIR, version_dir):
        index, manifest = load_index(path, IndexSettings(nprobe=3))
        assert manifest["index_version"] == version_dir.name and index.ntotal == 40
        assert inner(index).nprobe == 3


def test_model_version_mismatch_raises(tiny, tmp_path: Path) -> None:
    root, _, _ = tiny
    out = build_index_artifacts(root, out_dir=tmp_path, settings=IndexSettings(recall_sample=10))
    model_version = load_artifacts(root).version
    assert load_index(tmp_path, model_version=model_version)[1]["model_version"] == model_version
    with pytest.raises(IndexArtifactError, match="served model"):
        load_index(tmp_path, model_version="not-the-model")
    with pytest.raises(IndexArtifactError, match="model_version"):
        load_index(out)  # no artifacts beside an index written elsewhere: nothing to check against
    # An index moved under another model's artifacts is refused too.
    manifest_path = out / INDEX_MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["model_version"] = "0123456789ab"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):  # IndexArtifactError is an ArtifactError
        load_index(out, model_version=model_version)


def test_load_index_checks_item_count(tiny, tmp_path: Path) -> None:
    root, _, _ = tiny
    out = build_index_artifacts(root, out_dir=tmp_path, settings=IndexSettings(recall_sample=10))
    manifest = json.loads((out / INDEX_MANIFEST_FILE).read_text())
    manifest["n_items"] = 41
    (out / INDEX_MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexArtifactError, match="41"):
        load_index(out, model_version=manifest["model_version"])
    with pytest.raises(IndexArtifactError, match="no index"):
        load_index(tmp_path / "nowhere", model_version="x")
