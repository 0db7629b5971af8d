"""How Cold & Warm Net learns the request time: variants measured on the validation users.

Each variant is trained on the train users of MovieLens-1M (users 1–2,999) and evaluated on the
validation points twice: at the data's own time (the protocol's "now": the next interaction), and at
a wall clock long after the data ends (a service deployed today on this data; every user returns
after years). Recall@50 / NDCG@50 and the gate's mean cold weight per group, side by side.

Run: python bench/request_time_choice.py [--data-dir ../shared/data/ml-1m-first2999]
Writes bench/results/request_time_choice.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from coldwarm.cli import setup_logging
from model.data.loading import load_dataset
from model.data.split import split_users
from model.evaluation.protocol import EvalPoint, evaluate, gate_cold_means
from model.features import FeatureEncoder
from model.ranker import ModelRanker
from model.settings import Settings
from model.train import TrainingContext, fit_cold_warm_net, set_torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-1m-first2999"
RESULTS = ROOT / "bench" / "results"
# A fixed "today" (2026-12-01 00:00 UTC), so that reruns measure the same thing.
WALL_CLOCK = 1_796_083_200
log = logging.getLogger("bench")

# name -> (feature overrides, train overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "before (no coverage, data time only)": ({"min_state_samples": 0}, {"session_start_share": 0.0}),
    "coverage only": ({}, {"session_start_share": 0.0}),
    "coverage + data gaps (50%)": ({}, {"session_start_share": 0.5, "long_gap_share": 0.0}),
    "coverage + data gaps + log-uniform tail (50%)": (
        {},
        {"session_start_share": 0.5, "long_gap_share": 0.5},
    ),
    "coverage + data gaps + log-uniform tail (20%)": (
        {},
        {"session_start_share": 0.2, "long_gap_share": 0.5},
    ),
    "same (50%), from 10 actions on": ({}, {"session_start_share": 0.5, "session_start_from": 10}),
    "same (50%), from 6 actions on": ({}, {"session_start_share": 0.5, "session_start_from": 6}),
}


def at_wall_clock(points: list[EvalPoint]) -> list[EvalPoint]:
    return [dataclasses.replace(p, request_time=WALL_CLOCK) for p in points]


def measure(name: str, data: Any, settings: Settings) -> dict[str, Any]:
    features_override, train_override = VARIANTS[name]
    features = settings.features.model_copy(update=features_override)
    train = settings.train.model_copy(update=train_override)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, features)
    context = TrainingContext.build(data, split, encoder, train)
    started = time.perf_counter()
    trained = fit_cold_warm_net(context, settings.model, train, "cold_warm_net", progress=False)
    catalog = data.catalog_item_ids()
    row: dict[str, Any] = {
        "features": features_override,
        "train": train_override,
        "seconds": round(time.perf_counter() - started, 1),
        "remapped_state_buckets": encoder.remapped_state_buckets(),
    }
    for mode, points in (
        ("data_time", context.validation_points),
        ("wall_clock", at_wall_clock(context.validation_points)),
    ):
        ranker = ModelRanker(name, trained.net, encoder, data.users, catalog)
        result = evaluate(ranker, points, catalog, progress=False)
        row[mode] = {
            group: {m: round(result.groups[group][m], 4) for m in ("recall@50", "ndcg@50")}
            for group in result.groups
        }
        gates = gate_cold_means(points, ranker.gates(points))
        row[mode]["gate_cold_mean"] = {group: round(mean, 4) for group, mean in gates.items()}
    log.info("%s: %s", name, json.dumps({k: row[k] for k in ("data_time", "wall_clock")}))
    return row


def markdown(rows: dict[str, dict[str, Any]], dataset: str) -> str:
    groups = ("cold_start", "warm_up", "active")
    lines = [
        f"Validation users of {dataset}; Recall@50 / NDCG@50 at data time → at the wall clock "
        f"({time.strftime('%Y-%m-%d', time.gmtime(WALL_CLOCK))}); "
        "gate: mean cold weight (data time → wall clock).",
        "",
        "| variant | " + " | ".join(groups) + " | gate cold_start | gate warm_up | gate active |",
        "|---|" + "---|" * (2 * len(groups)),
    ]
    for name, row in rows.items():
        cells = [
            f"{row['data_time'][g]['recall@50']:.4f} / {row['data_time'][g]['ndcg@50']:.4f} → "
            f"{row['wall_clock'][g]['recall@50']:.4f} / {row['wall_clock'][g]['ndcg@50']:.4f}"
            for g in groups
        ]
        gates = [
            f"{row['data_time']['gate_cold_mean'][g]:.2f} → {row['wall_clock']['gate_cold_mean'][g]:.2f}"
            for g in groups
        ]
        lines.append(f"| {name} | " + " | ".join(cells + gates) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--variants", default="all", help="comma-separated indices into VARIANTS, or 'all'")
    parser.add_argument("--out", type=Path, default=RESULTS / "request_time_choice")
    args = parser.parse_args()
    setup_logging()
    settings = Settings()
    set_torch_threads(settings.train)
    data = load_dataset(str(args.data_dir))
    names = list(VARIANTS)
    if args.variants != "all":
        names = [names[int(i)] for i in args.variants.split(",")]
    previous = (
        json.loads(args.out.with_suffix(".json").read_text())
        if args.out.with_suffix(".json").exists()
        else {}
    )
    rows = {name: row for name, row in previous.get("variants", {}).items() if name in VARIANTS}
    for name in names:
        rows[name] = measure(name, data, settings)
        args.out.with_suffix(".json").write_text(
            json.dumps({"dataset": data.name, "wall_clock": WALL_CLOCK, "variants": rows}, indent=2)
        )
    args.out.with_suffix(".md").write_text(markdown(rows, data.name))
    print(markdown(rows, data.name))


if __name__ == "__main__":
    main()
