"""TrainedModel → versioned artifacts (TorchScript user tower, item table, encoder, manifest)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifacts import DataSource, ItemTable, write_artifacts
from model.settings import ExportConfig
from model.train import TrainedModel


@torch.no_grad()
def item_table(trained: TrainedModel) -> ItemTable:
    embeddings, bias = trained.net.all_items()
    return ItemTable(
        trained.encoder.catalog_item_ids.copy(),
        embeddings.numpy().astype(np.float32),
        bias.numpy().astype(np.float32),
    )


def export_model(
    trained: TrainedModel,
    root: Path,
    data_fingerprint: str,
    dataset: str,
    metrics: dict[str, Any] | None = None,
    data_source: DataSource | None = None,
    compile_for: Sequence[str] = (),
) -> Path:
    """Writes the artifacts of ``trained`` under ``root``; returns the version directory.

    ``data_source``: how to load the training data again, so that ``coldwarm build-index`` can measure
    the index's recall on its users without being told where it is. ``compile_for``: device types to
    compile the tower for besides TorchScript (``compile_devices``).
    """
    trained.net.eval()
    manifest = {
        "model_name": trained.name,
        "dataset": dataset,
        "data_fingerprint": data_fingerprint,
        "data_source": data_source.to_record() if data_source is not None else None,
        "scale": float(trained.net.scale.detach()),
        "feature_config": trained.encoder.config.model_dump(mode="json"),
        "model_config": trained.model_config.model_dump(mode="json"),
        "train_config": trained.train_config.model_dump(mode="json"),
        "bias_features": trained.bias_features.names if trained.bias_features else [],
        "training": {"epochs": trained.epochs, "seconds": round(trained.seconds, 1)},
        "metrics": metrics or {},
    }
    return write_artifacts(
        root, trained.net.user_tower, item_table(trained), trained.encoder, manifest, compile_for
    )


def compile_devices(config: ExportConfig) -> tuple[str, ...]:
    """The devices ``export_model`` compiles for: the CPU and, where present, CUDA (skipped without)."""
    return ("cpu", "cuda") if config.compiled_tower == "auto" else ()
