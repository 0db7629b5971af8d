"""Model artifacts → a versioned FAISS index beside them; and the checked way back in.

Layout (under the artifacts version directory, or ``out_dir`` when given)::

    index/<index_version>/
        index.faiss           a CPU IndexIDMap2 over the bias-folded item vectors, keyed by item id
        index_manifest.json   index_version, model_version, type, params, n_items, dim, built_on,
                              build_seconds, recall_at_<k>, recall_queries, created_at, ...
    index/LATEST              the newest index version's name

The index version is a hash of the index file and its parameters. An index is only ever served with
the model whose item vectors it holds: ``load_index`` refuses any other model version, since a stale
index would silently rank with the wrong embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index_builder.faiss_index import (
    build_index,
    builds_on_gpu,
    exact_search,
    index_params,
    read_index,
    search,
    write_index,
)
from index_builder.recall import recall_at_k, sample_user_queries, synthetic_queries
from index_builder.settings import IndexSettings
from index_builder.vectors import fold_bias
from model.artifacts import (
    LATEST_FILE,
    MANIFEST_FILE,
    ArtifactError,
    load_artifacts,
    publish_version,
    resolve_version_dir,
    staging_directory,
)
from model.data.schema import InteractionData

logger = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FILE = "index.faiss"
INDEX_MANIFEST_FILE = "index_manifest.json"
RECALL_SEED = 0


class IndexArtifactError(ArtifactError):
    """An index directory that is missing, unreadable, or does not belong to the model it is served with."""


def measure_recall(
    index: faiss.Index, vectors: np.ndarray, item_ids: np.ndarray, queries: np.ndarray, k: int
) -> float:
    """recall@k of the index against brute force over the same vectors."""
    k = min(k, len(item_ids))
    _, approx = search(index, queries, k)
    _, exact = exact_search(vectors, item_ids, queries, k)
    return recall_at_k(approx, exact, k)


def index_version(index_file: Path, params: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(params, sort_keys=True).encode())
    with index_file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _publish(root: Path, index: faiss.Index, manifest: dict[str, Any]) -> Path:
    """Writes index + manifest into a staging directory, renames it to its version, points LATEST at it."""
    with staging_directory(root) as staging:
        write_index(index, staging / INDEX_FILE)
        version = index_version(staging / INDEX_FILE, {"type": manifest["type"], **manifest["params"]})
        manifest = {"index_version": version, **manifest}
        (staging / INDEX_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return publish_version(root, staging, version)


def build_index_artifacts(
    artifacts_dir: Path,
    out_dir: Path | None = None,
    settings: IndexSettings | None = None,
    data: InteractionData | None = None,
    progress: bool = False,
) -> Path:
    """Builds, measures and writes the index for the artifacts at ``artifacts_dir`` (a version directory
    or a root with LATEST); returns the new index version directory.

    ``data``: users whose embeddings serve as recall queries; without it, synthetic queries are used.
    """
    settings = settings or IndexSettings()
    artifacts = load_artifacts(Path(artifacts_dir))
    items = artifacts.items
    vectors = fold_bias(items.embeddings, items.bias, artifacts.scale)
    n, dim = vectors.shape
    built_on = "gpu" if builds_on_gpu(settings) else "cpu"
    params = index_params(settings, n)
    logger.info(
        "building %s index over %d items (dim %d, model %s) on %s, params %s",
        settings.type,
        n,
        dim,
        artifacts.version,
        built_on,
        params,
    )
    started = time.perf_counter()
    index = build_index(vectors, items.item_ids, settings, progress=progress)
    build_seconds = time.perf_counter() - started
    logger.info("built in %.2f s", build_seconds)

    n_queries = settings.recall_sample
    if data is not None:
        queries = sample_user_queries(artifacts, data, n_queries, seed=RECALL_SEED, progress=progress)
        query_source = f"users:{data.name}"
    else:
        queries = synthetic_queries(vectors, n_queries, seed=RECALL_SEED)
        query_source = "synthetic"
    k = min(settings.recall_k, n)
    recall = measure_recall(index, vectors, items.item_ids, queries, k)
    logger.info("recall@%d = %.4f on %d %s queries", k, recall, len(queries), query_source)
    if settings.type == "hnsw" and settings.ef_search < k:
        logger.warning("ef_search %d < k %d: HNSW recall at k drops fast", settings.ef_search, k)

    manifest = {
        "model_version": artifacts.version,
        "type": settings.type,
        "metric": "inner_product",
        "params": params,
        "n_items": n,
        "dim": dim,
        "scale": artifacts.scale,
        "built_on": built_on,
        "build_seconds": round(build_seconds, 3),
        f"recall_at_{k}": round(recall, 5),
        "recall_k": k,
        "recall_queries": len(queries),
        "recall_query_source": query_source,
        "faiss_version": faiss.__version__,
        "created_at": int(time.time()),
    }
    root = Path(out_dir) if out_dir is not None else artifacts.directory
    target = _publish(root / INDEX_DIR, index, manifest)
    logger.info("wrote %s", target)
    return target


# ----- loading -------------------------------------------------------------------------------------


def _latest(root: Path) -> Path | None:
    latest = root / LATEST_FILE
    return root / latest.read_text().strip() if latest.is_file() else None


def resolve_index_dir(path: Path) -> Path:
    """An index version directory from itself, an index root, an artifacts version directory (or
    out_dir) holding index/, or an artifacts root whose LATEST names such a directory."""
    path = Path(path)
    if (path / INDEX_MANIFEST_FILE).is_file():
        return path
    latest = _latest(path)
    if latest is not None and (latest / INDEX_MANIFEST_FILE).is_file():
        return latest
    if (path / INDEX_DIR / LATEST_FILE).is_file():
        return resolve_index_dir(path / INDEX_DIR)
    if latest is not None and (latest / MANIFEST_FILE).is_file():
        return resolve_index_dir(resolve_version_dir(path))
    raise IndexArtifactError(
        f"{path}: no index found (no {INDEX_MANIFEST_FILE}, {LATEST_FILE} or {INDEX_DIR}/)"
    )


def _artifacts_model_version(index_dir: Path) -> str | None:
    """The model version of the artifacts directory the index was written into, if it was."""
    manifest = index_dir.parent.parent / MANIFEST_FILE
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("model_version")


def serving_settings(manifest: dict[str, Any], settings: IndexSettings) -> IndexSettings:
    """The search breadth the index was built and measured with (its manifest), unless the operator set
    one explicitly (COLDWARM_INDEX_NPROBE / COLDWARM_INDEX_EF_SEARCH): the recall in the manifest then
    describes what is served."""
    params = manifest.get("params", {})
    recorded = {name: params[name] for name in ("nprobe", "ef_search") if name in params}
    return settings.model_copy(
        update={k: v for k, v in recorded.items() if k not in settings.model_fields_set}
    )


def check_index_file(index_dir: Path, manifest: dict[str, Any]) -> None:
    """The index file is the one its manifest was written for: its version is a hash of it."""
    if not (index_dir / INDEX_FILE).is_file():
        raise IndexArtifactError(f"{index_dir}: missing {INDEX_FILE}")
    params = {"type": manifest.get("type"), **(manifest.get("params") or {})}
    if index_version(index_dir / INDEX_FILE, params) != manifest.get("index_version"):
        raise IndexArtifactError(
            f"{index_dir}: {INDEX_FILE} does not match index_version {manifest.get('index_version')!r} "
            f"in {INDEX_MANIFEST_FILE} (damaged or replaced)"
        )


def load_index(
    path: Path, settings: IndexSettings | None = None, model_version: str | None = None
) -> tuple[faiss.Index, dict[str, Any]]:
    """Reads and checks an index; the serving settings' nprobe / efSearch are applied.

    ``model_version``: the model the caller serves. Without it, the artifacts directory the index lives
    in decides; an index written to a separate ``out_dir`` therefore needs it.
    """
    settings = settings or IndexSettings()
    index_dir = resolve_index_dir(path)
    try:
        manifest = json.loads((index_dir / INDEX_MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise IndexArtifactError(f"{index_dir}: unreadable {INDEX_MANIFEST_FILE}: {error}") from error
    expected = model_version or _artifacts_model_version(index_dir)
    if expected is None:
        raise IndexArtifactError(f"{index_dir}: no artifacts beside the index; pass the served model_version")
    if manifest.get("model_version") != expected:
        raise IndexArtifactError(
            f"{index_dir}: {INDEX_MANIFEST_FILE} says the index was built for model "
            f"{manifest.get('model_version')!r}, the served model is {expected!r}"
        )
    check_index_file(index_dir, manifest)
    settings = serving_settings(manifest, settings)
    try:
        index = read_index(index_dir / INDEX_FILE, settings)
    except (OSError, RuntimeError) as error:  # faiss reports a corrupt file as RuntimeError
        raise IndexArtifactError(f"{index_dir}: cannot read {INDEX_FILE}: {error}") from error
    if index.ntotal != manifest.get("n_items") or index.d != manifest.get("dim"):
        raise IndexArtifactError(
            f"{index_dir}: index holds {index.ntotal} vectors of dim {index.d}, "
            f"manifest says {manifest.get('n_items')} of dim {manifest.get('dim')}"
        )
    logger.info(
        "loaded %s index %s (%d items) for model %s", manifest["type"], index_dir.name, index.ntotal, expected
    )
    return index, manifest
