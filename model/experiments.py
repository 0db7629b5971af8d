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

from model.artifacts import data_fingerprint
from model.baselines.ease import tune_lambda
from model.baselines.popular import MostPopular, SegmentPopular, tune_first_n
from model.baselines.sasrec import SASRec
from model.baselines.two_tower import DSSM, YouTubeDNN
from model.evaluation.bootstrap import Significance, compare_with_best_baselines
from model.evaluation.protocol import EvalPoint, EvaluationResult, Ranker, build_eval_points, evaluate
from model.evaluation.report import HEADLINE_METRICS
from model.evaluation.run_store import RunStore, run_key
from model.evaluation.seeds import SeedSpread, mean_over_seeds, spread_over_seeds
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
HEURISTIC_BASELINES: tuple[str, ...] = ("most_popular", "segment_popular", "onboarding_popular", "ease")
LEARNT_BASELINES: dict[str, tuple[Callable[..., TwoTowerNet], str]] = {
    "dssm": (DSSM, "bce"),
    "youtube_dnn": (YouTubeDNN, "sampled_softmax"),
    "sasrec": (SASRec, "sampled_softmax"),
}
ALL_MODELS: tuple[str, ...] = (PRIMARY_MODEL, *ABLATIONS, *HEURISTIC_BASELINES, *LEARNT_BASELINES)
# The ModelConfig fields the learnt baselines read (their shape). A baseline's stored run is keyed by
# these alone, so it stays valid when Cold & Warm Net's own switches change.
BASELINE_MODEL_FIELDS: frozenset[str] = frozenset(
    {
        "embedding_dim",
        "hidden_dim",
        "feature_dim",
        "initial_scale",
        "sasrec_blocks",
        "sasrec_heads",
        "sasrec_dropout",
    }
)


@dataclass
class ExperimentOutcome:
    # Per model: the mean over its seeds, per-point values included (a single run as it is).
    results: dict[str, EvaluationResult]
    # Per trained model: the first seed's (the one a checkpoint stands for, exported by ``run``).
    trained: dict[str, TrainedModel] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)  # training seeds of the trained models
    # Per model: one result per seed (one for a deterministic baseline), and their spread.
    seed_results: dict[str, list[EvaluationResult]] = field(default_factory=dict)
    spread: dict[str, SeedSpread] = field(default_factory=dict)
    significance: Significance | None = None


def baseline_names() -> tuple[str, ...]:
    """Every baseline the primary model is compared with (not its ablations), read from the
    registries at call time so that a newly registered baseline counts."""
    return (*HEURISTIC_BASELINES, *LEARNT_BASELINES)


def seed_configs(config: TrainConfig, n_seeds: int) -> list[TrainConfig]:
    """The training configuration of each seed: ``config.seed + i`` for i < n_seeds."""
    if n_seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {n_seeds}")
    return [config.model_copy(update={"seed": config.seed + i}) for i in range(n_seeds)]


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
    if name == "onboarding_popular":
        onboarding = tune_first_n(context.data, context.split, catalog)
        details["onboarding_first_n"] = onboarding.best
        details["onboarding_validation_recall@50"] = onboarding.validation
        return onboarding.model
    tuning = tune_lambda(context.data, context.split, catalog)
    details["ease_lambda"] = tuning.best_lambda
    details["ease_validation_recall@50"] = tuning.validation
    return tuning.model


def effective_configs(
    name: str, model_config: ModelConfig, train_config: TrainConfig
) -> tuple[ModelConfig, TrainConfig]:
    """The configurations ``name`` is trained with: an ablation's switches flipped; a learnt baseline
    with its own loss, without distillation, and with every prefix sample weighted alike, as its
    authors train it (history_balance is Cold & Warm Net's choice: it moves weight to short histories,
    which would handicap SASRec and YouTubeDNN where they are strongest)."""
    if name in LEARNT_BASELINES:
        _, loss = LEARNT_BASELINES[name]
        train_config = train_config.model_copy(update={"loss": loss, "history_balance": 0.0})
        return model_config.model_copy(update={"use_dkd": False}), train_config
    return model_config.model_copy(update=ABLATIONS.get(name, {})), train_config


def train_variant(
    name: str,
    context: TrainingContext,
    model_config: ModelConfig,
    train_config: TrainConfig,
    groups: torch.Tensor | None,
    progress: bool,
) -> TrainedModel:
    model_config, train_config = effective_configs(name, model_config, train_config)
    if name in LEARNT_BASELINES:
        factory, _ = LEARNT_BASELINES[name]
        torch.manual_seed(train_config.seed)
        net = factory(context.encoder, model_config)
        return fit_two_tower(context, net, model_config, train_config, name, progress)
    return fit_cold_warm_net(context, model_config, train_config, name, progress, group_embeddings=groups)


def uses_user_groups(name: str, model_config: ModelConfig) -> bool:
    """Whether a trained model needs the pre-trained user groups (learnt baselines never do)."""
    return (
        model_config.use_group_attention
        and name not in LEARNT_BASELINES
        and ABLATIONS.get(name, {}).get("use_group_attention", True)
    )


def train_seed(
    name: str,
    context: TrainingContext,
    settings: Settings,
    train_config: TrainConfig,
    groups_by_seed: dict[int, torch.Tensor],
    progress: bool,
) -> TrainedModel:
    """Trains ``name`` with ``train_config``'s seed; the user groups of that seed are pre-trained once
    and shared by every variant (they do not depend on the variant)."""
    groups = None
    if uses_user_groups(name, settings.model):
        seed = train_config.seed
        if seed not in groups_by_seed:
            groups_by_seed[seed] = fit_user_groups(context, settings.model, train_config, progress)
        groups = groups_by_seed[seed]
    return train_variant(name, context, settings.model, train_config, groups, progress)


def log_result(name: str, result: EvaluationResult, label: str, seconds: float) -> None:
    headline = result.groups.get("all", {})
    log.info(
        "%s%s: all-users recall@50 %.4f ndcg@50 %.4f (%.0fs)",
        name,
        label,
        headline.get("recall@50", 0.0),
        headline.get("ndcg@50", 0.0),
        seconds,
    )


@dataclass(frozen=True)
class RunReuse:
    """Where per-seed runs are kept, and the models whose stored runs may stand in for training."""

    store: RunStore
    models: frozenset[str] = frozenset()
    # Take the seeds that are stored and train none: a model then counts as many runs as were stored.
    stored_only: bool = False


# The TrainConfig fields that only Cold & Warm Net's own recipe reads: left out of the baselines' keys
# (as its ModelConfig switches are), and out of the samples' key, which they do not shape.
COLD_WARM_NET_TRAIN_FIELDS: frozenset[str] = frozenset(
    {"warm_phase_epochs", "warm_phase_validation_group", "warm_phase_validation_metric"}
)


def stored_run_key(name: str, context: TrainingContext, settings: Settings, config: TrainConfig) -> str:
    data = context.data
    identity = {
        "name": data.name,
        "interactions": data_fingerprint(data),
        "users": len(data.users),
        "items": len(data.items),
    }
    model_config, train_config = effective_configs(name, settings.model, config)
    read = BASELINE_MODEL_FIELDS if name in LEARNT_BASELINES else None
    configs = {
        "features": settings.features.model_dump(mode="json"),
        "model": model_config.model_dump(mode="json", include=read),
        "train": train_config.model_dump(
            mode="json", exclude={"torch_threads", *(COLD_WARM_NET_TRAIN_FIELDS if read else ())}
        ),
        "samples": context.samples_config.model_dump(
            mode="json", exclude={"torch_threads", *COLD_WARM_NET_TRAIN_FIELDS}
        ),
    }
    return run_key(name, identity, configs)


def reused_run(
    name: str, key: str, reuse: RunReuse | None, outcome: ExperimentOutcome
) -> EvaluationResult | None:
    """The stored run of ``name`` under ``key`` when reuse of ``name`` was asked for and one is stored;
    the report's details then say which run stood in."""
    if reuse is None or name not in reuse.models:
        return None
    stored = reuse.store.load(name, key)
    if stored is None:
        log.info("%s: no stored run for key %s; training", name, key)
        return None
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stored.info.get("created", 0)))
    record = {k: stored.info.get(k) for k in ("seed", "commit", "epochs", "seconds")} | {"created": created}
    outcome.details.setdefault("reused_runs", {}).setdefault(name, []).append(record)
    log.info("%s seed %s: stored run from %s (commit %s)", name, record["seed"], created, record["commit"])
    return stored.result


def trained_runs(
    name: str,
    context: TrainingContext,
    settings: Settings,
    configs: Sequence[TrainConfig],
    outcome: ExperimentOutcome,
    groups_by_seed: dict[int, torch.Tensor],
    points: list[EvalPoint],
    progress: bool,
    reuse: RunReuse | None = None,
) -> list[EvaluationResult]:
    """One evaluation per seed of a trained model. The first seed's model comes from
    ``outcome.trained`` when given there and is kept there; later seeds' nets are dropped once
    evaluated (only their figures and training times are kept). With ``reuse``, every run is stored,
    and a stored run stands in for training the models ``reuse`` names."""
    catalog = context.data.catalog_item_ids()
    runs: list[EvaluationResult] = []
    for index, config in enumerate(configs):
        started = time.perf_counter()
        key = stored_run_key(name, context, settings, config) if reuse is not None else ""
        given = index == 0 and name in outcome.trained  # a first-seed model handed in is used as is
        stored = None if given else reused_run(name, key, reuse, outcome)
        if stored is not None:
            runs.append(stored)
            continue
        if reuse is not None and reuse.stored_only and name in reuse.models:
            log.info("%s seed %d: not stored; left out (stored runs only)", name, config.seed)
            continue
        model = outcome.trained.get(name) if index == 0 else None
        if model is None:
            model = train_seed(name, context, settings, config, groups_by_seed, progress)
        if index == 0:
            outcome.trained[name] = model
        ranker = ModelRanker(name, model.net, context.encoder, context.data.users, catalog)
        runs.append(evaluate(ranker, points, catalog, progress=progress))
        training = {"seed": config.seed, "epochs": len(model.epochs), "seconds": round(model.seconds, 1)}
        if reuse is not None:
            reuse.store.save(key, runs[-1], training)
        if len(configs) > 1:
            outcome.details.setdefault("seed_training", {}).setdefault(name, []).append(training)
            label = f" seed {config.seed} ({index + 1}/{len(configs)})"
            log_result(name, runs[-1], label, time.perf_counter() - started)
    return runs


def run_experiments(
    context: TrainingContext,
    settings: Settings,
    models: Sequence[str],
    progress: bool = True,
    trained: dict[str, TrainedModel] | None = None,
    test_points: list[EvalPoint] | None = None,
    seeds: int = 1,
    reuse: RunReuse | None = None,
    only_seeds: Sequence[int] | None = None,
) -> ExperimentOutcome:
    """Trains (unless given in ``trained``) and evaluates ``models`` on the test users.

    Every trained model is trained ``seeds`` times, with seeds ``settings.train.seed + i``; ``trained``
    holds first-seed models. Deterministic baselines run once. Each model's result is the mean over its
    seeds; the primary model is then compared with the best baseline of each group. ``reuse``: see
    ``trained_runs``. ``only_seeds``: of those seeds, train just these (their runs go to the run
    store, for a later run to take with ``reuse``: one process per seed on a machine with spare cores).
    """
    models = check_model_names(models)
    configs = seed_configs(settings.train, seeds)
    if only_seeds is not None:
        chosen = [config for config in configs if config.seed in set(only_seeds)]
        if not chosen:
            raise ValueError(f"none of the seeds {list(only_seeds)} is among {[c.seed for c in configs]}")
        configs = chosen
    catalog = context.data.catalog_item_ids()
    points = test_points if test_points is not None else build_eval_points(context.data, context.split.test)
    outcome = ExperimentOutcome(
        results={}, trained=dict(trained or {}), seeds=[config.seed for config in configs]
    )
    outcome.details["test_points"] = len(points)
    if seeds > 1:
        outcome.details["seeds"] = outcome.seeds
    groups_by_seed: dict[int, torch.Tensor] = {}
    for name in models:
        started = time.perf_counter()
        if name in HEURISTIC_BASELINES:
            ranker = heuristic_ranker(name, context, catalog, outcome.details)
            runs = [evaluate(ranker, points, catalog, progress=progress)]
        else:
            runs = trained_runs(
                name, context, settings, configs, outcome, groups_by_seed, points, progress, reuse
            )
        if not runs:
            log.warning("%s: no stored run; left out of the comparison", name)
            continue
        outcome.seed_results[name] = runs
        outcome.results[name] = mean_over_seeds(runs)
        outcome.spread[name] = spread_over_seeds(runs)
        outcome.details.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        label = f" (mean of {len(runs)} seeds)" if len(runs) > 1 else ""
        log_result(name, outcome.results[name], label, time.perf_counter() - started)
    outcome.significance = compare_with_best_baselines(
        outcome.results, PRIMARY_MODEL, baseline_names(), HEADLINE_METRICS
    )
    return outcome
