"""Versioned artifacts: what the offline job hands to the index builder and the service.

Layout of one version directory (the version is a hash of its content)::

    <root>/<model_version>/
        user_tower.pt     TorchScript: (profile, history, state) -> (e_u, b_u, gate)
        items.npz         item_ids int64 (n,), embeddings float32 (n, d) unit-norm, bias float32 (n,)
        features.json     the fitted FeatureEncoder (vocabularies, buckets, catalog)
        manifest.json     version, data fingerprint, configs, cosine scale, metrics
    <root>/LATEST         the newest version's name
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data.schema import InteractionData
from model.features import FeatureEncoder

USER_TOWER_FILE = "user_tower.pt"
ITEMS_FILE = "items.npz"
FEATURES_FILE = "features.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
ARTIFACT_FILES = (USER_TOWER_FILE, ITEMS_FILE, FEATURES_FILE, MANIFEST_FILE)


class ArtifactError(RuntimeError):
    """An artifacts directory that is missing, incomplete or inconsistent."""


@dataclass
class ItemTable:
    item_ids: np.ndarray
    embeddings: np.ndarray
    bias: np.ndarray


@dataclass
class Artifacts:
    directory: Path
    manifest: dict[str, Any]
    user_tower: torch.jit.ScriptModule
    items: ItemTable
    encoder: FeatureEncoder

    @property
    def version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def scale(self) -> float:
        return float(self.manifest["scale"])


def data_fingerprint(data: InteractionData) -> str:
    digest = hashlib.sha256()
    for column in ("user_id", "item_id", "timestamp"):
        digest.update(np.ascontiguousarray(data.interactions[column].to_numpy(np.int64)).tobytes())
    return digest.hexdigest()[:16]


def content_version(directory: Path, files: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:12]


def write_artifacts(
    root: Path,
    user_tower: torch.nn.Module,
    items: ItemTable,
    encoder: FeatureEncoder,
    manifest: dict[str, Any],
) -> Path:
    """Writes a complete version directory atomically (temp dir, then rename) and points LATEST at it."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        torch.jit.save(torch.jit.script(user_tower), str(staging / USER_TOWER_FILE))
        np.savez(
            staging / ITEMS_FILE,
            item_ids=items.item_ids.astype(np.int64),
            embeddings=items.embeddings.astype(np.float32),
            bias=items.bias.astype(np.float32),
        )
        encoder.save(staging / FEATURES_FILE)
        version = content_version(staging, (USER_TOWER_FILE, ITEMS_FILE, FEATURES_FILE))
        full_manifest = {
            **manifest,
            "model_version": version,
            "created_at": int(time.time()),
            "n_items": len(items.item_ids),
            "embedding_dim": int(items.embeddings.shape[1]),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2, sort_keys=True))
        target = root / version
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (root / LATEST_FILE).write_text(version + "\n")
    return target


def resolve_version_dir(path: Path) -> Path:
    """A version directory itself, or a root whose LATEST names one."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists():
        return path
    latest = path / LATEST_FILE
    if latest.exists():
        return path / latest.read_text().strip()
    raise ArtifactError(
        f"{path}: neither an artifacts version directory nor a root with a {LATEST_FILE} file"
    )


def load_artifacts(path: Path, map_location: str = "cpu") -> Artifacts:
    """Loads and cross-checks a version directory; any inconsistency is an ArtifactError."""
    directory = resolve_version_dir(path)
    missing = [name for name in ARTIFACT_FILES if not (directory / name).exists()]
    if missing:
        raise ArtifactError(f"{directory}: missing {', '.join(missing)}")
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        user_tower = torch.jit.load(str(directory / USER_TOWER_FILE), map_location=map_location)
        with np.load(directory / ITEMS_FILE) as arrays:
            items = ItemTable(arrays["item_ids"], arrays["embeddings"], arrays["bias"])
        encoder = FeatureEncoder.load(directory / FEATURES_FILE)
    except ArtifactError:
        raise
    except Exception as error:  # a corrupt file can fail in json, torch or numpy: one error type for callers
        raise ArtifactError(f"{directory}: cannot be loaded: {error}") from error
    if len(items.item_ids) != len(items.embeddings) or len(items.item_ids) != len(items.bias):
        raise ArtifactError(f"{directory}: {ITEMS_FILE} arrays disagree in length")
    if "model_version" not in manifest or "scale" not in manifest:
        raise ArtifactError(f"{directory}: {MANIFEST_FILE} lacks model_version or scale")
    actual = content_version(directory, (USER_TOWER_FILE, ITEMS_FILE, FEATURES_FILE))
    if actual != manifest["model_version"]:
        # A file swapped or damaged after export would otherwise be served under the old version's name.
        raise ArtifactError(
            f"{directory}: content hash {actual} does not match model_version {manifest['model_version']}"
        )
    return Artifacts(directory, manifest, user_tower, items, encoder)
