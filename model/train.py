"""Training of Cold & Warm Net: pre-training for the user groups, MI selection for the bias net, then
the main loop with dynamic knowledge distillation and early stopping on validation users."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from model.data.schema import InteractionData
from model.data.split import UserSplit
from model.distillation import distillation_loss, distillation_mask
from model.evaluation.protocol import WARM_UP_FROM, EvalPoint, build_eval_points, evaluate, groups_of
from model.features import FeatureEncoder
from model.losses import Candidates, bce_candidates, per_sample_loss, softmax_candidates
from model.mutual_info import BiasFeatureSelection, select_bias_features
from model.nn.cold_warm_net import USER_BIAS_CANDIDATES, ColdWarmNet, item_bias_candidate_names
from model.nn.two_tower import TwoTowerNet
from model.ranker import ModelRanker
from model.samples import (
    TrainingSamples,
    UserSequences,
    build_training_samples,
    history_balance_weights,
    history_lengths,
)
from model.settings import ModelConfig, TrainConfig
from model.user_groups import cluster_group_embeddings, embed_rows, most_active_rows

log = logging.getLogger(__name__)


@dataclass
class TrainingContext:
    """What every model trained on one data set and split shares: encoder, samples, validation points."""

    data: InteractionData
    split: UserSplit
    encoder: FeatureEncoder
    samples: TrainingSamples
    validation_points: list[EvalPoint]
    # What drew the samples' request times (its seed and session-start settings): a trained run depends
    # on it as much as on the run's own training configuration.
    samples_config: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def build(
        cls,
        data: InteractionData,
        split: UserSplit,
        encoder: FeatureEncoder,
        config: TrainConfig | None = None,
    ) -> TrainingContext:
        """Samples of the train users (request times as ``config`` says), and ``encoder``'s state
        coverage fitted to them: every state bucket is then served as one that training updates."""
        started = time.perf_counter()
        config = config or TrainConfig()
        sequences = UserSequences.from_interactions(data.interactions, split.train)
        samples = build_training_samples(data.users, sequences, encoder, config)
        encoder.fit_state_coverage(samples.state.numpy())
        samples.state = torch.as_tensor(encoder.serve_state_buckets(samples.state.numpy()))
        points = build_eval_points(data, split.validation)
        log.info(
            "built %d training samples from %d train users in %.1fs; state buckets served as another: %s",
            len(samples),
            len(split.train),
            time.perf_counter() - started,
            encoder.remapped_state_buckets(),
        )
        return cls(data, split, encoder, samples, points, config)


@dataclass
class TrainedModel:
    name: str
    net: TwoTowerNet
    encoder: FeatureEncoder
    model_config: ModelConfig
    train_config: TrainConfig
    bias_features: BiasFeatureSelection | None
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def validation_score(net: torch.nn.Module, context: TrainingContext, config: TrainConfig) -> float:
    points = [p for p in context.validation_points if config.validation_group in groups_of(p.h)]
    if not points:
        return 0.0
    ranker = ModelRanker(
        "validation", net, context.encoder, context.data.users, context.data.catalog_item_ids()
    )
    result = evaluate(ranker, points, context.data.catalog_item_ids(), progress=False)
    return float(result.groups[config.validation_group][config.validation_metric])


def make_candidates(
    targets: torch.Tensor,
    config: TrainConfig,
    n_items: int,
    item_log_q: torch.Tensor,
    generator: torch.Generator,
) -> Candidates:
    if config.loss == "bce":
        return bce_candidates(targets, config.negatives, n_items, generator)
    return softmax_candidates(targets, config.shared_negatives, n_items, item_log_q, generator)


def candidate_logits(
    e_user: torch.Tensor,
    b_user: torch.Tensor,
    e_items: torch.Tensor,
    b_items: torch.Tensor,
    scale: torch.Tensor,
    per_sample: bool,
) -> torch.Tensor:
    """Scores of each user against its own candidates (B, C) or a shared list (C)."""
    if per_sample:
        batch, columns = b_items.shape
        cosine = torch.einsum("bd,bcd->bc", e_user, e_items.view(batch, columns, -1))
        return scale * cosine + b_user.unsqueeze(1) + b_items
    return scale * (e_user @ e_items.t()) + b_user.unsqueeze(1) + b_items.unsqueeze(0)


def distillable(history: torch.Tensor, model_config: ModelConfig) -> torch.Tensor | None:
    """The samples DKD may distil (None: all of them)."""
    if model_config.dkd_scope == "cold_start":
        return history_lengths(history) < WARM_UP_FROM
    return None


def training_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("COLDWARM_TRAIN__DEVICE=cuda, but torch sees no CUDA device; use cpu or auto")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def on_device(candidates: Candidates, device: torch.device) -> Candidates:
    def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device, non_blocking=True)

    return Candidates(
        candidates.positions.to(device, non_blocking=True),
        moved(candidates.log_q),
        moved(candidates.positive_column),
        moved(candidates.accidental_hits),
    )


def training_step(
    net: TwoTowerNet,
    batch: tuple[torch.Tensor, ...],
    config: TrainConfig,
    model_config: ModelConfig,
    use_dkd: bool,
    item_log_q: torch.Tensor,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Loss of one batch: L + alpha * L_d, each sample's L weighted by ``weights`` when given; also the
    fraction of samples that were distilled. The batch arrives on the CPU and is computed on the net's
    device; the candidates are drawn on the CPU, so that one seed draws the same ones on any device."""
    device = net.log_scale.device
    candidates = on_device(make_candidates(batch[3], config, net.n_items, item_log_q, generator), device)
    profile, history, state, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
    if weights is not None:
        weights = weights.to(device, non_blocking=True)
    if use_dkd:
        e_u, b_u, _, e_cold, e_warm = net.user_tower.experts(profile, history, state)
    else:
        e_u, b_u, _ = net.user_tower(profile, history, state)
    per_sample = candidates.log_q is None
    e_i, b_i = net.item_scorer(candidates.positions.reshape(-1))
    if per_sample:
        b_i = b_i.view(candidates.positions.shape)
    scale = net.scale
    losses = per_sample_loss(candidate_logits(e_u, b_u, e_i, b_i, scale, per_sample), candidates)
    loss = (losses * weights).mean() if weights is not None else losses.mean()
    distilled = 0.0
    if use_dkd:
        # Only the cold expert learns from the distillation: items, biases and the scale are fixed
        # here, or the gap would also be closed by flattening every score (a smaller scale).
        fixed_items, fixed_bias, fixed_scale = e_i.detach(), b_i.detach(), scale.detach()
        cold_logits = candidate_logits(e_cold, b_u.detach(), fixed_items, fixed_bias, fixed_scale, per_sample)
        with torch.no_grad():
            warm_logits = candidate_logits(e_warm, b_u, fixed_items, fixed_bias, fixed_scale, per_sample)
            cold_loss = per_sample_loss(cold_logits, candidates)
            warm_loss = per_sample_loss(warm_logits, candidates)
        scope = distillable(history, model_config)
        gap = distillation_loss(cold_logits, warm_logits, cold_loss, warm_loss, scope)
        loss = loss + model_config.dkd_alpha * gap
        distilled = float(distillation_mask(cold_loss, warm_loss, scope).float().mean())
    return loss, distilled


def item_log_frequencies(samples: TrainingSamples, n_items: int) -> torch.Tensor:
    counts = torch.bincount(samples.target, minlength=n_items).double() + 1.0
    return (counts / counts.sum()).log().float()


def run_epochs(
    net: TwoTowerNet,
    context: TrainingContext,
    config: TrainConfig,
    model_config: ModelConfig,
    epochs: int,
    label: str,
    validate: bool,
    progress: bool,
) -> list[dict[str, float]]:
    """Adam over shuffled samples; keeps the weights of the best validation epoch when validating.

    Runs on ``config.device``; the net is handed back on the CPU, where export and evaluation read it."""
    device = training_device(config)
    net.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    item_log_q = item_log_frequencies(context.samples, net.n_items)
    use_dkd = model_config.use_dkd and model_config.use_cold_expert and model_config.use_warm_expert
    weights = (
        history_balance_weights(context.samples, config.history_balance) if config.history_balance else None
    )
    history: list[dict[str, float]] = []
    best_score, best_state, stale = -1.0, copy.deepcopy(net.state_dict()), 0
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(context.samples), generator=generator)
        batches = range(0, len(order), config.batch_size)
        bar = tqdm(
            batches, desc=f"{label} epoch {epoch}/{epochs}", unit="batch", disable=not progress, leave=False
        )
        total, distilled_total, steps = 0.0, 0.0, 0
        for start in bar:
            index = order[start : start + config.batch_size]
            batch_weights = weights[index] if weights is not None else None
            loss, distilled = training_step(
                net,
                context.samples.batch(index),
                config,
                model_config,
                use_dkd,
                item_log_q,
                generator,
                batch_weights,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, distilled_total, steps = total + loss.item(), distilled_total + distilled, steps + 1
            if steps % 50 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        record = {
            "epoch": float(epoch),
            "loss": total / max(steps, 1),
            "distilled": distilled_total / max(steps, 1),
        }
        if validate:
            record["validation"] = validation_score(net, context, config)
            if record["validation"] > best_score:
                best_score, best_state, stale = record["validation"], copy.deepcopy(net.state_dict()), 0
            else:
                stale += 1
        history.append(record)
        log.info("%s epoch %d: %s", label, epoch, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
        if validate and stale > config.patience:
            break
    if validate:
        net.load_state_dict(best_state)
    net.cpu()
    return history


def fit_user_groups(
    context: TrainingContext, model_config: ModelConfig, config: TrainConfig, progress: bool
) -> torch.Tensor:
    """Pre-trains the warm expert alone, embeds the most active train users, clusters them."""
    pretrain_config = model_config.model_copy(
        update={
            "use_cold_expert": False,
            "use_group_attention": False,
            "use_bias_net": False,
            "use_dkd": False,
        }
    )
    torch.manual_seed(config.seed)
    pretrained = ColdWarmNet(context.encoder, pretrain_config)
    run_epochs(
        pretrained, context, config, pretrain_config, config.pretrain_epochs, "pretrain", False, progress
    )
    rows = most_active_rows(context.samples, config.active_users)
    pretrained.eval()
    groups = cluster_group_embeddings(
        embed_rows(pretrained.user_tower, context.samples, rows), model_config.n_user_groups, config.seed
    )
    log.info("clustered %d active users into %d groups", len(rows), model_config.n_user_groups)
    return torch.as_tensor(groups)


def user_bias_candidates(config: TrainConfig) -> list[str]:
    """User-side bias features only for BCE: in a softmax over items a per-user constant cancels, so
    b_u gets no gradient and Adam turns rounding noise into a random walk of its weights."""
    return list(USER_BIAS_CANDIDATES) if config.loss == "bce" else []


def fit_cold_warm_net(
    context: TrainingContext,
    model_config: ModelConfig,
    config: TrainConfig,
    name: str = "cold_warm_net",
    progress: bool = True,
    group_embeddings: torch.Tensor | None = None,
) -> TrainedModel:
    """The whole recipe for one configuration (the ablations switch parts off in ``model_config``)."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    selection = None
    if model_config.use_bias_net:
        probe = ColdWarmNet(context.encoder, model_config)
        selection = select_bias_features(
            context.samples,
            probe.item_scorer.bias_candidates,
            user_bias_candidates(config),
            item_bias_candidate_names(context.encoder),
            model_config.bias_features,
            config.seed,
        )
        log.info("bias net features (MI): %s", selection.names)
    uses_groups = model_config.use_group_attention and (
        model_config.use_cold_expert or model_config.use_warm_expert
    )
    if uses_groups and group_embeddings is None:
        group_embeddings = fit_user_groups(context, model_config, config, progress)
    torch.manual_seed(config.seed)
    net = ColdWarmNet(
        context.encoder,
        model_config,
        selection.user_columns if selection else None,
        selection.item_columns if selection else None,
    )
    if uses_groups and group_embeddings is not None:
        net.user_tower.attention.set_groups(group_embeddings)
    return fit_two_tower(context, net, model_config, config, name, progress, selection, started)


def fit_two_tower(
    context: TrainingContext,
    net: TwoTowerNet,
    model_config: ModelConfig,
    config: TrainConfig,
    name: str,
    progress: bool = True,
    selection: BiasFeatureSelection | None = None,
    started: float | None = None,
) -> TrainedModel:
    """Trains any two-tower net with early stopping; DKD applies only where ``model_config`` asks for it."""
    started = time.perf_counter() if started is None else started
    epochs = run_epochs(net, context, config, model_config, config.epochs, name, True, progress)
    net.eval()
    return TrainedModel(
        name, net, context.encoder, model_config, config, selection, epochs, time.perf_counter() - started
    )


def set_torch_threads(config: TrainConfig) -> None:
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
