"""compute_batch per user by search backend and batch size: FAISS over-fetching and filtering the
exclusions afterwards, against exact torch search leaving them out before its top-k (what
``COLDWARM_INDEX_EXACT_BATCH_FROM`` chooses between on a flat index).

Both run the engine's own ``compute_batch`` on the same bundle (tower, encoder, folded item vectors);
only the searcher differs. Requests are those of the serving benchmark: k 50, the user's seen items
excluded (``exclude_seen``), users drawn from ``--data`` with their records as of the data's end. Two
catalogs: the artifacts' own, and ``--items`` random unit vectors behind the same tower (a catalog
where the search, not the tower, dominates). One thread; the variants interleaved round by round;
medians of ``--rounds``.

Run: python bench/search_backend_cost.py --artifacts ARTIFACTS --data DATA [--items 100000]
Writes bench/results/search_backend_cost.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import faiss
import numpy as np
import torch
from exclusion_cost import medians, with_large_catalog  # bench/ is not a package: run as a script

from index_builder.search_backends import FaissSearch
from index_builder.settings import IndexSettings
from model.data.loading import load_dataset
from service.engine import RecommendQuery, ServingBundle, compute_batch, load_bundle
from service.feature_store import records_from_interactions

RESULTS = Path(__file__).resolve().parent / "results"
K = 50
BATCHES = (1, 2, 4, 8, 16, 32, 64, 256)
log = logging.getLogger("bench")


def searchers(bundle: ServingBundle) -> dict[str, ServingBundle]:
    """The bundle with FAISS flat for every batch (over-fetch and filter), and with its own exact
    torch search for every batch (masked)."""
    return {
        "faiss flat": dataclasses.replace(bundle, searcher=FaissSearch(bundle.index), exact_batch_from=None),
        "torch exact": dataclasses.replace(bundle, searcher=bundle.exact),
    }


def request_batches(data_dir: str, bundle: ServingBundle, seed: int = 0) -> dict[int, list[RecommendQuery]]:
    """For each batch size, that many users' requests (k 50, seen items excluded)."""
    data = load_dataset(data_dir)
    rng = np.random.default_rng(seed)
    users = rng.choice(data.users["user_id"].to_numpy(), size=max(BATCHES), replace=False)
    cap = bundle.artifacts.encoder.config.max_history
    records = records_from_interactions(data, [int(u) for u in users], cap=cap)
    now = int(data.interactions["timestamp"].max()) + 3600
    queries = [RecommendQuery(r, now, K, frozenset(r.actions)) for r in records]
    return {batch: queries[:batch] for batch in BATCHES}


def measure(bundle: ServingBundle, batches: dict[int, list[RecommendQuery]], rounds: int) -> list[dict]:
    by_searcher = searchers(bundle)
    variants = {
        (name, batch): (lambda b=b, q=q: compute_batch(b, q))
        for batch, q in batches.items()
        for name, b in by_searcher.items()
    }
    for call in variants.values():  # warm-up: first-call allocations
        call()
    ms = medians({f"{name}|{batch}": call for (name, batch), call in variants.items()}, rounds)
    rows = []
    for batch in batches:
        faiss_ms, torch_ms = ms[f"faiss flat|{batch}"], ms[f"torch exact|{batch}"]
        rows.append(
            {
                "batch": batch,
                "faiss_flat_us_per_user": round(faiss_ms * 1e3 / batch, 1),
                "torch_exact_us_per_user": round(torch_ms * 1e3 / batch, 1),
                "torch_over_faiss": round(torch_ms / faiss_ms, 3),
            }
        )
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"compute_batch per user (k {K}, seen items excluded), 1 thread, median of {result['rounds']} "
        f"interleaved rounds: `{result['command']}`",
        "",
        "| catalog | items | batch | FAISS flat, µs/user | torch exact (masked), µs/user | torch / FAISS |",
        "|---|---|---|---|---|---|",
    ]
    for catalog in result["catalogs"]:
        for row in catalog["rows"]:
            lines.append(
                f"| {catalog['name']} | {catalog['items']:,} | {row['batch']} "
                f"| {row['faiss_flat_us_per_user']} | {row['torch_exact_us_per_user']} "
                f"| {row['torch_over_faiss']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="artifacts root or version")
    parser.add_argument("--data", required=True, help="the data the artifacts were trained on")
    parser.add_argument("--items", type=int, default=100_000, help="random catalog size (0: none)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "search_backend_cost")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    bundle = load_bundle(args.artifacts, IndexSettings(type="flat"), device="cpu")
    batches = request_batches(args.data, bundle)
    catalogs = [("artifacts", bundle)]
    if args.items:
        catalogs.append(("random", with_large_catalog(bundle, args.items, "flat")))
    result = {
        "command": "python bench/search_backend_cost.py --artifacts A --data "
        f"{args.data} --items {args.items} --rounds {args.rounds}",
        "rounds": args.rounds,
        "catalogs": [],
    }
    for name, catalog_bundle in catalogs:
        log.info("measuring %s (%d items)", name, catalog_bundle.n_items)
        rows = measure(catalog_bundle, batches, args.rounds)
        result["catalogs"].append({"name": name, "items": catalog_bundle.n_items, "rows": rows})
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
