"""Versioned artifacts: what the offline job hands to the index builder and the service.

Layout of one version directory (the version is a hash of its content)::

    <root>/<model_version>/
        user_tower.pt     TorchScript: (profile, history, state) -> (e_u, b_u, gate)
        items.npz         item_ids int64 (n,), embeddings float32 (n, d) (unit-norm unless the model scores
                          by the inner product or mixes its experts' scores), bias float32 (n,)
        features.json     the fitted FeatureEncoder (vocabularies, buckets, catalog)
        manifest.json     version, data fingerprint and source, configs, cosine scale, metrics
    <root>/LATEST         the newest version's name
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.compiled_tower import (
    Tower,
    compatible,
    compile_user_tower,
    compiled_tower_file,
    compiler_available,
    example_inputs,
    load_compiled_tower,
    max_difference,
)
from model.data.loading import is_synthetic_source, load_dataset
from model.data.schema import InteractionData
from model.features import EncodedUsers, FeatureEncoder

log = logging.getLogger(__name__)

USER_TOWER_FILE = "user_tower.pt"
# The compiled package must compute what TorchScript computes (the parity bound).
COMPILED_TOLERANCE = 1e-5
ITEMS_FILE = "items.npz"
FEATURES_FILE = "features.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
# The files the version hash covers; the manifest, which holds the hash, is not one of them.
CONTENT_FILES = (USER_TOWER_FILE, ITEMS_FILE, FEATURES_FILE)
ARTIFACT_FILES = (*CONTENT_FILES, MANIFEST_FILE)


class ArtifactError(RuntimeError):
    """An artifacts directory that is missing, incomplete or inconsistent."""


class DataMismatchError(ArtifactError):
    """Data that is not the data a model was trained on (or cannot be shown to be)."""


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
    # Where the tower runs (map_location at load); its outputs stay there, for a search on that device.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The AOTInductor package of the tower for this device, when the artifacts have one that loads here
    # and computes what the TorchScript tower computes (model/compiled_tower.py); it then runs instead.
    compiled_tower: Tower | None = None

    @property
    def tower_format(self) -> str:
        return "aoti" if self.compiled_tower is not None else "torchscript"

    @property
    def version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def scale(self) -> float:
        return float(self.manifest["scale"])

    def embed_users(self, encoded: EncodedUsers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit embedding (B, d), user bias b_u (B,), gate weights (B, 2) [cold, warm]) of encoded users:
        the exported tower, run the one way the service, the index's recall and the replay all use."""
        tower = self.compiled_tower or self.user_tower
        with torch.inference_mode():  # cheaper than no_grad: no version counters on the outputs
            return tower(
                torch.from_numpy(encoded.profile).to(self.device),
                torch.from_numpy(encoded.history).to(self.device),
                torch.from_numpy(encoded.state).to(self.device),
            )


@dataclass(frozen=True)
class DataSource:
    """How to load a model's training data again, as recorded in its manifest (``data_source``): the
    source string as given, a path made absolute so that it names the same data from any working
    directory, and the side tables of a CSV/Parquet interactions file."""

    source: str
    users: str | None = None
    items: str | None = None

    @classmethod
    def of(cls, source: str | Path, users: Path | None = None, items: Path | None = None) -> DataSource:
        return cls(_absolute_source(source), _absolute(users), _absolute(items))

    @classmethod
    def from_record(cls, record: object) -> DataSource | None:
        """The source a manifest recorded with ``to_record``; None when it recorded none (artifacts
        exported before sources were recorded) or nothing usable."""
        if not isinstance(record, dict) or not isinstance(record.get("source"), str):
            return None
        users, items = record.get("users"), record.get("items")
        if not all(table is None or isinstance(table, str) for table in (users, items)):
            return None
        return cls(record["source"], users, items)

    def to_record(self) -> dict[str, str | None]:
        return {"source": self.source, "users": self.users, "items": self.items}

    def load(self) -> InteractionData:
        return load_dataset(self.source, _optional_path(self.users), _optional_path(self.items))


def _absolute_source(source: str | Path) -> str:
    return str(source) if is_synthetic_source(source) else str(Path(source).resolve())


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _optional_path(path: str | None) -> Path | None:
    return None if path is None else Path(path)


def data_fingerprint(data: InteractionData) -> str:
    digest = hashlib.sha256()
    for column in ("user_id", "item_id", "timestamp"):
        digest.update(np.ascontiguousarray(data.interactions[column].to_numpy(np.int64)).tobytes())
    return digest.hexdigest()[:16]


def recorded_data_source(manifest: dict[str, Any]) -> DataSource | None:
    """Where the manifest says the model's training data came from; None if it does not say."""
    return DataSource.from_record(manifest.get("data_source"))


def check_training_data(manifest: dict[str, Any], data: InteractionData) -> None:
    """Raises DataMismatchError unless ``data`` is the data the manifest's model was trained on, judged by
    the data fingerprint (interactions only: side tables do not change it)."""
    version = manifest.get("model_version")
    expected = manifest.get("data_fingerprint")
    if not expected:
        raise DataMismatchError(
            f"the manifest of model {version} records no data_fingerprint: cannot check that {data.name} "
            "is the data it was trained on"
        )
    actual = data_fingerprint(data)
    if actual != expected:
        raise DataMismatchError(
            f"{data.name} is not the data model {version} was trained on "
            f"(fingerprint {actual}, expected {expected})"
        )


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    compile_for: Sequence[str] = (),
) -> Path:
    """Writes a complete version directory atomically (temp dir, then rename) and points LATEST at it.

    ``compile_for``: device types ("cpu", "cuda") to also compile the tower for (AOTInductor packages,
    model/compiled_tower.py); the version is the hash of the other files, which compiling does not
    change."""
    with staging_directory(root) as staging:
        torch.jit.save(torch.jit.script(user_tower), str(staging / USER_TOWER_FILE))
        compiled = compile_packages(user_tower, encoder, staging, compile_for)
        np.savez(
            staging / ITEMS_FILE,
            item_ids=items.item_ids.astype(np.int64),
            embeddings=items.embeddings.astype(np.float32),
            bias=items.bias.astype(np.float32),
        )
        encoder.save(staging / FEATURES_FILE)
        version = content_version(staging, CONTENT_FILES)
        full_manifest = {
            **manifest,
            "model_version": version,
            "files": {name: file_digest(staging / name) for name in CONTENT_FILES},
            "compiled_towers": {
                device: {**record, "sha256": file_digest(staging / record["file"])}
                for device, record in compiled.items()
            },
            "created_at": int(time.time()),
            "n_items": len(items.item_ids),
            "embedding_dim": int(items.embeddings.shape[1]),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2, sort_keys=True))
        return publish_version(root, staging, version)


def tower_example(encoder: FeatureEncoder, device: torch.device) -> tuple[torch.Tensor, ...]:
    return example_inputs(
        len(encoder.profile_cardinalities()),
        len(encoder.state_cardinalities()),
        encoder.config.max_history,
        device,
    )


def compile_packages(
    user_tower: torch.nn.Module, encoder: FeatureEncoder, directory: Path, devices: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The AOTInductor packages written into ``directory``, by device; a device that cannot be
    compiled for (no C++ compiler, no GPU) is skipped with a warning: TorchScript always serves."""
    compiled: dict[str, dict[str, Any]] = {}
    if not devices:
        return compiled
    if not compiler_available():
        log.warning("no C++ compiler: the user tower is exported as TorchScript only")
        return compiled
    for device_type in devices:
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        device = torch.device(device_type)
        example = tower_example(encoder, device)
        tower = copy.deepcopy(user_tower).to(device)
        compiled[device_type] = compile_user_tower(
            tower, example, directory / compiled_tower_file(device_type)
        )
    return compiled


@contextmanager
def staging_directory(root: Path) -> Iterator[Path]:
    """A fresh directory under ``root`` to write a version into; removed if the writing fails."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_version(root: Path, staging: Path, version: str) -> Path:
    """Renames a complete staging directory to ``root/version`` and points LATEST at it.

    The name is a hash of the content, so an existing directory of that name holds the same files:
    it is kept (a server may have it open) and the staging copy dropped.
    """
    target = root / version
    if target.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    write_latest(root, version)
    return target


def write_latest(root: Path, version: str) -> None:
    """Points ``root/LATEST`` at ``version``; a reader never sees a half-written file (rename over it)."""
    temporary = root / f".{LATEST_FILE}.{os.getpid()}"
    temporary.write_text(version + "\n")
    os.replace(temporary, root / LATEST_FILE)


def resolve_version_dir(path: Path) -> Path:
    """A version directory itself, or a root whose LATEST names one."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists():
        return path
    latest = path / LATEST_FILE
    if latest.exists():
        name = latest.read_text().strip()
        # A version is a directory of the root, named by it: LATEST must not point anywhere else (an
        # absolute path, "..", a nested path), as no reload request may.
        if not name or Path(name).name != name or name in (".", ".."):
            raise ArtifactError(f"{latest}: {name!r} is not the name of a version directory of {path}")
        return path / name
    raise ArtifactError(
        f"{path}: neither an artifacts version directory nor a root with a {LATEST_FILE} file"
    )


def artifacts_root(path: Path) -> Path:
    """The directory versions live in: ``path`` itself, or its parent when it is a version directory."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file() and not (path / LATEST_FILE).is_file():
        return path.parent
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a version directory, or of the one a root's LATEST names; nothing else is read."""
    return _read_manifest(resolve_version_dir(path))


def load_artifacts(
    path: Path, map_location: str | torch.device = "cpu", tower_format: str = "torchscript"
) -> Artifacts:
    """Loads and cross-checks a version directory; any inconsistency is an ArtifactError naming the file.

    Content is checked against the manifest *before* anything is deserialised, so a damaged or swapped
    file is refused with its name instead of reaching TorchScript or numpy.

    ``tower_format``: "torchscript"; "auto", the compiled package for the device when there is one that
    loads and agrees with TorchScript, else TorchScript; "aoti", the package or an ArtifactError.
    """
    directory = resolve_version_dir(path)
    missing = [name for name in ARTIFACT_FILES if not (directory / name).is_file()]
    if missing:
        raise ArtifactError(f"{directory}: missing {', '.join(missing)}")
    manifest = _read_manifest(directory)
    _check_content(directory, manifest)
    with _naming(directory, USER_TOWER_FILE):
        user_tower = torch.jit.load(str(directory / USER_TOWER_FILE), map_location=map_location)
    with _naming(directory, ITEMS_FILE), np.load(directory / ITEMS_FILE, allow_pickle=False) as arrays:
        items = ItemTable(arrays["item_ids"], arrays["embeddings"], arrays["bias"])
    with _naming(directory, FEATURES_FILE):
        encoder = FeatureEncoder.load(directory / FEATURES_FILE)
    if len(items.item_ids) != len(items.embeddings) or len(items.item_ids) != len(items.bias):
        raise ArtifactError(f"{directory}: {ITEMS_FILE} arrays disagree in length")
    artifacts = Artifacts(directory, manifest, user_tower, items, encoder, torch.device(map_location))
    if tower_format != "torchscript":
        artifacts.compiled_tower = _compiled_tower(artifacts, tower_format == "aoti")
    return artifacts


def _compiled_tower(artifacts: Artifacts, required: bool) -> Tower | None:
    """The artifacts' package for their device, checked against TorchScript on the example inputs."""
    directory, device = artifacts.directory, artifacts.device
    record = (artifacts.manifest.get("compiled_towers") or {}).get(device.type)
    reason = "no compiled tower for this device" if record is None else compatible(record, device)
    tower: Tower | None = None
    if reason is None:
        path = directory / str(record["file"])
        if not path.is_file() or file_digest(path) != record.get("sha256"):
            raise ArtifactError(f"{directory}: {path.name} does not match its digest in {MANIFEST_FILE}")
        with _naming(directory, path.name):
            tower = load_compiled_tower(path)
        example = tower_example(artifacts.encoder, device)
        with torch.inference_mode():
            difference = max_difference(tower(*example), artifacts.user_tower(*example))
        if difference > COMPILED_TOLERANCE:
            reason, tower = f"it differs from TorchScript by {difference:.1e}", None
    if tower is None:
        if required:
            raise ArtifactError(f"{directory}: COLDWARM_TOWER_FORMAT=aoti, but {reason}")
        log.info("%s: serving the TorchScript tower (%s)", directory.name, reason)
    return tower


def _read_manifest(directory: Path) -> dict[str, Any]:
    with _naming(directory, MANIFEST_FILE):
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    if not isinstance(manifest, dict) or "model_version" not in manifest or "scale" not in manifest:
        raise ArtifactError(f"{directory}: {MANIFEST_FILE} lacks model_version or scale")
    return manifest


def _check_content(directory: Path, manifest: dict[str, Any]) -> None:
    """Per-file digests name the damaged file; manifests written before them are checked as a whole."""
    digests = manifest.get("files")
    if isinstance(digests, dict):
        for name in CONTENT_FILES:
            if file_digest(directory / name) != digests.get(name):
                raise ArtifactError(
                    f"{directory}: {name} does not match its digest in {MANIFEST_FILE} (damaged or replaced)"
                )
    actual = content_version(directory, CONTENT_FILES)
    if actual != manifest["model_version"]:
        # A file swapped or damaged after export would otherwise be served under the old version's name.
        raise ArtifactError(
            f"{directory}: content hash {actual} does not match model_version "
            f"{manifest['model_version']!r} in {MANIFEST_FILE}"
        )


@contextmanager
def _naming(directory: Path, name: str) -> Iterator[None]:
    """Turns whatever a corrupt file raises (json, torch, numpy, zipfile) into one error naming it."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        raise ArtifactError(f"{directory}: {name} cannot be loaded: {reason}") from error
