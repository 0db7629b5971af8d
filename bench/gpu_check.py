"""Checks the exported TorchScript user tower on a CUDA device: parity with the CPU and latency by
batch size. Needs only torch and numpy (GPU images may lack the project's other dependencies).

Run: python bench/gpu_check.py ARTIFACTS_VERSION_DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

BATCH_SIZES = (1, 8, 64, 512, 4096)


def random_inputs(features: dict, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid encoded users: profile codes within each vocabulary, histories of catalog positions + 1
    (some empty: cold users), state buckets within their bounds."""
    rng = np.random.default_rng(seed)
    vocab = features["vocabularies"]
    config = features["config"]
    profile = np.stack(
        [
            rng.integers(0, len(vocab[name]) + 2, batch)
            for name in ("gender", "age", "occupation", "zip_prefix")
        ],
        axis=1,
    )
    n_items = len(features["catalog_item_ids"])
    lengths = rng.integers(0, config["max_history"] + 1, batch)
    lengths[: max(1, batch // 4)] = 0
    history = rng.integers(1, n_items + 1, (batch, config["max_history"]))
    history[np.arange(config["max_history"])[None, :] >= lengths[:, None]] = 0
    state = np.stack(
        [
            rng.integers(1, len(config["count_bounds"]) + 1, batch),
            rng.integers(0, len(config["days_bounds"]) + 1, batch),
            rng.integers(0, len(config["days_bounds"]) + 1, batch),
        ],
        axis=1,
    )
    return tuple(torch.as_tensor(a, dtype=torch.long) for a in (profile, history, state))  # type: ignore[return-value]


def time_calls(
    tower: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...], cuda: bool, repeats: int
) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            tower(*inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    features = json.loads((args.artifacts / "features.json").read_text())
    cpu_tower = torch.jit.load(str(args.artifacts / "user_tower.pt"), map_location="cpu").eval()
    report: dict = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "batches": {}}
    if not torch.cuda.is_available():
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    report["device"] = torch.cuda.get_device_name(0)
    gpu_tower = torch.jit.load(str(args.artifacts / "user_tower.pt"), map_location="cuda").eval()
    for batch in BATCH_SIZES:
        inputs = random_inputs(features, batch, seed=batch)
        with torch.no_grad():
            expected = cpu_tower(*inputs)
            got = gpu_tower(*(x.cuda() for x in inputs))
        diffs = [float((e - g.cpu()).abs().max()) for e, g in zip(expected, got, strict=True)]
        gpu_inputs = tuple(x.cuda() for x in inputs)
        time_calls(gpu_tower, gpu_inputs, True, 20)  # warm-up: TorchScript profiles the first calls
        gpu_times = time_calls(gpu_tower, gpu_inputs, True, 200)
        cpu_times = time_calls(cpu_tower, inputs, False, 20 if batch >= 512 else 100)
        report["batches"][batch] = {
            "max_abs_diff": {"embedding": diffs[0], "user_bias": diffs[1], "gate": diffs[2]},
            "gpu_ms_p50": round(float(np.percentile(gpu_times, 50)) * 1e3, 4),
            "gpu_ms_p99": round(float(np.percentile(gpu_times, 99)) * 1e3, 4),
            "cpu_ms_p50": round(float(np.percentile(cpu_times, 50)) * 1e3, 4),
            "gpu_users_per_second": round(batch / float(np.percentile(gpu_times, 50))),
        }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
