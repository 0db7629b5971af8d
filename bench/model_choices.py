"""Cold & Warm Net's model and training choices, each variant measured on the validation users.

Every variant is Cold & Warm Net with some ModelConfig / TrainConfig fields changed, trained on the
train users of MovieLens-1M (users 1–2,999) with one seed (COLDWARM_TRAIN__SEED, default 0) and
evaluated on the validation points by the protocol's own code: Recall@50 / NDCG@50 per group and the
gate's mean cold weight. Each variant spells out the fields it changes, and COLDWARM_RECIPE is not
applied: the count + window variants are the batched_starts recipe written out. The test users are not
touched: choices are made here, and the test figures (bench/offline_quality.py) are reported once, for
what was chosen.

Run: python bench/model_choices.py [--data-dir ../shared/data/ml-1m-first2999] [--variants "a;b"|all]
Writes bench/results/model_choices.json and .md; a run with --variants keeps the other variants' rows.
With --seeds 0,1,2 every variant is trained once per seed, into bench/results/model_choices_seeds.*:
one validation seed moves cold start by about as much as the choices it is asked to decide.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from coldwarm.cli import build_context, setup_logging
from model.data.loading import load_dataset
from model.data.schema import InteractionData
from model.evaluation.protocol import evaluate, gate_cold_summary
from model.evaluation.seeds import sample_std
from model.experiments import train_variant
from model.ranker import ModelRanker
from model.samples import SAMPLE_FIELDS
from model.settings import Settings, TrainConfig
from model.train import TrainedModel, TrainingContext, continue_with_warm_phase, set_torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-1m-first2999"
RESULTS = ROOT / "bench" / "results"
GROUPS: tuple[str, ...] = ("cold_start", "warm_up", "active", "all")
log = logging.getLogger("bench")

# Up to 16 epochs, stopped on every validation user's NDCG@50: the 8-epoch default stops SASRec while
# it still improves, and stopping on cold-start users alone picks an epoch that is not the warm users'.
LONGER_TRAINING: dict[str, Any] = {"epochs": 16, "validation_group": "all", "validation_metric": "ndcg@50"}
# What every variant below was measured against, spelt out so that a rerun measures the same thing
# whatever the defaults become: the embedding mixing without a warm phase, the experts reading the
# profile alone and every prefix trained towards its next action (the default until score mixing with
# a warm phase measured best over three seeds).
EMBEDDING_MIXING: dict[str, Any] = {
    "expert_mixing": "embedding",
    "expert_state_input": False,
    "expert_state_columns": "all",
}
NO_WARM_PHASE: dict[str, Any] = {"warm_phase_epochs": 0}
NEXT_ACTION_ONLY: dict[str, Any] = {"target_window": 1}
# Which page of a sign-up a user is on (MovieLens: the first five ratings are one), for both experts.
EXPERTS_READ_THE_COUNT: dict[str, Any] = {"expert_state_input": True, "expert_state_columns": "count"}
# The prefixes of cold start and a little beyond, each trained towards its next ten actions (the
# protocol's targets), its copies sharing one sample's weight.
TARGET_WINDOW: dict[str, Any] = {
    "target_window": 10,
    "target_window_until": 10,
    "target_window_mode": "prefix",
}

COLD_START_NDCG_STOP: dict[str, Any] = {"validation_group": "cold_start", "validation_metric": "ndcg@50"}


def from_the_paper_form(
    model: dict[str, Any], train: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overrides against the embedding mixing without a warm phase, the experts reading no state and
    every prefix trained towards its next action only (their own entries win)."""
    return EMBEDDING_MIXING | model, NO_WARM_PHASE | NEXT_ACTION_ONLY | train


# name -> (model overrides, train overrides). The first rows were measured on mean pooling, which they
# name; attention pooling has been the warm expert's reading since.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default (warm: attention pooling)": from_the_paper_form({}, {}),
    "warm: mean pooling (the default before)": from_the_paper_form({"warm_pooling": "mean"}, {}),
    "mean pooling, experts read the state": from_the_paper_form(
        {"warm_pooling": "mean", "expert_state_input": True}, {}
    ),
    "mean pooling, history balance 0.5": from_the_paper_form(
        {"warm_pooling": "mean"}, {"history_balance": 0.5}
    ),
    "mean pooling, item-tower inputs": from_the_paper_form(
        {"warm_pooling": "mean", "warm_item_inputs": "item_tower"}, {}
    ),
    "attention pooling, item-tower inputs": from_the_paper_form({"warm_item_inputs": "item_tower"}, {}),
    "attention pooling, 2 blocks": from_the_paper_form({"warm_attention_blocks": 2}, {}),
    "attention pooling, action skip": from_the_paper_form({"warm_action_skip": True}, {}),
    "attention pooling, item-tower inputs, action skip": from_the_paper_form(
        {"warm_item_inputs": "item_tower", "warm_action_skip": True}, {}
    ),
    "DKD on cold-start samples": from_the_paper_form({"use_dkd": True, "dkd_scope": "cold_start"}, {}),
    "early stopping on all users' NDCG@50": from_the_paper_form(
        {}, {"validation_group": "all", "validation_metric": "ndcg@50"}
    ),
    "early stopping on all users' NDCG@50, up to 16 epochs": from_the_paper_form({}, LONGER_TRAINING),
    "warm expert: SASRec's encoder + profile, up to 16 epochs": from_the_paper_form(
        {"warm_expert": "sequence"}, LONGER_TRAINING
    ),
    "dot product similarity": from_the_paper_form({"similarity": "dot"}, {}),
    "default, then a warm phase of up to 8 epochs": from_the_paper_form({}, {"warm_phase_epochs": 8}),
    "score mixing (each expert its own item tower)": from_the_paper_form({"expert_mixing": "score"}, {}),
    "score mixing (each expert its own item tower), up to 16 epochs": from_the_paper_form(
        {"expert_mixing": "score"}, LONGER_TRAINING
    ),
    "score mixing, then a warm phase of up to 8 epochs": from_the_paper_form(
        {"expert_mixing": "score"}, {"warm_phase_epochs": 8}
    ),
    "score mixing, a state term of 8": from_the_paper_form(
        {"expert_mixing": "score", "state_item_dims": 8}, {}
    ),
    "score mixing, warm phase, a state term of 8": from_the_paper_form(
        {"expert_mixing": "score", "state_item_dims": 8}, {"warm_phase_epochs": 8}
    ),
    "score mixing, stage popularity": from_the_paper_form(
        {"expert_mixing": "score", "stage_popularity": True}, {}
    ),
    "score mixing, warm phase, stage popularity": from_the_paper_form(
        {"expert_mixing": "score", "stage_popularity": True}, {"warm_phase_epochs": 8}
    ),
    "score mixing, a target window of 10 below 10 actions": from_the_paper_form(
        {"expert_mixing": "score"}, TARGET_WINDOW
    ),
    "score mixing, warm phase, a target window of 10 below 10 actions": from_the_paper_form(
        {"expert_mixing": "score"}, TARGET_WINDOW | {"warm_phase_epochs": 8}
    ),
    "score mixing, warm phase, experts read the count": from_the_paper_form(
        {"expert_mixing": "score"} | EXPERTS_READ_THE_COUNT, {"warm_phase_epochs": 8}
    ),
    "score mixing, experts read the count": from_the_paper_form(
        {"expert_mixing": "score"} | EXPERTS_READ_THE_COUNT, {}
    ),
    "score mixing, experts read the count, a target window of 10 below 10 actions": from_the_paper_form(
        {"expert_mixing": "score"} | EXPERTS_READ_THE_COUNT, TARGET_WINDOW
    ),
    "score mixing, warm phase, experts read the count, a target window of 10 below 10 actions": (
        from_the_paper_form(
            {"expert_mixing": "score"} | EXPERTS_READ_THE_COUNT, TARGET_WINDOW | {"warm_phase_epochs": 8}
        )
    ),
    # The batched_starts recipe's warm phase ran all 8 epochs in every seed, its best the last.
    "the MovieLens recipe, a warm phase of up to 16 epochs": from_the_paper_form(
        {"expert_mixing": "score"} | EXPERTS_READ_THE_COUNT, TARGET_WINDOW | {"warm_phase_epochs": 16}
    ),
    # Cold start trails onboarding-popular on NDCG@50, not on Recall@50, which picks the main loop's epoch.
    "the MovieLens recipe's main loop, stopped on cold-start NDCG@50": from_the_paper_form(
        {"expert_mixing": "score"} | EXPERTS_READ_THE_COUNT, TARGET_WINDOW | COLD_START_NDCG_STOP
    ),
    "the MovieLens recipe, its main loop stopped on cold-start NDCG@50": from_the_paper_form(
        {"expert_mixing": "score"} | EXPERTS_READ_THE_COUNT,
        TARGET_WINDOW | COLD_START_NDCG_STOP | {"warm_phase_epochs": 8},
    ),
}
# Baselines measured beside the variants on the same validation users, trained with their own recipe
# (model/experiments.py), so a variant is judged against what it must beat, not only against itself.
# name -> (trained model, train overrides).
REFERENCES: dict[str, tuple[str, dict[str, Any]]] = {
    "SASRec (baseline)": ("sasrec", {}),
    "YouTubeDNN (baseline)": ("youtube_dnn", {}),
    "SASRec (baseline), up to 16 epochs": ("sasrec", LONGER_TRAINING),
}


class Contexts:
    """The training contexts of one data set, one per samples configuration (``SAMPLE_FIELDS``): a
    variant that shapes its samples (a target window) trains on samples built with its settings. All
    are built with the settings' seed: the training seeds of a variant share one draw of samples."""

    def __init__(self, data: InteractionData, settings: Settings) -> None:
        self.data, self.settings = data, settings
        self._built: dict[tuple[Any, ...], TrainingContext] = {}

    def for_samples(self, train: TrainConfig) -> TrainingContext:
        key = tuple(getattr(train, name) for name in SAMPLE_FIELDS)
        if key not in self._built:
            shaped = self.settings.train.model_copy(
                update={name: getattr(train, name) for name in SAMPLE_FIELDS}
            )
            self._built[key] = build_context(self.data, self.settings.model_copy(update={"train": shaped}))
        return self._built[key]


def measure(name: str, contexts: Contexts, settings: Settings) -> dict[str, dict[str, Any]]:
    """Rows of one training: the variant's; for a variant with a warm phase, also the row of the
    variant its main loop is (``main_loop_variant``), measured on the same net before the phase."""
    trained_name, train_override = REFERENCES.get(name, ("cold_warm_net", {}))
    model_override, variant_train = VARIANTS.get(name, ({}, {}))
    train_override = train_override | variant_train
    model_config = settings.model.model_copy(update=model_override)
    train_config = settings.train.model_copy(update=train_override)
    context = contexts.for_samples(train_config)
    rows: dict[str, dict[str, Any]] = {}
    main_loop = train_config.model_copy(update={"warm_phase_epochs": 0})
    trained = train_variant(trained_name, context, model_config, main_loop, None, progress=False)
    if train_config.warm_phase_epochs:
        main_override = {k: v for k, v in train_override.items() if k != "warm_phase_epochs"}
        rows[main_loop_variant(name)] = measured_row(
            trained, context, model_override, main_override, main_loop.seed
        )
        continue_with_warm_phase(trained, context, train_config, progress=False)
    rows[name] = measured_row(trained, context, model_override, train_override, train_config.seed)
    return rows


def main_loop_variant(name: str) -> str:
    """The variant that is ``name``'s main loop alone (its overrides, without a warm phase): one
    training measures both."""
    model, train = VARIANTS[name]
    alone = (model, train | NO_WARM_PHASE)
    return next(other for other, overrides in VARIANTS.items() if overrides == alone)


def measured_row(
    trained: TrainedModel,
    context: TrainingContext,
    model_override: dict[str, Any],
    train_override: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    data, points = context.data, context.validation_points
    catalog = data.catalog_item_ids()
    ranker = ModelRanker(trained.name, trained.net, context.encoder, data.users, catalog)
    result = evaluate(ranker, points, catalog, progress=False)
    gates = gate_cold_summary(points, ranker.gates(points))
    main = [e for e in trained.epochs if "validation" in e]
    best = max(main, key=lambda e: e["validation"])
    phase = [e for e in trained.epochs if "warm_phase_validation" in e]
    row = {
        "trained": trained.name,
        "model": model_override,
        "train": train_override,
        "seed": seed,
        "groups": {
            g: {m: round(result.groups[g][m], 4) for m in ("recall@50", "ndcg@50", "ndcg@10")} for g in GROUPS
        },
        "curve": {str(h): round(ms["recall@50"], 4) for h, ms in result.curve.items()},
        "gate_cold_mean": {g: round(v["gate_cold"], 4) for g, v in gates.groups.items()},
        "gate_cold_curve": {str(h): round(v["gate_cold"], 3) for h, v in gates.curve.items()},
        "epochs": len(main),
        "best_epoch": int(best["epoch"]),
        **(
            {
                "warm_phase_epochs": len(phase),
                "warm_phase_best_epoch": int(max(phase, key=lambda e: e["warm_phase_validation"])["epoch"]),
            }
            if phase
            else {}
        ),
        "seconds": round(trained.seconds, 1),
    }
    log.info("%s (seed %d): %s", trained.name, seed, json.dumps(row["groups"]))
    return row


def markdown(rows: dict[str, dict[str, Any]], dataset: str, seed: int) -> str:
    lines = [
        f"Validation users of {dataset}, training seed {seed}; Recall@50 / NDCG@50 per group, "
        "the gate's mean cold weight (cold_start / warm_up / active), epochs run (best; then the warm "
        "phase's), training seconds "
        "(1 torch thread, with other jobs beside it: not a speed comparison).",
        "",
        "| variant | " + " | ".join(GROUPS) + " | gate cold | epochs | s |",
        "|---|" + "---|" * (len(GROUPS) + 3),
    ]
    for name, row in rows.items():
        cells = [f"{row['groups'][g]['recall@50']:.4f} / {row['groups'][g]['ndcg@50']:.4f}" for g in GROUPS]
        gate = " / ".join(f"{row['gate_cold_mean'].get(g, 0.0):.2f}" for g in GROUPS[:3])
        epochs = f"{row['epochs']} ({row['best_epoch']})"
        if "warm_phase_epochs" in row:
            epochs += f" + {row['warm_phase_epochs']} warm ({row['warm_phase_best_epoch']})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gate} | {epochs} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def chosen_variants(text: str) -> list[str]:
    known = [*VARIANTS, *REFERENCES]
    if text == "all":
        return known
    names = [n.strip() for n in text.split(";") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {known}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--variants", default="all", help="semicolon-separated names of VARIANTS or REFERENCES, or all"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "model_choices")
    parser.add_argument(
        "--seeds",
        default="",
        help="comma-separated training seeds: each variant is trained once per seed and the means and "
        "standard deviations go to OUT_seeds.json / .md (default: the one seed of the settings, into OUT)",
    )
    args = parser.parse_args()
    names = chosen_variants(args.variants)
    setup_logging()
    settings = Settings()
    set_torch_threads(settings.train)
    data = load_dataset(str(args.data_dir))
    contexts = Contexts(data, settings)
    if args.seeds:
        measure_seeds(names, [int(s) for s in args.seeds.split(",")], contexts, settings, args.out)
        return
    json_path = args.out.with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    rows = {
        name: row
        for name, row in previous.get("variants", {}).items()
        if name in VARIANTS or name in REFERENCES
    }
    for name in names:
        started = time.perf_counter()
        rows.update(measure(name, contexts, settings))
        log.info("%s measured in %.0fs", name, time.perf_counter() - started)
        summary = {"dataset": data.name, "seed": settings.train.seed, "variants": rows}
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(rows, data.name, settings.train.seed))
    print(markdown(rows, data.name, settings.train.seed))


def measure_seeds(
    names: list[str], seeds: list[int], contexts: Contexts, settings: Settings, out: Path
) -> None:
    """Every variant once per seed (seed by seed, so that a stopped run has whole seeds); the rows are
    kept per seed, with the runs of earlier invocations for other seeds or variants."""
    json_path = out.with_name(out.name + "_seeds.json")
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    runs: dict[str, dict[str, Any]] = previous.get("variants", {})
    for seed in seeds:
        seeded = settings.model_copy(update={"train": settings.train.model_copy(update={"seed": seed})})
        for name in names:
            for measured, row in measure(name, contexts, seeded).items():
                runs.setdefault(measured, {})[str(seed)] = row
            json_path.write_text(
                json.dumps({"dataset": contexts.data.name, "variants": runs}, indent=2) + "\n"
            )
            json_path.with_suffix(".md").write_text(seeds_markdown(runs, contexts.data.name))
    print(seeds_markdown(runs, contexts.data.name))


def seeds_markdown(runs: dict[str, dict[str, Any]], dataset: str) -> str:
    lines = [
        f"Validation users of {dataset}; Recall@50 / NDCG@50 per group as mean ± standard deviation over "
        "the training seeds listed (each run's own figures are in the JSON).",
        "",
        "| variant | seeds | " + " | ".join(GROUPS) + " |",
        "|---|---|" + "---|" * len(GROUPS),
    ]
    for name, by_seed in runs.items():
        cells = []
        for group in GROUPS:
            recall, ndcg = (
                [row["groups"][group][metric] for row in by_seed.values()]
                for metric in ("recall@50", "ndcg@50")
            )
            cells.append(f"{mean_std(recall)} / {mean_std(ndcg)}")
        lines.append(f"| {name} | {', '.join(sorted(by_seed))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {sample_std(values):.4f}"


if __name__ == "__main__":
    main()
