"""Training at scale (issue 12, "interactions too big for memory"): peak memory and speed of
loading a Parquet directory, building the training samples and training, at about 1M and 10M
synthetic interactions.

Data: the project's generator (model/data/synthetic.py), which holds (users x steps x latent) arrays
and so cannot make 10M interactions in one call, is run in chunks of ``--chunk-users`` users: chunk k
is ``generate_synthetic(n_users=chunk_users, seed=seed + k)`` with its user ids moved past the previous
chunks'. Chunks are added until the size is reached; the last one is cut at the user who reaches it.
Every chunk has items 1..1000 (each draws its own item features; the item table written is chunk 0's):
memory and speed depend on the sizes, not on what the items are. Written as a Parquet directory, the
convention of model/data/parquet_dir.py: the actions in time order, as an event log comes, split into
``--files`` files of consecutive periods (every file holds actions of many users, so the loader has to
sort), row groups of ``--row-group-rows``, and ``users.parquet`` and ``items.parquet`` beside them.

Measurement: one child process per size and samples mode, so that each peak is its own. The child
loads the directory (``load_dataset``), splits the users, fits the encoder and builds the training
context (``TrainingContext.build``: samples and validation points), then trains ``--steps`` batches of
the default batch size (the default Cold & Warm Net and sampled softmax, ``training_step``, one torch
thread; one untimed step first). Peak RSS is the child's high-water mark
(``getrusage(RUSAGE_SELF).ru_maxrss``); the high-water mark after each stage (VmHWM) says which stage
set it. ``--eager`` also measures the samples as they were before (bench/_eager_samples.py: every
history stored in a samples x max_history matrix) on the same data, side by side.

Run: python bench/train_scale.py [--sizes 1000000,10000000] [--steps 50] [--eager]
                                 [--data-dir DIR] [--out bench/results/train_scale]
``--data-dir`` keeps the generated data there and reuses it on later runs (default: a temporary
directory, removed at the end). Writes bench/results/train_scale.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.data.parquet_dir import ITEMS_FILE, USERS_FILE  # noqa: E402
from model.data.synthetic import generate_synthetic  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODES = ("lazy", "eager")
log = logging.getLogger("bench.train_scale")


# ----- data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    interactions: int
    chunk_users: int
    files: int
    row_group_rows: int
    seed: int


def ensure_data(spec: DataSpec, directory: Path) -> dict[str, Any]:
    """The Parquet directory of ``spec`` in ``directory``, generated unless an earlier run left it."""
    manifest_path = directory / "_manifest.json"  # "_": the loader skips it
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("spec") == asdict(spec):
            log.info("reusing %s (%d interactions)", directory, manifest["interactions"])
            return manifest
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.parquet"):
        stale.unlink()
    started = time.perf_counter()
    written, chunks, users, chunk = 0, [], [], 0
    with tqdm(total=spec.interactions, desc=f"generating {spec.interactions:,}", unit="row") as bar:
        while written < spec.interactions:
            data = generate_synthetic(n_users=spec.chunk_users, seed=spec.seed + chunk)
            rows, chunk_users = cut_at(data.interactions, data.users, spec.interactions - written)
            offset = chunk * spec.chunk_users
            chunks.append(rows.assign(user_id=rows["user_id"] + offset))
            users.append(chunk_users.assign(user_id=chunk_users["user_id"] + offset))
            if chunk == 0:
                write_parquet(data.items, directory / ITEMS_FILE)
            written += len(rows)
            chunk += 1
            bar.update(len(rows))
    log_order = pd.concat(chunks, ignore_index=True).sort_values("timestamp", kind="stable")
    del chunks
    for number, part in enumerate(np.array_split(np.arange(len(log_order)), spec.files)):
        write_parquet(log_order.iloc[part], directory / f"part-{number:05d}.parquet", spec.row_group_rows)
    write_parquet(pd.concat(users, ignore_index=True), directory / USERS_FILE)
    manifest = {
        "spec": asdict(spec),
        "interactions": written,
        "generator_calls": chunk,
        "generate_seconds": round(time.perf_counter() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def cut_at(interactions: pd.DataFrame, users: pd.DataFrame, wanted: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The chunk's rows of its first users up to the one whose interactions reach ``wanted`` rows."""
    if len(interactions) <= wanted:
        return interactions, users
    last_user = interactions["user_id"].iloc[wanted - 1]  # rows are sorted by user
    return (
        interactions[interactions["user_id"] <= last_user],
        users[users["user_id"] <= last_user],
    )


def write_parquet(frame: pd.DataFrame, path: Path, row_group_rows: int | None = None) -> None:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_rows)


# ----- one run: a child process ----------------------------------------------------------------------
def high_water_mib() -> float:
    """VmHWM: the most resident memory this process has had so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(data_dir: Path, mode: str, steps: int) -> dict[str, Any]:
    """Load, build the context, train ``steps`` batches; timings, sizes and memory high-water marks."""
    import torch

    from model.data.loading import load_dataset
    from model.data.split import split_users
    from model.features import FeatureEncoder
    from model.nn.cold_warm_net import ColdWarmNet
    from model.settings import FeatureConfig, ModelConfig, TrainConfig
    from model.train import TrainingContext, epoch_batches, item_log_frequencies, training_step

    torch.set_num_threads(1)
    config, model_config = TrainConfig(), ModelConfig()
    out: dict[str, Any] = {"mode": mode, "baseline_mib": high_water_mib()}

    started = time.perf_counter()
    data = load_dataset(data_dir)
    out.update(load_s=time.perf_counter() - started, hwm_load_mib=high_water_mib())
    out.update(interactions=len(data.interactions), users=len(data.users))

    started = time.perf_counter()
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig())
    if mode == "lazy":
        context = TrainingContext.build(data, split, encoder, config)
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from _eager_samples import eager_training_context

        context = eager_training_context(data, split, encoder, config)
    samples = context.samples
    out.update(samples_s=time.perf_counter() - started, hwm_samples_mib=high_water_mib())
    out.update(
        training_samples=len(samples),
        samples_mib=sum(
            value.nbytes for value in vars(samples).values() if isinstance(value, (np.ndarray, torch.Tensor))
        )
        / 2**20,
    )

    torch.manual_seed(config.seed)
    net = ColdWarmNet(encoder, model_config)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    item_log_q = item_log_frequencies(samples, net.n_items)
    order = torch.randperm(len(samples), generator=generator)
    warm_up, *shares = epoch_batches(order, config.batch_size)[: steps + 1]

    def step(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss, _ = training_step(net, batch, config, model_config, False, item_log_q, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    step(samples.batch(warm_up.own))  # allocator and first-call costs, not timed
    gather_s = 0.0
    started = time.perf_counter()
    for share in shares:
        gathering = time.perf_counter()
        batch = samples.batch(share.own)
        gather_s += time.perf_counter() - gathering
        loss = step(batch)
    train_s = time.perf_counter() - started
    trained = sum(len(share.own) for share in shares)
    out.update(
        steps=len(shares),
        train_samples_per_s=trained / train_s,
        gather_ms_per_batch=1000 * gather_s / max(len(shares), 1),
        final_loss=float(loss.item()) if shares else None,
        hwm_train_mib=high_water_mib(),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    return out


def run_child(data_dir: Path, mode: str, steps: int, timeout_s: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            str(data_dir),
            "--mode",
            mode,
            "--steps",
            str(steps),
            "--child-result",
            result.name,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        completed = subprocess.run(command, env=env, timeout=timeout_s, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"{mode} run on {data_dir} failed:\n{completed.stderr[-3000:]}")
        return json.loads(Path(result.name).read_text())


# ----- report ------------------------------------------------------------------------------------------
def scaling(runs: list[dict[str, Any]], mode: str) -> dict[str, float] | None:
    """Largest against smallest size of one mode: the data ratio, the peak RSS ratios, and what each
    interaction added to the peak."""
    mine = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["interactions"])
    if len(mine) < 2:
        return None
    small, large = mine[0], mine[-1]
    return {
        "data_ratio": large["interactions"] / small["interactions"],
        "peak_rss_ratio": large["peak_rss_mib"] / small["peak_rss_mib"],
        # What the data adds to the process (imports, torch and the model excluded).
        "above_baseline_ratio": (large["peak_rss_mib"] - large["baseline_mib"])
        / (small["peak_rss_mib"] - small["baseline_mib"]),
        "bytes_per_added_interaction": (large["peak_rss_mib"] - small["peak_rss_mib"])
        * 2**20
        / (large["interactions"] - small["interactions"]),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "Training at scale: a Parquet directory of synthetic interactions loaded, training context "
        f"built, {report['steps']} steps of {report['batch_size']} samples trained (default Cold & Warm "
        "Net, sampled softmax, one torch thread), one child process per run. lazy: the samples of "
        "model/samples.py (histories gathered per batch); eager: as they were built before "
        "(bench/_eager_samples.py, every history stored); both load with the Parquet-directory reader.",
        "",
        "| samples | interactions | train samples | peak RSS MiB | above baseline MiB | "
        "stage of the peak | load s | samples s | samples MiB | train samples/s | gather ms/batch |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        stage = next(
            name
            for name, key in (
                ("load", "hwm_load_mib"),
                ("samples", "hwm_samples_mib"),
                ("train", "hwm_train_mib"),
            )
            if run[key] >= run["hwm_train_mib"] - 0.5
        )
        lines.append(
            f"| {run['mode']} | {run['interactions']:,} | {run['training_samples']:,} | "
            f"{run['peak_rss_mib']:,.0f} | {run['peak_rss_mib'] - run['baseline_mib']:,.0f} | {stage} | "
            f"{run['load_s']:.1f} | {run['samples_s']:.1f} | {run['samples_mib']:,.0f} | "
            f"{run['train_samples_per_s']:,.0f} | {run['gather_ms_per_batch']:.2f} |"
        )
    lines.append("")
    for mode, ratio in report["scaling"].items():
        if ratio:
            lines.append(
                f"- {mode}: {ratio['data_ratio']:.2f}x the interactions, peak RSS x"
                f"{ratio['peak_rss_ratio']:.2f} (x{ratio['above_baseline_ratio']:.2f} above the "
                f"baseline); {ratio['bytes_per_added_interaction']:,.0f} bytes of peak per added interaction."
            )
    lines += [
        "",
        "Peak RSS: the child's getrusage ru_maxrss; baseline: its high-water mark after the imports "
        "(interpreter, numpy, pandas, pyarrow, torch); above it, besides the data, the training step's "
        "working set (a few hundred MiB at the default batch, whatever the data size). Stage of the "
        "peak: the first stage (load, samples = split + encoder + training context, train) after which "
        "the high-water mark stood at the peak. samples MiB: what the training samples hold.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="interactions, comma-separated")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run")
    parser.add_argument("--eager", action="store_true", help="also measure the samples as they were")
    parser.add_argument("--chunk-users", type=int, default=10_000, help="users per generator call")
    parser.add_argument("--files", type=int, default=8, help="Parquet files per data set")
    parser.add_argument("--row-group-rows", type=int, default=262_144)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="keep (and reuse) the generated data here")
    parser.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_scale")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="lazy", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.child_result.write_text(json.dumps(child(args.child, args.mode, args.steps)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sizes = [int(size) for size in args.sizes.split(",")]
    modes = MODES if args.eager else MODES[:1]
    with tempfile.TemporaryDirectory(prefix="train_scale_") as scratch:
        root = args.data_dir or Path(scratch)
        runs, generated = [], []
        for size in sizes:
            spec = DataSpec(size, args.chunk_users, args.files, args.row_group_rows, args.seed)
            data_dir = root / f"interactions_{size}"
            generated.append(ensure_data(spec, data_dir))
            for mode in modes:
                log.info("%s run on %d interactions ...", mode, size)
                run = run_child(data_dir, mode, args.steps, args.child_timeout)
                log.info("%s", {k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()})
                runs.append(run)
    from model.settings import TrainConfig

    report = {
        "command": shlex.join(["python", "bench/train_scale.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "steps": args.steps,
        "batch_size": TrainConfig().batch_size,
        "data": generated,
        "runs": runs,
        "scaling": {mode: scaling(runs, mode) for mode in modes},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
