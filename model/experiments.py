"""The comparison of the protocol: Cold & Warm Net, its ablations and the baselines, one split, one table.

Every model is trained on the train users, tuned or early-stopped on the validation users, and
ranked for the test users' (user, h) points by the same ``evaluate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.baselines.ease import tune_lambda
from model.baselines.popular import MostPopular, SegmentPopular
from model.baselines.two_tower import DSSM, YouTubeDNN
from model.evaluation.protocol import EvalPoint, EvaluationResult, Ranker, build_eval_points, evaluate
from model.nn.two_tower import TwoTowerNet
from model.ranker import ModelRanker
from model.settings import ModelConfig, Settings, TrainConfig
from model.train import TrainedModel, TrainingContext, fit_cold_warm_net, fit_two_tower, fit_user_groups

log = logging.getLogger(__name__)

PRIMARY_MODEL = "cold_warm_net"
# Ablations: the switches of ModelConfig each variant flips against the default configuration
# (distillation is off by default, so its variant turns it on).
ABLATIONS: dict[str, dict[str, bool]] = {
    "with_dkd": {"use_dkd": True},
    "no_bias_net": {"use_bias_net": False},
    "no_group_attention": {"use_group_attention": False},
    "cold_expert_only": {"use_warm_expert": False},
    "warm_expert_only": {"use_cold_expert": False},
}
HEURISTIC_BASELINES: tuple[str, ...] = ("most_popular", "segment_popular", "ease")
LEARNT_BASELINES: dict[str, tuple[Callable[..., TwoTowerNet], str]] = {
    "dssm": (DSSM, "bce"),
    "youtube_dnn": (YouTubeDNN, "sampled_softmax"),
}
ALL_MODELS: tuple[str, ...] = (PRIMARY_MODEL, *ABLATIONS, *HEURISTIC_BASELINES, *LEARNT_BASELINES)


@dataclass
class ExperimentOutcome:
    results: dict[str, EvaluationResult]
    trained: dict[str, TrainedModel] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def check_model_names(models: Sequence[str]) -> list[str]:
    unknown = [m for m in models if m not in ALL_MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    return list(dict.fromkeys(models))


def heuristic_ranker(
    name: str, context: TrainingContext, catalog: np.ndarray, details: dict[str, Any]
) -> Ranker:
    if name == "most_popular":
        return MostPopular.fit(context.data, context.split.train, catalog)
    if name == "segment_popular":
        return SegmentPopular.fit(context.data, context.split.train, catalog)
    tuning = tune_lambda(context.data, context.split, catalog)
    details["ease_lambda"] = tuning.best_lambda
    details["ease_validation_recall@50"] = tuning.validation
    return tuning.model


def train_variant(
    name: str,
    context: TrainingContext,
    model_config: ModelConfig,
    train_config: TrainConfig,
    groups: torch.Tensor | None,
    progress: bool,
) -> TrainedModel:
    if name in LEARNT_BASELINES:
        factory, loss = LEARNT_BASELINES[name]
        baseline_config = model_config.model_copy(update={"use_dkd": False})
        torch.manual_seed(train_config.seed)
        net = factory(context.encoder, baseline_config)
        return fit_two_tower(
            context, net, baseline_config, train_config.model_copy(update={"loss": loss}), name, progress
        )
    variant = model_config.model_copy(update=ABLATIONS.get(name, {}))
    return fit_cold_warm_net(context, variant, train_config, name, progress, group_embeddings=groups)


def run_experiments(
    context: TrainingContext,
    settings: Settings,
    models: Sequence[str],
    progress: bool = True,
    trained: dict[str, TrainedModel] | None = None,
    test_points: list[EvalPoint] | None = None,
) -> ExperimentOutcome:
    """Trains (unless given in ``trained``) and evaluates ``models`` on the test users."""
    models = check_model_names(models)
    catalog = context.data.catalog_item_ids()
    points = test_points if test_points is not None else build_eval_points(context.data, context.split.test)
    outcome = ExperimentOutcome(results={}, trained=dict(trained or {}))
    outcome.details["test_points"] = len(points)
    groups: torch.Tensor | None = None
    for name in models:
        started = time.perf_counter()
        if name in HEURISTIC_BASELINES:
            ranker: Ranker = heuristic_ranker(name, context, catalog, outcome.details)
        else:
            if name not in outcome.trained:
                needs_groups = (
                    settings.model.use_group_attention
                    and name not in LEARNT_BASELINES
                    and (ABLATIONS.get(name, {}).get("use_group_attention", True))
                )
                if needs_groups and groups is None:
                    # One pre-training serves every variant: the groups do not depend on the variant.
                    groups = fit_user_groups(context, settings.model, settings.train, progress)
                outcome.trained[name] = train_variant(
                    name, context, settings.model, settings.train, groups, progress
                )
            ranker = ModelRanker(
                name, outcome.trained[name].net, context.encoder, context.data.users, catalog
            )
        outcome.results[name] = evaluate(ranker, points, catalog, progress=progress)
        outcome.details.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        headline = outcome.results[name].groups.get("all", {})
        log.info(
            "%s: all-users recall@50 %.4f ndcg@50 %.4f (%.0fs)",
            name,
            headline.get("recall@50", 0.0),
            headline.get("ndcg@50", 0.0),
            time.perf_counter() - started,
        )
    return outcome
