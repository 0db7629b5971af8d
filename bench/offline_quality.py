"""The whole evaluation protocol on MovieLens-1M (users 1–2,999): every model, every group, the plots.

Run: python bench/offline_quality.py [--data-dir ../shared/data/ml-1m-first2999] [--models all]
Writes bench/results/offline_quality.json and bench/results/offline_quality/ (report.md, plots).
Needs the shared data (or any MovieLens directory), so it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from model.cli import build_context, setup_logging
from model.data.movielens import load_movielens
from model.evaluation.report import markdown_table, write_report
from model.experiments import ALL_MODELS, check_model_names, run_experiments
from model.settings import Settings
from model.train import set_torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-1m-first2999"
RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", default="all", help=f"comma-separated or 'all': {', '.join(ALL_MODELS)}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    setup_logging()
    started = time.perf_counter()
    settings = Settings()
    set_torch_threads(settings.train)
    models = check_model_names(list(ALL_MODELS) if args.models == "all" else args.models.split(","))
    data = load_movielens(args.data_dir)
    context = build_context(data, settings)
    outcome = run_experiments(context, settings, models)
    wall = round(time.perf_counter() - started, 1)
    details = {
        **outcome.details,
        "wall_seconds": wall,
        "settings": settings.model_dump(mode="json"),
        "training": {
            n: {"epochs": t.epochs, "seconds": round(t.seconds, 1)} for n, t in outcome.trained.items()
        },
    }
    # The full report (markdown, plots, per-h tables) sits beside the summary the README quotes.
    write_report(outcome.results, args.out_dir / "offline_quality", data.name, details)
    summary = {
        "dataset": data.name,
        "wall_seconds": wall,
        "points": {g: n for g, n in next(iter(outcome.results.values())).points.items()},
        "models": {name: result.groups for name, result in outcome.results.items()},
        "curve": {
            name: {str(h): m for h, m in result.curve.items()} for name, result in outcome.results.items()
        },
        "details": details,
    }
    (args.out_dir / "offline_quality.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(markdown_table(outcome.results))
    log.info("wrote %s in %.0fs", args.out_dir / "offline_quality.json", wall)


if __name__ == "__main__":
    main()
