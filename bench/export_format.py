"""The served user tower's format: TorchScript (what artifacts hold) against torch.export, side by side.

TorchScript is deprecated from torch 2.13 but is the format the card names, so it stays the default
unless a ``torch.export`` program is faster at the same answers. This measures, on one machine and in
one process, with the rounds of every format interleaved so that noise hits all alike:

- parity: embedding, user bias and gate of the exported program against the TorchScript tower (and
  both against the eager tower of the checkpoint), max absolute difference, target ≤ 1e-5;
- speed: median seconds per call at batch 1, 64 and 256 of the TorchScript tower, the eager tower,
  the ``torch.export`` program (``ExportedProgram.module()``) and, where a C++ compiler is present,
  the AOTInductor package compiled from it: what ``coldwarm export`` writes beside TorchScript and
  the service runs when it agrees (model/compiled_tower.py).

Users are the data's users as of their last interaction, encoded by the artifacts' own encoder, in
batches drawn with a fixed seed.

Run: python bench/export_format.py [--artifacts artifacts] [--checkpoint runs/latest/checkpoint.pt]
     [--data ../shared/data/ml-1m-first2999] [--rounds 7] [--calls 200]
Writes bench/results/export_format.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifacts import load_artifacts
from model.checkpoint import load_checkpoint
from model.compiled_tower import (
    compile_user_tower,
    compiled_tower_file,
    compiler_available,
    export_program,
    load_compiled_tower,
    max_difference,
)
from model.data.loading import load_dataset
from model.features import EncodedUsers
from service.feature_store import records_from_interactions, records_to_raw_users

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BATCHES = (1, 64, 256)
PARITY_TOLERANCE = 1e-5
log = logging.getLogger("bench.export_format")

Tower = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def encoded_users(artifacts_dir: Path, data_dir: str, n: int, seed: int) -> EncodedUsers:
    artifacts = load_artifacts(artifacts_dir)
    data = load_dataset(data_dir)
    rng = np.random.default_rng(seed)
    users = rng.choice(data.users["user_id"].to_numpy(), size=n, replace=True)
    cap = artifacts.encoder.config.max_history
    records = records_from_interactions(data, sorted(set(users.tolist())), cap=cap)
    by_id = {r.user_id: r for r in records}
    chosen = [by_id[int(u)] for u in users]
    now = int(data.interactions["timestamp"].max()) + 3600
    return artifacts.encoder.encode_users(records_to_raw_users(chosen, now, cap))


def inputs(encoded: EncodedUsers, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(encoded.profile[rows]),
        torch.from_numpy(encoded.history[rows]),
        torch.from_numpy(encoded.state[rows]),
    )


def seconds_per_call(tower: Tower, example: tuple[torch.Tensor, ...], calls: int) -> float:
    with torch.inference_mode():
        started = time.perf_counter()
        for _ in range(calls):
            tower(*example)
        return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "latest" / "checkpoint.pt")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-1m-first2999"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per round at batch 1 (fewer at larger)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as the service runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "export_format")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    scripted = load_artifacts(args.artifacts).user_tower
    eager = load_checkpoint(args.checkpoint).net.user_tower.eval()
    encoded = encoded_users(args.artifacts, args.data, max(BATCHES), args.seed)
    examples = {b: inputs(encoded, slice(0, b)) for b in BATCHES}

    towers: dict[str, Tower] = {"torchscript": scripted, "eager": eager}
    notes: dict[str, str] = {}
    workdir = Path(tempfile.mkdtemp(prefix="coldwarm-export-"))
    try:
        started = time.perf_counter()
        program = export_program(eager, examples[64])
        notes["torch_export_seconds"] = f"{time.perf_counter() - started:.1f}"
        towers["torch.export"] = program.module()
        if compiler_available():
            package = workdir / compiled_tower_file("cpu")
            record = compile_user_tower(eager, examples[64], package)
            towers["aoti"] = load_compiled_tower(package)
            notes["aoti_compile_seconds"] = str(record["compile_seconds"])
        else:
            notes["aoti"] = "no C++ compiler: not measured"
    except Exception as error:  # report why a format could not be built instead of failing the run
        notes["export_error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        log.error("export failed:\n%s", traceback.format_exc())

    parity: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, tower in towers.items():
            parity[name] = {
                str(b): max_difference(tower(*examples[b]), scripted(*examples[b])) for b in BATCHES
            }
    log.info("parity against TorchScript: %s", parity)

    timings: dict[str, dict[str, list[float]]] = {name: {str(b): [] for b in BATCHES} for name in towers}
    for tower in towers.values():  # warm-up: first-call compilation and profiling are not timed
        for b in BATCHES:
            seconds_per_call(tower, examples[b], 5)
    for round_ in range(args.rounds):
        for b in BATCHES:
            calls = max(10, args.calls // max(1, b // 16))
            for name, tower in towers.items():
                timings[name][str(b)].append(seconds_per_call(tower, examples[b], calls))
        log.info("round %d of %d done", round_ + 1, args.rounds)
    medians = {
        name: {b: statistics.median(values) for b, values in per_batch.items()}
        for name, per_batch in timings.items()
    }
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "parity_max_abs_diff": parity,
        "median_ms_per_call": {n: {b: round(s * 1e3, 4) for b, s in m.items()} for n, m in medians.items()},
        "ratio_to_torchscript": {
            n: {b: round(s / medians["torchscript"][b], 3) for b, s in m.items()} for n, m in medians.items()
        },
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(workdir, ignore_errors=True)


def markdown(result: dict[str, Any]) -> str:
    batches = [str(b) for b in BATCHES]
    lines = [
        f"User tower formats, torch {result['torch']}, {result['threads']} thread(s), median of "
        f"{result['rounds']} interleaved rounds; ms per call (ratio to TorchScript), max |difference| "
        "to TorchScript over embedding, bias and gate.",
        "",
        "| format | " + " | ".join(f"batch {b}" for b in batches) + " | max abs diff |",
        "|---|" + "---|" * (len(batches) + 1),
    ]
    for name, per_batch in result["median_ms_per_call"].items():
        cells = [f"{per_batch[b]:.3f} ({result['ratio_to_torchscript'][name][b]:.2f})" for b in batches]
        diff = max(result["parity_max_abs_diff"][name].values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {diff:.1e} |")
    if result["notes"]:
        lines += ["", *(f"- {key}: {value}" for key, value in result["notes"].items())]
    lines.append("")
    lines.append("Command: `python bench/export_format.py`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
