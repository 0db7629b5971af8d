"""Per-seed evaluation runs kept on disk, so that a comparison can take a model's runs from an earlier
run of the same protocol instead of training it again (SASRec takes ~20 minutes a seed on 2 cores).

A run is keyed by what determines it short of the code: the model's name, the data (interactions
fingerprint, data set name, profile and item tables' sizes) and the full feature / model / training
settings, seed included. The code is not in the key (every commit would invalidate every run), so a
stored run records the commit it was made at, and a report that reuses runs lists them: which model,
which seed, made when, at which commit. Reuse is asked for per model; nothing is reused by default.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.evaluation.protocol import EvaluationResult, summarise

ROOT = Path(__file__).resolve().parents[2]


def source_commit() -> str:
    """The checkout's commit, with "+changes" when the working tree differs from it; "unknown" outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+changes" if dirty else commit


def run_key(name: str, data_identity: dict[str, Any], settings: dict[str, Any]) -> str:
    """Digest of the model name, the data's identity and the settings (seed included)."""
    payload = json.dumps({"name": name, "data": data_identity, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class StoredRun:
    result: EvaluationResult
    info: dict[str, Any]  # name, seed, commit, created, epochs, seconds


@dataclass(frozen=True)
class RunStore:
    directory: Path

    def _paths(self, name: str, key: str) -> tuple[Path, Path]:
        stem = self.directory / f"{name}-{key}"
        return stem.with_suffix(".npz"), stem.with_suffix(".json")

    def save(self, key: str, result: EvaluationResult, info: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays, meta = self._paths(result.name, key)
        per_point = {f"metric:{m}": v for m, v in result.per_point.items()}
        np.savez_compressed(arrays, point_h=result.point_h, point_user=result.point_user, **per_point)
        record = {**info, "name": result.name, "commit": source_commit(), "created": time.time()}
        meta.write_text(json.dumps(record, indent=2, default=str) + "\n")

    def load(self, name: str, key: str) -> StoredRun | None:
        arrays, meta = self._paths(name, key)
        if not (arrays.exists() and meta.exists()):
            return None
        with np.load(arrays) as stored:
            per_point = {k.split(":", 1)[1]: stored[k] for k in stored.files if k.startswith("metric:")}
            result = summarise(name, per_point, stored["point_h"], stored["point_user"])
        return StoredRun(result, json.loads(meta.read_text()))
