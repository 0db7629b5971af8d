"""Resident memory across repeated hot reloads: does a reload leak the version it replaces?

    python bench/reload_memory.py --artifacts artifacts --reloads 30

Loads the artifacts into a ``Recommender`` as the service does, reloads them ``--reloads`` times (each
reload builds a complete new bundle: TorchScript tower, encoder, FAISS index, then swaps and frees the
old one) and prints this process's VmRSS after each. A leak grows linearly; a healthy run plateaus.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import warnings
from pathlib import Path

from index_builder.settings import IndexSettings
from service.engine import Recommender, configure_threads, load_bundle


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


async def measure(artifacts: Path, reloads: int) -> list[float]:
    configure_threads(1, 1)
    recommender = Recommender(load_bundle(artifacts, IndexSettings()), history_cap=50)
    sizes = []
    for n in range(1, reloads + 1):
        await recommender.reload(artifacts, IndexSettings())
        sizes.append(rss_mb())
        print(f"reload {n:3d}: RSS {sizes[-1]:.1f} MB", flush=True)
    recommender.close()
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--reloads", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit's, once per load
    sizes = asyncio.run(measure(args.artifacts, args.reloads))
    half = len(sizes) // 2
    print(
        f"first {sizes[0]:.1f} MB, middle {sizes[half]:.1f} MB, last {sizes[-1]:.1f} MB: "
        f"{sizes[-1] - sizes[half]:+.1f} MB over the second half"
    )


if __name__ == "__main__":
    main()
