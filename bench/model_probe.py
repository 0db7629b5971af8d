"""A quick probe of one Cold & Warm Net configuration on the validation users: the main loop alone for
a few epochs (no warm phase, no early stop), then every group's Recall@50 / NDCG@50, the per-h
Recall@50 curve and the gate's cold weight per h, the learnt scale s and the training loss per epoch.

A probe is not a choice: choices take three validation seeds of the whole recipe
(bench/model_choices.py). It tells in about ten minutes whether an idea is worth those seeds, and
why one is not (a term that pulls the scale down, a curve that falls at h = 1..3).

Run: COLDWARM_MODEL__STAGE_POPULARITY=true python bench/model_probe.py --label "stage popularity"
The configuration is the settings' (COLDWARM_* variables) as given: COLDWARM_RECIPE is not applied, so
the probes compare field against field (set the recipe's fields to probe with them); writes
bench/results/model_probe.json (one entry per label, kept across runs) and prints the entry.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from coldwarm.cli import build_context, setup_logging
from model.data.movielens import load_movielens
from model.evaluation.protocol import evaluate, gate_cold_summary
from model.ranker import ModelRanker
from model.settings import Settings
from model.train import fit_cold_warm_net, set_torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-1m-first2999"
RESULTS = ROOT / "bench" / "results" / "model_probe.json"
log = logging.getLogger("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the entry's name in the results")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    setup_logging()
    settings = Settings()
    set_torch_threads(settings.train)
    data = load_movielens(args.data_dir)
    context = build_context(data, settings)
    train = settings.train.model_copy(
        update={"epochs": args.epochs, "warm_phase_epochs": 0, "patience": args.epochs}
    )
    trained = fit_cold_warm_net(context, settings.model, train, progress=False)
    catalog = data.catalog_item_ids()
    ranker = ModelRanker(trained.name, trained.net, context.encoder, data.users, catalog)
    result = evaluate(ranker, context.validation_points, catalog, progress=False)
    gates = gate_cold_summary(context.validation_points, ranker.gates(context.validation_points))
    entry = {
        "model": settings.model.model_dump(mode="json", exclude_defaults=True),
        "train": settings.train.model_dump(mode="json", exclude_defaults=True, exclude={"torch_threads"}),
        "seed": settings.train.seed,
        "epochs": [
            {
                "epoch": int(e["epoch"]),
                "loss": round(e["loss"], 4),
                f"{train.validation_group} {train.validation_metric}": round(e["validation"], 4),
            }
            for e in trained.epochs
        ],
        "scale": round(float(trained.net.scale), 3),
        "groups": {
            g: {m: round(result.groups[g][m], 4) for m in ("recall@50", "ndcg@50")} for g in result.groups
        },
        "curve": {str(h): round(ms["recall@50"], 4) for h, ms in result.curve.items()},
        "gate_cold_curve": {str(h): round(v["gate_cold"], 3) for h, v in gates.curve.items()},
    }
    entries = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries[args.label] = entry
    args.out.write_text(json.dumps(entries, indent=2) + "\n")
    print(json.dumps({args.label: entry}, indent=2))


if __name__ == "__main__":
    main()
