"""Training with several processes (torchrun, DistributedDataParallel over gloo on these CPUs).

- The process layout comes from torchrun's variables, and without them nothing changes.
- Each rank's share of an epoch: disjoint, the same number of equal batches on every rank.
- The candidates of a step are the global batch's: two ranks' losses and gradients average to one
  process's on the same batch.
- One process trains exactly as before scoring moved into ``TwoTowerNet.forward`` (recorded losses,
  and the step as it was, side by side).
- The collectives between two real gloo processes.
- End to end: ``torchrun --nproc-per-node 2 -m coldwarm train`` writes one checkpoint (rank 0's),
  validates within 0.01 of one process, and its export is built into an index and served.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from model_fixtures import one_torch_thread
from typer.testing import CliRunner

import model.train as train
from coldwarm import cli
from model import distributed
from model.checkpoint import load_checkpoint
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.distillation import distillation_loss, distillation_mask
from model.distributed import LayoutError, ProcessLayout, backend_for, process_group
from model.features import FeatureEncoder
from model.losses import per_sample_loss
from model.nn.cold_warm_net import ColdWarmNet
from model.nn.two_tower import candidate_logits
from model.settings import FeatureConfig, ModelConfig, TrainConfig
from model.train import (
    GlobalBatch,
    TrainingContext,
    check_batch_size,
    distillable,
    epoch_batches,
    item_log_frequencies,
    make_candidates,
    on_device,
    run_epochs,
    training_step,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

TORCHRUN_ENV = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29511",
}

# ----- layout ------------------------------------------------------------------------------------------


def test_without_torchrun_variables_one_process_runs_alone() -> None:
    layout = ProcessLayout.from_env({})
    assert layout == ProcessLayout(rank=0, world_size=1, local_rank=0)
    assert not layout.distributed and layout.is_main
    assert not distributed.launched_by_torchrun({})


def test_the_layout_is_read_from_torchruns_variables() -> None:
    layout = ProcessLayout.from_env(TORCHRUN_ENV)
    assert (layout.rank, layout.world_size, layout.local_rank) == (1, 2, 1)
    assert layout.distributed and not layout.is_main
    assert distributed.launched_by_torchrun(TORCHRUN_ENV)
    # torchrun --nproc-per-node 1: one process, which joins no group.
    alone = ProcessLayout.from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert not alone.distributed and alone.is_main


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RANK": "2"}, "do not fit WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "must be integers"),
        ({"MASTER_PORT": ""}, "without MASTER_PORT"),
    ],
)
def test_contradictory_torchrun_variables_are_refused(change: dict[str, str], message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        ProcessLayout.from_env({**TORCHRUN_ENV, **change})


def test_variables_alone_join_nothing_and_every_helper_hands_its_argument_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    assert distributed.current() == ProcessLayout()  # no process group joined: one process
    tensor, module = torch.arange(3.0), torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert distributed.broadcast_tensor(tensor) is tensor
    assert distributed.broadcast_object(None) is None
    assert distributed.mean_over_ranks([1.5, 2.0]) == [1.5, 2.0]
    distributed.broadcast_module(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    with process_group(ProcessLayout(), torch.device("cpu")) as layout:
        assert layout == ProcessLayout() and not torch.distributed.is_initialized()


def test_gloo_on_the_cpu_nccl_on_gpus() -> None:
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"


def test_each_process_trains_on_the_gpu_of_its_local_rank() -> None:
    cpu = TrainConfig(device="cpu")
    assert train.training_device(cpu, ProcessLayout(1, 2, 1)) == torch.device("cpu")
    if torch.cuda.is_available():
        cuda = TrainConfig(device="cuda")
        assert train.training_device(cuda, ProcessLayout(1, 2, 1)) == torch.device("cuda", 1)
        assert train.training_device(cuda, ProcessLayout()) == torch.device("cuda")


# ----- sharding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch_size", "world_size"), [(1000, 96, 2), (1000, 96, 3), (97, 96, 2)])
def test_ranks_take_disjoint_equal_shares_of_every_global_batch(
    n: int, batch_size: int, world_size: int
) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    per_rank = [epoch_batches(order, batch_size, world_size, rank) for rank in range(world_size)]
    steps = {len(shares) for shares in per_rank}
    assert len(steps) == 1, "every rank runs the same number of steps"
    for k, shares in enumerate(zip(*per_rank, strict=True)):
        sizes = {len(share.own) for share in shares}
        assert len(sizes) == 1, f"batch {k}: every rank the same batch size"
        global_batch = order[k * batch_size : (k + 1) * batch_size]
        assert all(torch.equal(share.index, global_batch) for share in shares)
        if len(global_batch) == batch_size:
            assert sizes == {batch_size // world_size}
    taken = torch.cat([share.own for shares in per_rank for share in shares])
    assert len(set(taken.tolist())) == len(taken), "no sample on two ranks"
    # Only the last batch's remainder, fewer than world_size samples, is left out.
    assert 0 <= n - len(taken) < world_size


def test_one_process_keeps_todays_batches() -> None:
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    shares = epoch_batches(order, 96)
    expected = [order[start : start + 96] for start in range(0, 1000, 96)]
    assert len(shares) == len(expected)
    assert all(torch.equal(s.own, e) for s, e in zip(shares, expected, strict=True))


def test_a_batch_size_that_does_not_split_over_the_processes_is_refused() -> None:
    check_batch_size(1024, 1)
    check_batch_size(1024, 4)
    with pytest.raises(ValueError, match="batch size 1000 is the global batch .* multiple of 3"):
        check_batch_size(1000, 3)


# ----- candidates of the global batch ----------------------------------------------------------------

# The paper's embedding mixing, experts reading the profile alone and every prefix trained towards its
# next action: the recorded regression figures below were taken so.
SMALL = ModelConfig(
    embedding_dim=8,
    hidden_dim=16,
    feature_dim=4,
    n_user_groups=4,
    bias_features=4,
    expert_mixing="embedding",
    expert_state_input=False,
)
NEXT_ACTION_ONLY = TrainConfig(target_window=1)


@pytest.fixture(scope="module")
def context() -> TrainingContext:
    data = generate_synthetic(n_users=120, n_items=200, seed=7)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=10))
    return TrainingContext.build(data, split, encoder, NEXT_ACTION_ONLY)


def gradients(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in net.named_parameters()
    }


@pytest.mark.parametrize(
    ("model_config", "config"),
    [
        (SMALL, NEXT_ACTION_ONLY.model_copy(update={"shared_negatives": 32})),
        (
            SMALL.model_copy(update={"use_dkd": True}),
            NEXT_ACTION_ONLY.model_copy(update={"shared_negatives": 32, "history_balance": 0.5}),
        ),
        (SMALL, NEXT_ACTION_ONLY.model_copy(update={"loss": "bce", "negatives": 3})),
    ],
    ids=["softmax", "softmax-dkd-weights", "bce"],
)
def test_two_ranks_average_to_one_process_on_the_same_batch(
    context: TrainingContext, model_config: ModelConfig, config: TrainConfig
) -> None:
    """What DDP's averaged gradient is: each rank's loss over its half, against the candidates of
    the whole batch, averages to one process's loss and gradient over the whole batch."""
    torch.manual_seed(0)
    net = ColdWarmNet(context.encoder, model_config, [0], [0, 1]).eval()  # no dropout: same masks
    samples = context.samples
    index = torch.arange(64)
    log_q = item_log_frequencies(samples, net.n_items)
    weights = train.sample_weights(samples, config.history_balance)
    dkd = model_config.use_dkd

    def step(rows: slice | None) -> tuple[float, float, dict[str, torch.Tensor]]:
        net.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(3)  # the same stream on every rank
        own = index if rows is None else index[rows]
        whole = None if rows is None else GlobalBatch(samples.target[index], rows)
        batch_weights = weights[own] if config.history_balance else None
        loss, distilled = training_step(
            net, samples.batch(own), config, model_config, dkd, log_q, generator, batch_weights, whole
        )
        loss.backward()
        return loss.item(), distilled, gradients(net)

    one_loss, one_distilled, one_grads = step(None)
    ranks = [step(slice(0, 32)), step(slice(32, 64))]
    assert np.mean([r[0] for r in ranks]) == pytest.approx(one_loss, rel=1e-6)
    assert np.mean([r[1] for r in ranks]) == pytest.approx(one_distilled, rel=1e-6)
    if dkd:
        assert 0 < one_distilled < 1
    for name, grad in one_grads.items():
        averaged = (ranks[0][2][name] + ranks[1][2][name]) / 2
        torch.testing.assert_close(averaged, grad, rtol=1e-5, atol=1e-7, msg=name)


# ----- one process: as before the refactor -----------------------------------------------------------


def step_before_the_refactor(
    net, batch, config, model_config, use_dkd, item_log_q, generator, weights=None, global_batch=None
):
    """model.train.training_step as it was before the scoring moved into TwoTowerNet.forward: the
    towers called one by one from the training loop."""
    assert global_batch is None
    device = net.log_scale.device
    candidates = on_device(make_candidates(batch[3], config, net.n_items, item_log_q, generator), device)
    profile, history, state, targets = (tensor.to(device) for tensor in batch)
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


@dataclass
class Epoch:
    losses: list[float]
    record: dict[str, float]
    state: dict[str, torch.Tensor]
    parameter_sum: float


def one_epoch(context: TrainingContext, model_config, config, step, monkeypatch) -> Epoch:
    losses: list[float] = []

    def recording(*args, **kwargs):
        loss, distilled = step(*args, **kwargs)
        losses.append(loss.item())
        return loss, distilled

    monkeypatch.setattr(train, "training_step", recording)
    with one_torch_thread():
        torch.manual_seed(config.seed)
        net = ColdWarmNet(context.encoder, model_config, [0], [0, 1])
        [record] = run_epochs(net, context, config, model_config, 1, "regression", True, False)
    return Epoch(
        losses, record, net.state_dict(), float(sum(p.detach().double().sum() for p in net.parameters()))
    )


# Recorded with the code before the refactor (commit 3dd5e12): first, second and last batch losses of
# the epoch, its record, and the sum of the trained parameters. Exact on the machine that recorded
# them; the tolerances are for other CPUs' float rounding (a change of draws moves these by far more:
# seed 1 instead of 0 moves the softmax case's parameter sum from 60.4 to 23.4). The parameter sum adds
# 101 Adam steps of rounding over every weight, so it drifts most: 2e-4 between two Xeons.
RECORDED = {
    "softmax": (
        [8.373479843139648, 7.700658798217773, 5.096585750579834],
        6.06740671101183,
        0.0,
        60.417882384365555,
    ),
    "dkd": (
        [10.107840538024902, 10.256246566772461, 5.232268333435059],
        6.475852140105597,
        0.5038675742574258,
        60.728274812629536,
    ),
    "bce": (
        [2.3316829204559326, 2.3589491844177246, 0.752894401550293],
        1.075022528667261,
        0.0,
        27.746968485957098,
    ),
}
REGRESSION_CASES = {
    "softmax": (SMALL, NEXT_ACTION_ONLY.model_copy(update={"batch_size": 64, "shared_negatives": 32})),
    "dkd": (
        SMALL.model_copy(update={"use_dkd": True}),
        NEXT_ACTION_ONLY.model_copy(
            update={"batch_size": 64, "shared_negatives": 32, "history_balance": 0.5}
        ),
    ),
    "bce": (SMALL, NEXT_ACTION_ONLY.model_copy(update={"batch_size": 64, "loss": "bce", "negatives": 3})),
}


@pytest.mark.parametrize("case", list(REGRESSION_CASES))
def test_one_process_trains_exactly_as_before_the_refactor(
    context: TrainingContext, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_config, config = REGRESSION_CASES[case]
    now = one_epoch(context, model_config, config, training_step, monkeypatch)
    before = one_epoch(context, model_config, config, step_before_the_refactor, monkeypatch)
    assert now.losses == before.losses  # every batch, bit for bit
    assert now.record == before.record
    assert all(torch.equal(now.state[k], before.state[k]) for k in now.state)
    first_losses, epoch_loss, distilled, parameter_sum = RECORDED[case]
    assert len(now.losses) == 101
    assert [now.losses[0], now.losses[1], now.losses[-1]] == pytest.approx(first_losses, rel=1e-4)
    assert now.record["loss"] == pytest.approx(epoch_loss, rel=1e-4)
    assert now.record["distilled"] == pytest.approx(distilled, abs=1e-3)
    assert now.parameter_sum == pytest.approx(parameter_sum, rel=1e-3)


# ----- collectives between two gloo processes --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def collectives(rank: int, world_size: int, port: int, out: str) -> None:
    """One of two processes: what it receives from rank 0 and from the all-reduce."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    with process_group(ProcessLayout.from_env(), torch.device("cpu"), timeout_s=60) as layout:
        assert distributed.current() == layout
        torch.manual_seed(100 + rank)  # different weights on each rank, until broadcast
        module = torch.nn.Linear(3, 2)
        distributed.broadcast_module(module)
        received = {
            "object": distributed.broadcast_object({"groups": [rank, 7]} if layout.is_main else None),
            "tensor": distributed.broadcast_tensor(torch.full((2,), float(rank + 1))),
            "mean": distributed.mean_over_ranks([float(rank), 10.0 * rank]),
            "module": module.state_dict(),
        }
        distributed.barrier()
    assert not torch.distributed.is_initialized()
    torch.save(received, Path(out) / f"rank{rank}.pt")


def test_collectives_between_two_gloo_processes(tmp_path: Path) -> None:
    mp.spawn(collectives, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for received in (rank0, rank1):
        assert received["object"] == {"groups": [0, 7]}
        assert torch.equal(received["tensor"], torch.ones(2))
        assert received["mean"] == [0.5, 5.0]
    for name, value in rank0["module"].items():
        assert torch.equal(value, rank1["module"][name]), name


# ----- end to end: torchrun, 2 processes ------------------------------------------------------------

DATA = "synthetic:300"
EPOCHS = 2
# Two warm-phase epochs: too few for its early stopping (patience 2), so both runs have them all.
WARM_PHASE_EPOCHS = 2
SMALL_ENV = {
    "COLDWARM_TRAIN__PRETRAIN_EPOCHS": "1",
    "COLDWARM_TRAIN__BATCH_SIZE": "256",
    "COLDWARM_TRAIN__SHARED_NEGATIVES": "256",
    "COLDWARM_MODEL__EMBEDDING_DIM": "16",
    "COLDWARM_MODEL__HIDDEN_DIM": "32",
    "COLDWARM_MODEL__N_USER_GROUPS": "8",
    "COLDWARM_TRAIN__TORCH_THREADS": "1",
    "COLDWARM_TRAIN__WARM_PHASE_EPOCHS": str(WARM_PHASE_EPOCHS),
    "COLDWARM_EXPORT__COMPILED_TOWER": "off",
    "OMP_NUM_THREADS": "1",
}
# coldwarm's train command, with save_checkpoint recording which rank called it.
SAVE_PROBE = """
import os, sys
from coldwarm import cli

saving = cli.save_checkpoint


def recorded(trained, path):
    with open(os.environ["SAVES_FILE"], "a") as saves:
        saves.write(os.environ.get("RANK", "-") + "\\n")
    return saving(trained, path)


cli.save_checkpoint = recorded
sys.argv[0] = "coldwarm"
cli.app()
"""


@dataclass
class Runs:
    one: Path
    two: Path
    saves: list[str]
    seconds: dict[str, float]
    log: str


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLDWARM_")}
    for name in distributed.LAUNCH_VARIABLES:
        env.pop(name, None)
    return {**env, **SMALL_ENV, **extra}


def train_command(run_dir: Path) -> list[str]:
    return ["train", "--data", DATA, "--epochs", str(EPOCHS), "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("distributed")
    (root / "save_probe.py").write_text(SAVE_PROBE)
    saves = root / "saves.txt"
    env = environment(SAVES_FILE=str(saves), PYTHONPATH=os.pathsep.join([str(root), *sys.path]))
    seconds = {}

    def timed(name: str, command: list[str]) -> subprocess.CompletedProcess[str]:
        started = time.perf_counter()
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        seconds[name] = time.perf_counter() - started
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    timed("one", [sys.executable, "-m", "coldwarm", *train_command(root / "one")])
    two = timed(
        "two",
        [
            *[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
            *["-m", "save_probe", *train_command(root / "two")],
        ],
    )
    return Runs(root / "one", root / "two", saves.read_text().split(), seconds, two.stderr)


@pytest.mark.slow
def test_the_checkpoint_is_written_once_by_rank_0(runs: Runs) -> None:
    assert runs.saves == ["0"]
    assert sorted(p.name for p in runs.two.iterdir()) == [cli.CHECKPOINT_FILE]
    assert "rank 0 of 2 processes (gloo), 128 samples per process and step" in " ".join(runs.log.split())


@pytest.mark.slow
def test_two_processes_validate_like_one_with_the_same_global_batch(runs: Runs) -> None:
    one, two = (
        load_checkpoint(runs.one / cli.CHECKPOINT_FILE),
        load_checkpoint(runs.two / cli.CHECKPOINT_FILE),
    )
    assert len(one.epochs) == len(two.epochs) == EPOCHS + WARM_PHASE_EPOCHS
    # Early stopping keeps the best validation epoch; that figure is what each run stands on. The warm
    # phase trains with the cold side frozen: DDP averages only the parameters that need a gradient.
    best_one = max(e["validation"] for e in one.epochs if "validation" in e)
    best_two = max(e["validation"] for e in two.epochs if "validation" in e)
    phase_one, phase_two = (
        max(e["warm_phase_validation"] for e in run.epochs if "warm_phase_validation" in e)
        for run in (one, two)
    )
    assert abs(phase_one - phase_two) <= 0.01, (one.epochs, two.epochs)
    print(
        f"validation recall@50 (cold start): 1 process {best_one:.4f}, 2 processes {best_two:.4f}; "
        f"wall seconds {runs.seconds}"
    )
    assert abs(best_one - best_two) <= 0.01, (one.epochs, two.epochs)
    for a, b in zip(one.epochs, two.epochs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.01)
    assert one.bias_features == two.bias_features  # the MI choice is the same, whoever computes it


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.slow
def test_the_distributed_checkpoint_is_exported_indexed_and_served(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored_logging: None
) -> None:
    from index_builder.settings import IndexSettings
    from service.engine import compute, load_bundle
    from service.feature_store import records_from_interactions

    for name in [n for n in os.environ if n.startswith("COLDWARM_")]:
        monkeypatch.delenv(name)
    for name, value in SMALL_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    artifacts = tmp_path / "artifacts"
    runner = CliRunner()
    with one_torch_thread():
        exported = runner.invoke(
            cli.app, ["export", "--run-dir", str(runs.two), "--data", DATA, "--artifacts-dir", str(artifacts)]
        )
        assert exported.exit_code == 0, exported.output
        indexed = runner.invoke(cli.app, ["build-index", "--artifacts-dir", str(artifacts), "--type", "flat"])
        assert indexed.exit_code == 0, indexed.output
        bundle = load_bundle(artifacts, IndexSettings(type="flat"), device="cpu")
        data = generate_synthetic(n_users=300)
        user = int(data.interactions["user_id"].iloc[0])
        [record] = records_from_interactions(data, [user])
        now = int(data.interactions["timestamp"].max()) + 3600
        answer = compute(bundle, record, now, 10, set())
    manifest = json.loads((bundle.artifacts.directory / "manifest.json").read_text())
    assert manifest["dataset"] == DATA
    assert len(answer.item_ids) == 10 and len(set(answer.item_ids)) == 10
    assert all(math.isfinite(s) for s in answer.scores)
    assert answer.scores == sorted(answer.scores, reverse=True)
    assert math.isclose(answer.gate_cold + answer.gate_warm, 1.0, rel_tol=1e-5)


# ----- coldwarm train --nproc ------------------------------------------------------------------------


def test_nproc_launches_torchrun_with_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored_logging: None
) -> None:
    launched: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess:
        launched.append(command)
        return subprocess.CompletedProcess(command, 0)

    for name in [*distributed.LAUNCH_VARIABLES, "COLDWARM_TRAIN__BATCH_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    result = CliRunner().invoke(
        cli.app, ["train", "--nproc", "2", "--data", DATA, "--epochs", "1", "--run-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    [command] = launched
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc-per-node=2" in command
    assert command[command.index("-m", 3) :] == [
        *["-m", "coldwarm", "train", "--run-dir", str(tmp_path)],
        *["--data", DATA, "--epochs", "1"],
    ]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--nproc", "3"], {}, "batch size 1024 is the global batch"),
        ([], {**TORCHRUN_ENV, "WORLD_SIZE": "3", "RANK": "0"}, "must split evenly over 3 processes"),
        (["--nproc", "2"], TORCHRUN_ENV, "under torchrun, --nproc-per-node sets the processes"),
    ],
    ids=["nproc", "torchrun", "nested"],
)
def test_train_refuses_a_layout_it_cannot_run(
    args: list[str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    restored_logging: None,
) -> None:
    for name in [n for n in os.environ if n.startswith("COLDWARM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: pytest.fail("nothing may be launched"))
    result = CliRunner().invoke(cli.app, ["train", "--data", DATA, *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
