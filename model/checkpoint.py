"""A trained model on disk between the job's steps (train → evaluate → export)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from model.baselines.sasrec import SASRec
from model.baselines.two_tower import DSSM, YouTubeDNN
from model.features import FeatureEncoder
from model.mutual_info import BiasFeatureSelection
from model.nn.cold_warm_net import ColdWarmNet
from model.nn.two_tower import TwoTowerNet
from model.settings import ModelConfig, TrainConfig
from model.train import TrainedModel


def build_net(
    name: str, encoder: FeatureEncoder, config: ModelConfig, selection: BiasFeatureSelection | None
) -> TwoTowerNet:
    if name == "dssm":
        return DSSM(encoder, config)
    if name == "youtube_dnn":
        return YouTubeDNN(encoder, config)
    if name == "sasrec":
        return SASRec(encoder, config)
    return ColdWarmNet(
        encoder,
        config,
        selection.user_columns if selection else None,
        selection.item_columns if selection else None,
    )


def save_checkpoint(trained: TrainedModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "name": trained.name,
            "model_config": trained.model_config.model_dump(mode="json"),
            "train_config": trained.train_config.model_dump(mode="json"),
            "encoder": trained.encoder.to_dict(),
            "bias_features": asdict(trained.bias_features) if trained.bias_features else None,
            "state_dict": trained.net.state_dict(),
            "epochs": trained.epochs,
            "seconds": trained.seconds,
        },
        path,
    )
    return path


def load_checkpoint(path: Path) -> TrainedModel:
    # weights_only: a checkpoint is tensors and plain data; unpickling anything else would run code that
    # whoever replaced the file chose.
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder = FeatureEncoder.from_dict(state["encoder"])
    model_config = ModelConfig.model_validate(state["model_config"])
    selection = BiasFeatureSelection(**state["bias_features"]) if state["bias_features"] else None
    net = build_net(state["name"], encoder, model_config, selection)
    net.load_state_dict(state["state_dict"])
    net.eval()
    return TrainedModel(
        state["name"],
        net,
        encoder,
        model_config,
        TrainConfig.model_validate(state["train_config"]),
        selection,
        state["epochs"],
        state["seconds"],
    )
