"""Training of Cold & Warm Net: pre-training for the user groups, MI selection for the bias net, then
the main loop with dynamic knowledge distillation and early stopping on validation users."""

from __future__ import annotations

import copy
import inspect
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from model import distributed
from model.data.schema import InteractionData
from model.data.split import UserSplit
from model.distillation import distillation_loss, distillation_mask
from model.evaluation.protocol import WARM_UP_FROM, EvalPoint, build_eval_points, evaluate, groups_of
from model.features import FeatureEncoder
from model.losses import Candidates, bce_candidates, per_sample_loss, positive_columns, softmax_candidates
from model.mutual_info import BiasFeatureSelection, select_bias_features
from model.nn.cold_warm_net import (
    USER_BIAS_CANDIDATES,
    ColdWarmNet,
    item_bias_candidate_names,
    stage_popularity_stages,
)
from model.nn.two_tower import TwoTowerNet
from model.ranker import ModelRanker
from model.samples import (
    SAMPLE_FIELDS,
    TrainingSamples,
    UserSequences,
    build_training_samples,
    history_lengths,
    sample_weights,
)
from model.settings import ModelConfig, TrainConfig
from model.stage_popularity import stage_popularity_columns
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
        if config.same_moment_order == "shuffled":
            sequences = sequences.same_moment_shuffled(np.random.default_rng(config.seed))
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

    def check_samples_for(self, config: TrainConfig) -> None:
        """Raises when ``config`` asks for other samples than these were built with: a training would
        otherwise run, silently, on the samples of another configuration."""
        differ = [
            f"{name} {getattr(self.samples_config, name)!r} (asked: {getattr(config, name)!r})"
            for name in SAMPLE_FIELDS
            if getattr(self.samples_config, name) != getattr(config, name)
        ]
        if differ:
            raise ValueError(
                "the training samples were built with "
                + ", ".join(differ)
                + ": build the TrainingContext with the training's configuration"
            )


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


def candidate_rows(candidates: Candidates, rows: slice) -> Candidates:
    """The candidates of some rows of the batch they were drawn for: a list shared by the batch
    (sampled softmax) stays whole, with those rows' positive columns and accidental hits; per-sample
    lists (bce) keep those rows."""
    if candidates.log_q is None:
        return Candidates(candidates.positions[rows], None, None, None)
    assert candidates.positive_column is not None and candidates.accidental_hits is not None
    return Candidates(
        candidates.positions,
        candidates.log_q,
        candidates.positive_column[rows],
        candidates.accidental_hits[rows],
    )


def distillable(history: torch.Tensor, model_config: ModelConfig) -> torch.Tensor | None:
    """The samples DKD may distil (None: all of them)."""
    if model_config.dkd_scope == "cold_start":
        return history_lengths(history) < WARM_UP_FROM
    return None


def training_device(config: TrainConfig, layout: distributed.ProcessLayout | None = None) -> torch.device:
    """Where this process trains: with several processes on CUDA, the GPU of its LOCAL_RANK."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("COLDWARM_TRAIN__DEVICE=cuda, but torch sees no CUDA device; use cpu or auto")
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    layout = layout or distributed.current()
    if kind == "cuda" and layout.distributed:
        return torch.device("cuda", layout.local_rank)
    return torch.device(kind)


def on_device(candidates: Candidates, device: torch.device) -> Candidates:
    def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device, non_blocking=True)

    return Candidates(
        candidates.positions.to(device, non_blocking=True),
        moved(candidates.log_q),
        moved(candidates.positive_column),
        moved(candidates.accidental_hits),
    )


@dataclass(frozen=True)
class GlobalBatch:
    """With several processes: the targets of the whole (global) batch, and which of its rows this
    process computes."""

    targets: torch.Tensor
    rows: slice


def unwrapped(net: torch.nn.Module) -> TwoTowerNet:
    """The net itself, out of a DistributedDataParallel wrapper if it is in one."""
    inner = net.module if isinstance(net, DistributedDataParallel) else net
    assert isinstance(inner, TwoTowerNet)
    return inner


def training_step(
    net: torch.nn.Module,
    batch: tuple[torch.Tensor, ...],
    config: TrainConfig,
    model_config: ModelConfig,
    use_dkd: bool,
    item_log_q: torch.Tensor,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    global_batch: GlobalBatch | None = None,
) -> tuple[torch.Tensor, float]:
    """Loss of one batch: L + alpha * L_d, each sample's L weighted by ``weights`` when given; also the
    fraction of samples that were distilled. The batch arrives on the CPU and is computed on the net's
    device; the candidates are drawn on the CPU, so that one seed draws the same ones on any device.

    ``net`` is a TwoTowerNet or the DistributedDataParallel wrapping one: the scores come from its
    ``forward``, which is what DDP hooks to average the gradients. With ``global_batch``, ``batch``
    is this process's rows of a larger batch, and the candidates are drawn for the whole of it (see
    ``run_epochs``)."""
    model = unwrapped(net)
    device = model.log_scale.device
    candidates = make_candidates(
        batch[3] if global_batch is None else global_batch.targets,
        config,
        model.n_items,
        item_log_q,
        generator,
    )
    if global_batch is not None:
        candidates = candidate_rows(candidates, global_batch.rows)
    candidates = on_device(candidates, device)
    profile, history, state, _ = (tensor.to(device, non_blocking=True) for tensor in batch)
    if weights is not None:
        weights = weights.to(device, non_blocking=True)
    scores = net(profile, history, state, candidates.positions, use_dkd, positive_columns(candidates))
    losses = per_sample_loss(scores.logits, candidates)
    loss = (losses * weights).mean() if weights is not None else losses.mean()
    distilled = 0.0
    if use_dkd:
        with torch.no_grad():
            cold_loss = per_sample_loss(scores.cold, candidates)
            warm_loss = per_sample_loss(scores.warm, candidates)
        scope = distillable(history, model_config)
        gap = distillation_loss(scores.cold, scores.warm, cold_loss, warm_loss, scope)
        loss = loss + model_config.dkd_alpha * gap
        distilled = float(distillation_mask(cold_loss, warm_loss, scope).float().mean())
    return loss, distilled


def item_log_frequencies(samples: TrainingSamples, n_items: int) -> torch.Tensor:
    counts = torch.bincount(samples.target, minlength=n_items).double() + 1.0
    return (counts / counts.sum()).log().float()


@dataclass(frozen=True)
class BatchShare:
    """One step of one process: the sample indices of the global batch, and the rows of it that are
    this process's."""

    index: torch.Tensor
    rows: slice

    @property
    def own(self) -> torch.Tensor:
        return self.index[self.rows]


def epoch_batches(
    order: torch.Tensor, batch_size: int, world_size: int = 1, rank: int = 0
) -> list[BatchShare]:
    """Rank ``rank``'s share of each global batch of ``order``, an epoch's permutation of the samples.

    Global batch k is ``order[k * batch_size : (k + 1) * batch_size]`` with any number of processes,
    as with one: every rank draws the same permutation (same seed) and takes the k-th contiguous
    ``len(batch) // world_size`` of each batch (``batch_size / world_size`` for a full one). The
    shares are disjoint and together the batch, save the last batch's remainder of at most
    ``world_size - 1`` samples, which is dropped: every rank runs the same number of steps with the
    same batch sizes, so no rank waits on another at the all-reduce. One process keeps every sample.
    """
    shares = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        size = len(index) // world_size
        if size == 0:
            break
        shares.append(BatchShare(index, slice(rank * size, (rank + 1) * size)))
    return shares


def check_batch_size(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ValueError(
            f"the batch size {batch_size} is the global batch and must split evenly over {world_size} "
            f"processes (each takes batch_size / {world_size} per step): choose a multiple of {world_size}"
        )


def wrapped_for_training(
    net: TwoTowerNet, device: torch.device, layout: distributed.ProcessLayout
) -> torch.nn.Module:
    """The net that training calls: the net itself, or with several processes its DDP wrapper.

    DDP starts every rank from rank 0's weights and averages the gradients during backward. The
    buffers (item inputs, the user groups, bias columns) never change in training and are the same
    on every rank, so they are not broadcast at each step. ``static_graph``: every step runs the
    same code, so the parameters that get no gradient (the bias net the pre-training switches off,
    the user bias under sampled softmax) are found once, and keep no gradient, as with one process.
    """
    if not layout.distributed:
        return net
    # Spelt forward_sync_buffers since torch 2.13 (broadcast_buffers=False warns there, and also skips
    # the sync at the start, which is harmless: the buffers are equal on every rank anyway).
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        net,
        device_ids=[device.index] if device.type == "cuda" else None,
        static_graph=True,
        **no_buffer_sync,
    )


def run_epochs(
    net: TwoTowerNet,
    context: TrainingContext,
    config: TrainConfig,
    model_config: ModelConfig,
    epochs: int,
    label: str,
    validate: bool,
    progress: bool,
    keep_start: bool = False,
) -> list[dict[str, float]]:
    """Adam over shuffled samples; keeps the weights of the best validation epoch when validating
    (with ``keep_start``, the weights it started from are a candidate too). Parameters that do not
    require grad stay as they are.

    Runs on ``config.device``; the net is handed back on the CPU, where export and evaluation read it.

    Under torchrun (``model.distributed.current()`` of world size N > 1), DistributedDataParallel:

    - ``config.batch_size`` stays the global batch: each rank computes ``batch_size / N`` samples of
      it per step (``epoch_batches``), and the averaged gradient is that of the whole batch.
    - The generator that draws the permutation and the candidates is seeded alike on every rank and
      draws the same amounts there (same steps, same batch sizes), so the ranks stay in step.
    - Negatives: every rank draws the candidates of the whole global batch (``GlobalBatch``) and
      scores its own users against them. The in-batch negatives of sampled softmax are thus the
      targets of the global batch, and the shared uniform negatives are the same on every rank: the
      candidates of a step are exactly those of one process with the same batch. This needs no
      gather: every rank holds all the samples and the same permutation, so it knows the other
      ranks' targets, and item scores come from item ids through its own item tower. It costs the
      item side of the batch on each rank (the user tower, the larger part, is split). bce's
      per-sample negatives are the rows of the global batch's draw as well.
    - What still differs from one process: dropout masks (each rank's torch generator is seeded
      alike, so the j-th sample of every rank's share gets the same mask, not the one a single
      process would draw), the order of float sums in the all-reduce, and the at most N - 1 samples
      an epoch drops. The runs agree in distribution, not bit for bit.
    - Rank 0 validates and decides early stopping; the decision is broadcast, and at the end every
      rank loads rank 0's best weights.
    """
    context.check_samples_for(config)
    layout = distributed.current()
    check_batch_size(config.batch_size, layout.world_size)
    device = training_device(config, layout)
    net.to(device)
    wrapped = wrapped_for_training(net, device, layout)
    progress = progress and layout.is_main
    generator = torch.Generator().manual_seed(config.seed)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    item_log_q = item_log_frequencies(context.samples, net.n_items)
    use_dkd = model_config.use_dkd and model_config.use_cold_expert and model_config.use_warm_expert
    weights = sample_weights(context.samples, config.history_balance)
    history: list[dict[str, float]] = []
    best_score, stale = -1.0, 0
    best_state = copy.deepcopy(net.state_dict()) if layout.is_main else None
    if validate and keep_start and layout.is_main:
        best_score = validation_score(net, context, config)
        log.info("%s starts at validation %.4f", label, best_score)
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(context.samples), generator=generator)
        shares = epoch_batches(order, config.batch_size, layout.world_size, layout.rank)
        bar = tqdm(
            shares, desc=f"{label} epoch {epoch}/{epochs}", unit="batch", disable=not progress, leave=False
        )
        total, distilled_total, steps = 0.0, 0.0, 0
        for share in bar:
            index = share.own
            batch_weights = weights[index] if weights is not None else None
            loss, distilled = training_step(
                wrapped,
                context.samples.batch(index),
                config,
                model_config,
                use_dkd,
                item_log_q,
                generator,
                batch_weights,
                GlobalBatch(context.samples.target[share.index], share.rows) if layout.distributed else None,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, distilled_total, steps = total + loss.item(), distilled_total + distilled, steps + 1
            if steps % 50 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        # Every rank has the same number of steps: the mean of the ranks' means is the global one.
        mean_loss, mean_distilled = distributed.mean_over_ranks(
            [total / max(steps, 1), distilled_total / max(steps, 1)]
        )
        record = {"epoch": float(epoch), "loss": mean_loss, "distilled": mean_distilled}
        stop = False
        if validate:
            decision = None
            if layout.is_main:
                score = validation_score(net, context, config)
                if score > best_score:
                    best_score, best_state, stale = score, copy.deepcopy(net.state_dict()), 0
                else:
                    stale += 1
                decision = (score, stale > config.patience)
            record["validation"], stop = distributed.broadcast_object(decision)
        history.append(record)
        log.info("%s epoch %d: %s", label, epoch, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
        if stop:
            break
    del wrapped
    if validate:
        if best_state is not None:
            net.load_state_dict(best_state)
        distributed.broadcast_module(net)
    net.cpu()
    return history


def stage_popularity(
    context: TrainingContext, model_config: ModelConfig, n_items: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage popularity columns (counted, and without each sample's own count), counted once on
    rank 0 and sent to the others."""
    columns = None
    if distributed.current().is_main:
        stages = stage_popularity_stages(context.encoder, model_config)
        columns = stage_popularity_columns(context.samples, stages, n_items)
    columns = distributed.broadcast_object(columns)
    return torch.as_tensor(columns.counted), torch.as_tensor(columns.without_own)


def fit_user_groups(
    context: TrainingContext, model_config: ModelConfig, config: TrainConfig, progress: bool
) -> torch.Tensor:
    """Pre-trains the warm expert alone, embeds the most active train users, clusters them.

    With several processes the pre-training is distributed like the main loop, and k-means runs once,
    on rank 0, whose groups every rank receives."""
    pretrain_config = model_config.model_copy(
        update={
            "use_cold_expert": False,
            "use_group_attention": False,
            "use_bias_net": False,
            "use_dkd": False,
            # The groups live in the experts' own d-dimensional space, which is e_u only when the
            # experts' embeddings (not their scores) are mixed, without the state term.
            "expert_mixing": "embedding",
            "state_item_dims": 0,
            "stage_popularity": False,
        }
    )
    torch.manual_seed(config.seed)
    pretrained = ColdWarmNet(context.encoder, pretrain_config)
    run_epochs(
        pretrained, context, config, pretrain_config, config.pretrain_epochs, "pretrain", False, progress
    )
    groups = None
    if distributed.current().is_main:
        rows = most_active_rows(context.samples, config.active_users)
        pretrained.eval()
        groups = cluster_group_embeddings(
            embed_rows(pretrained.user_tower, context.samples, rows), model_config.n_user_groups, config.seed
        )
        log.info("clustered %d active users into %d groups", len(rows), model_config.n_user_groups)
    return torch.as_tensor(distributed.broadcast_object(groups))


def cold_side_parameters(net: ColdWarmNet) -> list[torch.nn.Parameter]:
    """What ranks a user with no history: the profile tables, the cold expert and the group attention
    it shares with the warm one, the (cold) item tower, both bias nets, the state term and the scale."""
    tower, scorer = net.user_tower, net.item_scorer
    modules = (
        tower.profile, tower.expert_state, tower.cold, tower.user_bias, tower.state_items,
        scorer.tower, scorer.item_bias, scorer.state_items,
    )  # fmt: skip
    parameters = [p for module in modules if module is not None for p in module.parameters()]
    return [*parameters, *([net.log_scale] if isinstance(net.log_scale, torch.nn.Parameter) else [])]


def fit_warm_phase(
    net: ColdWarmNet,
    context: TrainingContext,
    model_config: ModelConfig,
    config: TrainConfig,
    name: str,
    progress: bool,
    after_epoch: int,
) -> list[dict[str, float]]:
    """``config.warm_phase_epochs`` more epochs of the warm side, the cold side frozen (see
    ``TrainConfig.warm_phase_epochs``); the net it starts from stays unless an epoch validates better.
    Its records are numbered on from ``after_epoch`` and carry ``warm_phase_validation`` (its own
    group and metric), not ``validation``."""
    frozen = cold_side_parameters(net)
    for parameter in frozen:
        parameter.requires_grad_(False)
    phase = config.model_copy(
        update={
            "validation_group": config.warm_phase_validation_group,
            "validation_metric": config.warm_phase_validation_metric,
            "seed": config.seed + 1,
        }
    )
    try:
        records = run_epochs(
            net, context, phase, model_config, config.warm_phase_epochs, f"{name} warm phase", True,
            progress, keep_start=True,
        )  # fmt: skip
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    return [
        {
            **{k: v for k, v in r.items() if k != "validation"},
            "epoch": after_epoch + r["epoch"],
            "warm_phase_validation": r["validation"],
        }
        for r in records
    ]


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
        # Chosen once, on rank 0 (the same seeded choice on every rank, but computed once and sent).
        if distributed.current().is_main:
            probe = ColdWarmNet(context.encoder, model_config)
            selection = select_bias_features(
                context.samples,
                probe.item_scorer.bias_candidates,
                user_bias_candidates(config),
                item_bias_candidate_names(context.encoder),
                model_config.bias_features,
                config.seed,
            )
        selection = distributed.broadcast_object(selection)
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
    if model_config.stage_popularity:
        net.set_stage_popularity(*stage_popularity(context, model_config, net.n_items))
    trained = fit_two_tower(context, net, model_config, config, name, progress, selection, started)
    if config.warm_phase_epochs and model_config.use_cold_expert and model_config.use_warm_expert:
        continue_with_warm_phase(trained, context, config, progress)
    return trained


def continue_with_warm_phase(
    trained: TrainedModel, context: TrainingContext, config: TrainConfig, progress: bool
) -> None:
    """``fit_warm_phase`` on a trained Cold & Warm Net, in place: its records follow the main loop's,
    its seconds are added, and the net is handed back in eval mode."""
    started = time.perf_counter()
    assert isinstance(trained.net, ColdWarmNet)
    trained.epochs += fit_warm_phase(
        trained.net, context, trained.model_config, config, trained.name, progress, len(trained.epochs)
    )
    trained.net.eval()
    trained.seconds += time.perf_counter() - started


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
