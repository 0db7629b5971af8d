"""Where a data set's sign-up flow turns a page: per position in the users' sequences (the protocol's
order: time, then item id), the share of actions that come more than a minute after the previous one,
and how much the most-chosen items of the first actions overlap with those of the next ones.

On MovieLens-1M this shows why the cold-start curve falls at h = 5: the first five ratings are one page
of the sign-up, and the next ten (the protocol's targets at h = 5) are other items.

Run: python bench/onboarding_pages.py [--data ../shared/data/ml-1m-first2999]
Writes bench/results/onboarding_pages.json and .md (aggregates only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from model.data.loading import load_dataset

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-1m-first2999"
RESULTS = ROOT / "bench" / "results" / "onboarding_pages"
PAUSE_S = 60
TOP = 50


def positions(interactions: pd.DataFrame) -> pd.DataFrame:
    """Each action's position in its user's sequence and the seconds since the previous one; loaded
    interactions are already in the protocol's order (``normalise_interactions``)."""
    by_user = interactions.groupby("user_id")
    return interactions.assign(position=by_user.cumcount(), gap=by_user["timestamp"].diff())


def top_items(frame: pd.DataFrame, lo: int, hi: int) -> tuple[set[int], float]:
    """The TOP most-chosen items at positions [lo, hi), and the share of those actions they take."""
    counts = frame[(frame.position >= lo) & (frame.position < hi)]["item_id"].value_counts()
    return set(counts.head(TOP).index.tolist()), float(counts.head(TOP).sum() / max(counts.sum(), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--positions", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    data = load_dataset(args.data)
    frame = positions(data.interactions)
    paused = {
        int(p): round(float((frame[frame.position == p]["gap"] > PAUSE_S).mean()), 3)
        for p in range(1, args.positions + 1)
    }
    windows = [(0, 5), (5, 15), (15, 25)]
    tops = {f"{lo}-{hi - 1}": top_items(frame, lo, hi) for lo, hi in windows}
    names = list(tops)
    overlap = {
        f"{a} vs {b}": len(tops[a][0] & tops[b][0]) for i, a in enumerate(names) for b in names[i + 1 :]
    }
    summary = {
        "dataset": data.name,
        "users": int(frame["user_id"].nunique()),
        f"share of actions more than {PAUSE_S} s after the previous, by position": paused,
        f"share of the actions taken by the top {TOP} items, by positions": {
            name: round(share, 3) for name, (_, share) in tops.items()
        },
        f"top-{TOP} items in common": overlap,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    typical = float(np.median([v for p, v in paused.items() if p != 5]))
    lines = [
        f"Command: `python bench/onboarding_pages.py` ({data.name}, {summary['users']} users, all of them)",
        "",
        f"| position | {' | '.join(str(p) for p in paused)} |",
        f"|---|{'---|' * len(paused)}",
        f"| share > {PAUSE_S} s after the previous | {' | '.join(f'{v:.2f}' for v in paused.values())} |",
        "",
        f"- Median over the other positions: {typical:.2f}.",
        *(
            f"- Top {TOP} items of positions {name}: {share:.1%} of those actions."
            for name, (_, share) in tops.items()
        ),
        *(f"- Top-{TOP} items in common, positions {pair}: {n}." for pair, n in overlap.items()),
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
