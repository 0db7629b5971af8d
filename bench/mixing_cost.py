"""What score mixing costs a request: ``compute_batch`` of two artifact versions side by side.

Score mixing (``COLDWARM_MODEL__EXPERT_MIXING=score``) makes the user and item vectors twice as wide
(2d, plus the folded bias), so the index holds twice the floats and every search multiplies twice as
many; the user tower computes the same experts. This loads two versions of the same data set's
artifacts (``--a``: embedding mixing, ``--b``: score mixing) with their own indexes, and times the
engine's own ``compute_batch`` (encode, tower, search, exclusions) of the same users at several batch
sizes, the two versions interleaved, one torch and one FAISS thread as the service runs them. The users
are the data set's own, as the offline view of the store holds them (``records_from_interactions``),
with their seen items excluded, k = 50.

Run: python bench/mixing_cost.py --a ARTIFACTS_A --b ARTIFACTS_B [--data ../shared/data/ml-1m-first2999]
Writes bench/results/mixing_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.settings import IndexSettings
from model.data.loading import load_dataset
from service.engine import RecommendQuery, ServingBundle, compute_batch, configure_threads, load_bundle
from service.feature_store import records_from_interactions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-1m-first2999"


def queries_of(bundle: ServingBundle, data_dir: str, users: int, seed: int) -> list[RecommendQuery]:
    data = load_dataset(data_dir)
    ids = np.random.default_rng(seed).choice(data.users["user_id"].to_numpy(), users, replace=False)
    cap = bundle.artifacts.encoder.config.max_history
    now = int(data.interactions["timestamp"].max()) + 1
    records = records_from_interactions(data, ids, cap=cap)
    return [RecommendQuery(r, now, 50, frozenset(r.actions)) for r in records]


def timed(bundle: ServingBundle, queries: list[RecommendQuery]) -> float:
    started = time.perf_counter()
    compute_batch(bundle, queries)
    return time.perf_counter() - started


def measure(
    bundles: dict[str, ServingBundle], queries: list[RecommendQuery], batch: int, rounds: int
) -> dict[str, Any]:
    seconds: dict[str, list[float]] = {name: [] for name in bundles}
    names = list(bundles)
    for round_ in range(rounds):
        part = queries[(round_ * batch) % len(queries) :][:batch] or queries[:batch]
        for name in names if round_ % 2 else reversed(names):
            seconds[name].append(timed(bundles[name], part))
    medians = {name: statistics.median(values) * 1e3 for name, values in seconds.items()}
    return {"batch": batch, "ms": medians, "ratio_b_over_a": medians["b"] / medians["a"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--a", type=Path, required=True, help="artifacts (root or version) with embedding mixing"
    )
    parser.add_argument("--b", type=Path, required=True, help="artifacts (root or version) with score mixing")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the data both were trained on")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS / "mixing_cost")
    args = parser.parse_args()
    configure_threads(1, 1)
    bundles = {name: load_bundle(path, IndexSettings()) for name, path in (("a", args.a), ("b", args.b))}
    widths = {name: int(b.vectors.shape[1]) for name, b in bundles.items()}
    mixing = {
        name: b.artifacts.manifest["model_config"].get("expert_mixing", "embedding")
        for name, b in bundles.items()
    }
    queries = queries_of(bundles["a"], args.data, 512, seed=0)
    rows = [measure(bundles, queries, int(b), args.rounds) for b in args.batches.split(",")]
    summary = {
        "versions": {n: str(b.artifacts.directory) for n, b in bundles.items()},
        "mixing": mixing,
        "widths": widths,
        "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"`python bench/mixing_cost.py`: compute_batch (encode, tower, search, exclusions; k 50, seen items "
        f"excluded), one thread, medians of {args.rounds} interleaved rounds. a: {mixing['a']} mixing, "
        f"index vectors {widths['a']} wide; b: {mixing['b']} mixing, {widths['b']} wide.",
        "",
        "| batch | a ms | b ms | b / a |",
        "|---|---|---|---|",
        *(
            f"| {r['batch']} | {r['ms']['a']:.3f} | {r['ms']['b']:.3f} | {r['ratio_b_over_a']:.2f} |"
            for r in rows
        ),
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
