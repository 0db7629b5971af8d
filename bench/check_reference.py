"""Checks the baselines against DESIGN.md's reference figures on MovieLens users 1-2,999.

Run: python bench/check_reference.py [--data-dir DIR] [--lam 500] [--tune] [--local-loader] [--report-dir DIR]
Most-popular must match the reference to +-0.0005 (exit status 1 otherwise); segment-popular and
EASE(lambda=500) are printed next to their reference rows. Needs the shared data, so it is not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.baselines.ease import Ease, tune_lambda  # noqa: E402
from model.baselines.popular import MostPopular, SegmentPopular  # noqa: E402
from model.data.movielens import load_movielens  # noqa: E402
from model.data.schema import InteractionData, make_interaction_data  # noqa: E402
from model.data.split import split_users  # noqa: E402
from model.evaluation.protocol import EvaluationResult, build_eval_points, evaluate  # noqa: E402
from model.evaluation.report import write_report  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/ml-1m-first2999")
GROUPS = ("cold_start", "warm_up", "active", "all")
TOLERANCE = 0.0005

# DESIGN.md, "Reference figures": group -> (points, R@50, N@50) per baseline.
REFERENCE_POINTS = {"cold_start": 1500, "warm_up": 788, "active": 316, "all": 2604}
REFERENCE: dict[str, dict[str, tuple[float, float]]] = {
    "most-popular": {
        "cold_start": (0.2776, 0.2113),
        "warm_up": (0.2237, 0.1474),
        "active": (0.1525, 0.1026),
        "all": (0.2461, 0.1788),
    },
    "segment-popular": {
        "cold_start": (0.2862, 0.2123),
        "warm_up": (0.2273, 0.1517),
        "active": (0.1652, 0.1083),
        "all": (0.2537, 0.1813),
    },
    "ease": {
        "cold_start": (0.1687, 0.1227),
        "warm_up": (0.4264, 0.2869),
        "active": (0.3228, 0.2000),
        "all": (0.2654, 0.1818),
    },
}


def load_local(data_dir: Path) -> InteractionData:
    """An independent minimal ML-1M reader, to rule the project loader out when figures disagree."""
    read = {"sep": "::", "engine": "python", "header": None}
    ratings = pd.read_csv(
        data_dir / "ratings.dat", names=["user_id", "item_id", "rating", "timestamp"], **read
    )
    users = pd.read_csv(
        data_dir / "users.dat",
        names=["user_id", "gender", "age", "occupation", "zip_code"],
        dtype=str,
        **read,
    )
    users["user_id"] = users["user_id"].astype(np.int64)
    movies = pd.read_csv(
        data_dir / "movies.dat", names=["item_id", "title", "genres"], encoding="ISO-8859-1", **read
    )
    movies["year"] = movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False).astype("Int64")
    return make_interaction_data(ratings, users, movies, name=data_dir.name)


def print_comparison(results: dict[str, EvaluationResult]) -> bool:
    """Prints ours vs reference per baseline and group; True when most-popular is within tolerance."""
    ok = True
    print(
        f"{'model':<22} {'group':<11} {'pts':>5} {'ref':>5}  {'R@50':>7} {'ref':>7} {'diff':>8}"
        f"  {'N@50':>7} {'ref':>7} {'diff':>8}"
    )
    for name, result in results.items():
        reference = REFERENCE.get(name)
        for group in GROUPS:
            r, n = result.groups[group]["recall@50"], result.groups[group]["ndcg@50"]
            line = f"{name:<22} {group:<11} {result.points[group]:>5} {REFERENCE_POINTS[group]:>5}  {r:7.4f}"
            if reference:
                ref_r, ref_n = reference[group]
                line += f" {ref_r:7.4f} {r - ref_r:+8.4f}  {n:7.4f} {ref_n:7.4f} {n - ref_n:+8.4f}"
            else:
                line += f" {'-':>7} {'-':>8}  {n:7.4f} {'-':>7} {'-':>8}"
            print(line)
            if name == "most-popular":
                ok &= abs(r - ref_r) <= TOLERANCE and abs(n - ref_n) <= TOLERANCE
                ok &= result.points[group] == REFERENCE_POINTS[group]
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--lam", type=float, default=500.0, help="EASE lambda of the reference row")
    parser.add_argument("--tune", action="store_true", help="also tune EASE lambda on validation users")
    parser.add_argument("--local-loader", action="store_true", help="read the .dat files without model.data")
    parser.add_argument("--report-dir", type=Path, default=None, help="write report.{json,md} and PNGs here")
    args = parser.parse_args()

    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = load_local(args.data_dir) if args.local_loader else load_movielens(args.data_dir)
    split = split_users(data)
    catalog = data.catalog_item_ids()
    points = build_eval_points(data, split.test)
    timings["load+split+points"] = time.perf_counter() - start
    print(
        f"{data.name}: {len(data.interactions)} interactions, catalog {len(catalog)}, users "
        f"{len(split.train)}/{len(split.validation)}/{len(split.test)}, {len(points)} test points"
    )

    results: dict[str, EvaluationResult] = {}
    builders = {
        "most-popular": lambda: MostPopular.fit(data, split.train, catalog),
        "segment-popular": lambda: SegmentPopular.fit(data, split.train, catalog),
        "ease": lambda: Ease.fit(data, split.train, catalog, args.lam),
    }
    for name, build in builders.items():
        start = time.perf_counter()
        model = build()
        timings[f"{name} fit"] = time.perf_counter() - start
        start = time.perf_counter()
        results[name] = evaluate(model, points, catalog, progress=False)
        timings[f"{name} eval"] = time.perf_counter() - start

    ok = print_comparison(results)
    print(f"most-popular within +-{TOLERANCE}: {'yes' if ok else 'NO'}")

    extra: dict[str, object] = {"ease_lambda": args.lam, "n_catalog": int(len(catalog))}
    if args.tune:
        start = time.perf_counter()
        tuning = tune_lambda(data, split, catalog)
        timings["ease tune"] = time.perf_counter() - start
        print(
            "EASE validation recall@50 by lambda: "
            + ", ".join(f"{lam:g}: {v:.4f}" for lam, v in tuning.validation.items())
        )
        print(f"EASE tuned lambda = {tuning.best_lambda:g}")
        tuned = evaluate(tuning.model, points, catalog, progress=False)
        tuned.name = f"ease-tuned(lam={tuning.best_lambda:g})"
        results[tuned.name] = tuned
        print_comparison({tuned.name: tuned})
        extra["ease_tuned_lambda"] = tuning.best_lambda
        extra["ease_validation_recall@50"] = {str(k): v for k, v in tuning.validation.items()}

    for name, seconds in timings.items():
        print(f"time {name:<24} {seconds:7.2f} s")
    if args.report_dir is not None:
        write_report(results, args.report_dir, data.name, {**extra, "timings_s": timings})
        print(f"report written to {args.report_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
