"""Checks the exported TorchScript user tower and the exact torch search on a CUDA device.

1. The tower: parity with the CPU and latency by batch size.
2. Tower plus top-k search (``index_builder.search_backends.TorchExactSearch``) over a catalog of 1M
   items, the model's own items repeated with noise (so that scores have the model's structure, not a
   random catalog's), against two targets: at least 50,000 users/s at batch 256 (tower, search and the
   results back on the host), and a top-100 that matches exact search on the CPU (numpy, independent of
   the code under test) on at least 99 % of items.

Needs only torch and numpy: GPU images (CUDA 13) have no faiss, and search_backends imports it only for
its FAISS backends.

Run: python bench/gpu_check.py ARTIFACTS_VERSION_DIR [--out results.json]
Dry run of the script without a GPU (timings mean nothing there):
    python bench/gpu_check.py ARTIFACTS_VERSION_DIR --device cpu --items 20000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_builder.search_backends import DEFAULT_MAX_SCORES, TorchExactSearch  # noqa: E402
from index_builder.vectors import fold_bias  # noqa: E402

BATCH_SIZES = (1, 8, 64, 512, 4096)
SEARCH_ITEMS = 1_000_000
SEARCH_BATCH = 256
TOP_K = 100
TARGET_USERS_PER_SECOND = 50_000
TARGET_TOP_K_MATCH = 0.99
# Noise added to each copied item embedding, in units of its norm: cos ≈ 0.9 to the item it copies,
# so copies of one item are near each other without tying.
CATALOG_NOISE = 0.5
CATALOG_SEED = 0
WARM_UP_CALLS = 20  # TorchScript profiles its first calls; cuBLAS and topk set up on theirs


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


def time_calls(call: Callable[[], object], cuda: bool, repeats: int) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return times


def ms(times: list[float], percentile: float) -> float:
    return round(float(np.percentile(times, percentile)) * 1e3, 4)


def check_tower(
    cpu_tower: torch.jit.ScriptModule,
    device_tower: torch.jit.ScriptModule,
    features: dict,
    device: torch.device,
    repeats: int,
) -> dict:
    """Parity with the CPU tower and latency, by batch size."""
    cuda = device.type == "cuda"
    batches = {}
    for batch in BATCH_SIZES:
        inputs = random_inputs(features, batch, seed=batch)
        device_inputs = tuple(x.to(device) for x in inputs)
        with torch.no_grad():
            expected = cpu_tower(*inputs)
            got = device_tower(*device_inputs)
        diffs = [float((e - g.cpu()).abs().max()) for e, g in zip(expected, got, strict=True)]
        time_calls(lambda inputs=device_inputs: device_tower(*inputs), cuda, min(WARM_UP_CALLS, repeats))
        device_times = time_calls(lambda inputs=device_inputs: device_tower(*inputs), cuda, repeats)
        cpu_repeats = max(1, repeats // 10 if batch >= 512 else repeats // 2)
        cpu_times = time_calls(lambda inputs=inputs: cpu_tower(*inputs), False, cpu_repeats)
        batches[batch] = {
            "max_abs_diff": {"embedding": diffs[0], "user_bias": diffs[1], "gate": diffs[2]},
            "gpu_ms_p50": ms(device_times, 50),
            "gpu_ms_p99": ms(device_times, 99),
            "cpu_ms_p50": ms(cpu_times, 50),
            "gpu_users_per_second": round(batch / float(np.percentile(device_times, 50))),
        }
    return batches


def synthetic_catalog(items: np.lib.npyio.NpzFile, scale: float, n: int) -> np.ndarray:
    """(n, d + 1) folded vectors: the model's items drawn with replacement, each embedding moved by
    noise and renormalised (the model's embeddings are unit-norm), each with its item's bias."""
    embeddings = np.asarray(items["embeddings"], dtype=np.float32)
    rng = np.random.default_rng(CATALOG_SEED)
    source = rng.integers(0, len(embeddings), n)
    d = embeddings.shape[1]
    noise = rng.standard_normal((n, d), dtype=np.float32) * np.float32(CATALOG_NOISE / np.sqrt(d))
    copies = embeddings[source] + noise
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    return fold_bias(copies, np.asarray(items["bias"])[source], scale)


def queries_of(embedding: torch.Tensor) -> torch.Tensor:
    """Queries [e_u, 1] (``index_builder.vectors.query_vectors``), built where the embedding is."""
    return torch.cat([embedding, embedding.new_ones((len(embedding), 1))], dim=1)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row positions) of the best k, best first, by numpy on the CPU: the reference."""
    rows = max(1, DEFAULT_MAX_SCORES // len(vectors))  # bounds the (rows, n) score block in memory
    scores, positions = [], []
    for start in range(0, len(queries), rows):
        block = queries[start : start + rows] @ vectors.T
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(block, top, axis=1), axis=1)
        positions.append(np.take_along_axis(top, order, axis=1))
        scores.append(np.take_along_axis(block, positions[-1], axis=1))
    return np.concatenate(scores), np.concatenate(positions)


def top_k_match(got: np.ndarray, want: np.ndarray) -> float:
    """Mean share of each reference top-k found in the checked top-k (order within it ignored)."""
    return float(np.mean([len(np.intersect1d(g, w)) / len(w) for g, w in zip(got, want, strict=True)]))


def check_search(
    cpu_tower: torch.jit.ScriptModule,
    device_tower: torch.jit.ScriptModule,
    features: dict,
    vectors: np.ndarray,
    device: torch.device,
    repeats: int,
    max_scores: int,
) -> dict:
    """Tower plus exact torch search on the device: agreement with numpy and throughput at one batch."""
    cuda = device.type == "cuda"
    started = time.perf_counter()
    backend = TorchExactSearch(vectors, np.arange(len(vectors), dtype=np.int64), device, max_scores)
    load_seconds = time.perf_counter() - started
    inputs = random_inputs(features, SEARCH_BATCH, seed=SEARCH_BATCH)
    with torch.no_grad():
        queries = queries_of(cpu_tower(*inputs)[0])
    want_scores, want_ids = exact_top_k(vectors, queries.numpy(), TOP_K)
    got_scores, got_ids = backend.search_tensor(queries.to(device), TOP_K)

    device_inputs = tuple(x.to(device) for x in inputs)
    device_queries = queries.to(device)

    def recommend() -> tuple[torch.Tensor, torch.Tensor]:
        embedding, user_bias, _ = device_tower(*device_inputs)
        scores, ids = backend.search_tensor(queries_of(embedding), TOP_K)
        return (scores + user_bias[:, None]).cpu(), ids.cpu()

    def search_only() -> tuple[torch.Tensor, torch.Tensor]:
        return backend.search_tensor(device_queries, TOP_K)

    time_calls(recommend, cuda, min(WARM_UP_CALLS, repeats))
    times = time_calls(recommend, cuda, repeats)
    search_times = time_calls(search_only, cuda, repeats)
    users_per_second = round(SEARCH_BATCH / float(np.percentile(times, 50)))
    match = top_k_match(got_ids.cpu().numpy(), want_ids)
    return {
        "backend": backend.name,
        "n_items": len(vectors),
        "dim": vectors.shape[1],
        "k": TOP_K,
        "batch": SEARCH_BATCH,
        "max_scores": backend.max_scores,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "catalog_to_device_seconds": round(load_seconds, 3),
        "top_k_match": match,
        # Best-first score lists compared slot by slot: near-ties may swap ids, never the scores.
        "max_abs_score_diff": float(np.abs(got_scores.cpu().numpy() - want_scores).max()),
        "tower_search_ms_p50": ms(times, 50),
        "tower_search_ms_p99": ms(times, 99),
        "search_ms_p50": ms(search_times, 50),
        "users_per_second": users_per_second,
        "targets": {"users_per_second": TARGET_USERS_PER_SECOND, "top_k_match": TARGET_TOP_K_MATCH},
        "passed": {
            "users_per_second": users_per_second >= TARGET_USERS_PER_SECOND,
            "top_k_match": match >= TARGET_TOP_K_MATCH,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the script"
    )
    parser.add_argument("--items", type=int, default=SEARCH_ITEMS, help="catalog size of the search check")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per measurement")
    parser.add_argument(
        "--max-scores", type=int, default=DEFAULT_MAX_SCORES, help="scores per search block (memory bound)"
    )
    args = parser.parse_args()
    features = json.loads((args.artifacts / "features.json").read_text())
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    cpu_tower = torch.jit.load(str(args.artifacts / "user_tower.pt"), map_location="cpu").eval()
    report: dict = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "batches": {}}
    if args.device == "cuda" and not torch.cuda.is_available():
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    device = torch.device(args.device)
    report["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"
    device_tower = torch.jit.load(str(args.artifacts / "user_tower.pt"), map_location=device).eval()
    report["batches"] = check_tower(cpu_tower, device_tower, features, device, args.repeats)
    with np.load(args.artifacts / "items.npz", allow_pickle=False) as items:
        vectors = synthetic_catalog(items, float(manifest["scale"]), args.items)
    report["search"] = check_search(
        cpu_tower, device_tower, features, vectors, device, args.repeats, args.max_scores
    )
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
