"""The whole evaluation protocol on MovieLens-1M (users 1–2,999): every model, every group, the plots.

Run: python bench/offline_quality.py [--data-dir ../shared/data/ml-1m-first2999] [--models all] [--seeds 3]
Writes bench/results/offline_quality.json and bench/results/offline_quality/ (report.md, plots).
Every trained model is trained --seeds times (seeds COLDWARM_TRAIN__SEED + 0 .. N-1): figures are means
over seeds with their std; Cold & Warm Net is compared with the best baseline of each group by a paired
bootstrap over test users. Deterministic baselines run once. Every trained run is stored under
COLDWARM_CACHE_DIR/runs (or --runs-dir); --reuse sasrec,... takes those models' stored runs (same
data, same settings) instead of training them again, and the report lists each reused run with its
date and commit.
Needs the shared data (or any MovieLens directory), so it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from coldwarm.cli import build_context, settings_for, setup_logging
from model.data.movielens import load_movielens
from model.evaluation.report import markdown_table, seeds_section, write_report
from model.evaluation.run_store import RunStore
from model.experiments import ALL_MODELS, RunReuse, check_model_names, run_experiments
from model.settings import Settings
from model.train import set_torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-1m-first2999"
RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("bench")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", default="all", help=f"comma-separated or 'all': {', '.join(ALL_MODELS)}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--seeds", type=positive_int, default=3, help="training seeds per trained model (default 3)"
    )
    parser.add_argument(
        "--reuse",
        default="",
        help="comma-separated trained models whose runs stored by an earlier run with the same data and "
        "settings stand in for training (listed in the report with their commit); every run is stored",
    )
    parser.add_argument(
        "--only-seeds",
        default="",
        help="comma-separated seeds: train just these of the --seeds (stored for a later --reuse run)",
    )
    parser.add_argument(
        "--stored-only",
        action="store_true",
        help="the --reuse models take the seeds that are stored and train none (the report says how many)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="where runs are stored and reused from (default COLDWARM_CACHE_DIR/runs); a directory that "
        "outlasts the checkout lets a later run reuse the baselines' runs (not the repository: the runs "
        "hold per-point figures of the data set's users)",
    )
    args = parser.parse_args()
    setup_logging()
    started = time.perf_counter()
    settings = Settings()
    set_torch_threads(settings.train)
    models = check_model_names(list(ALL_MODELS) if args.models == "all" else args.models.split(","))
    data = load_movielens(args.data_dir)
    settings, recipe = settings_for(data, settings)
    context = build_context(data, settings)
    reuse = RunReuse(
        RunStore(args.runs_dir or settings.cache_dir / "runs"),
        frozenset(check_model_names(comma_list(args.reuse))),
        stored_only=args.stored_only,
    )
    only_seeds = [int(seed) for seed in comma_list(args.only_seeds)] or None
    outcome = run_experiments(context, settings, models, seeds=args.seeds, reuse=reuse, only_seeds=only_seeds)
    wall = round(time.perf_counter() - started, 1)
    details = {
        **outcome.details,
        "recipe": recipe.to_record(),
        "wall_seconds": wall,
        "settings": settings.model_dump(mode="json"),
        "training": {
            n: {"epochs": t.epochs, "seconds": round(t.seconds, 1)} for n, t in outcome.trained.items()
        },
    }
    # The full report (markdown, plots, per-h tables) sits beside the summary the README quotes.
    write_report(
        outcome.results,
        args.out_dir / "offline_quality",
        data.name,
        details,
        spread=outcome.spread,
        significance=outcome.significance,
    )
    summary = {
        "dataset": data.name,
        "wall_seconds": wall,
        "points": {g: n for g, n in next(iter(outcome.results.values())).points.items()},
        # Means over seeds, and their std across seeds (0.0 for a model run once).
        "models": {name: result.groups for name, result in outcome.results.items()},
        "std": {name: spread.groups for name, spread in outcome.spread.items()},
        "curve": {
            name: {str(h): m for h, m in result.curve.items()} for name, result in outcome.results.items()
        },
        "curve_std": {
            name: {str(h): m for h, m in spread.curve.items()} for name, spread in outcome.spread.items()
        },
        "seeds": {**seeds_section(outcome.spread), "values": outcome.seeds},
        "significance": outcome.significance.to_dict() if outcome.significance else None,
        "details": details,
    }
    (args.out_dir / "offline_quality.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(markdown_table(outcome.results, spread=outcome.spread))
    log.info("wrote %s in %.0fs", args.out_dir / "offline_quality.json", wall)


if __name__ == "__main__":
    main()
