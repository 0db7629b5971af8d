"""In-process parts of ``bench/serve_latency.py``: the batched floor, and the store's read against a plain
redis-py read. No HTTP, against the real Redis and the users serve_latency.py loaded under a key prefix.

serve_latency.py runs this module in a subprocess of its own (``measure_in_subprocess``), before it
starts its servers: the load generator's process stays free of torch and the model, and the
measurement has the machine to itself. It may also be run alone::

    python bench/_serve_floor.py --artifacts artifacts --prefix PREFIX --users users.npy --out floor.json

- **floor**: what one request costs when everything the service must do is done in batches of
  ``--batch`` (64) users and nothing else is: a plain ``redis.asyncio`` MULTI/EXEC of HGETALL + LRANGE
  of each user's two keys (``service/feature_store/keys.py``), then ``service.engine.compute_batch`` of
  those users (encode, user tower, search; k and exclude_seen as the HTTP load asks) on the bundle of
  ``service.engine.load_bundle``, with the service's thread settings (one torch and one FAISS thread).
  The users are drawn like the HTTP load's (``--unknown-fraction`` of them unknown). Each read and each
  compute is timed alone over ``--reps`` repetitions; floor per request = (median read + median
  compute) / batch. The CPU time of each part (``time.process_time``) is recorded too.
- **store vs plain**: ``RedisFeatureStore.get_users([user])`` (a ``create_client`` client, the service's
  pool and timeout) against the plain read of the same user's keys (key strings built in advance, the
  replies left as redis-py returns them), one known user per call, interleaved in rounds whose order
  rotates; ``time_calls`` of ``bench/store_read.py`` times the calls; the ratio is of the medians over
  rounds of each round's p50. Feast's Python SDK is measured when importable (it is not installed here).

Both run on uvloop when installed, as uvicorn serves the service.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ----- run from serve_latency.py ----------------------------------------------------------------------
def measure_in_subprocess(
    artifacts_dir: Path,
    prefix: str,
    user_ids: np.ndarray,
    redis_url: str,
    *,
    k: int,
    unknown_fraction: float,
    seed: int,
    reps: int,
    store_rounds: int,
    store_calls: int,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """This module's ``main`` in a fresh interpreter; its JSON, or ``{"error": ...}`` when it failed."""
    # The servers' environment (bench/serve_latency.py serving_env): their settings, not the index's.
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("COLDWARM_INDEX_")}
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory(prefix="coldwarm-bench-floor-") as tmp:
        users, out = Path(tmp) / "users.npy", Path(tmp) / "floor.json"
        np.save(users, np.asarray(user_ids, dtype=np.int64))
        command = [
            sys.executable, str(Path(__file__).resolve()),
            "--artifacts", str(artifacts_dir), "--prefix", prefix, "--users", str(users),
            "--redis-url", redis_url, "--k", str(k), "--unknown-fraction", str(unknown_fraction),
            "--seed", str(seed), "--reps", str(reps), "--store-rounds", str(store_rounds),
            "--store-calls", str(store_calls), "--out", str(out),
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            return {"error": f"the floor measurement ran past {timeout_s:.0f}s"}
        if done.returncode != 0 or not out.exists():
            return {"error": f"exit {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"}
        return json.loads(out.read_text())


# ----- timing helpers -----------------------------------------------------------------------------------
def _stats(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    return {
        "median_ms": round(statistics.median(ordered), 4),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
        "n": len(ordered),
    }


def plain_multi_read(client: Any, keys: list[tuple[str, str]], last: int) -> Awaitable[list[Any]]:
    """HGETALL + LRANGE(0, last) of each (user key, actions key) in one MULTI/EXEC."""

    async def read() -> list[Any]:
        async with client.pipeline(transaction=True) as pipe:
            for user_key, actions_key in keys:
                pipe.hgetall(user_key)
                pipe.lrange(actions_key, 0, last)
            return await pipe.execute(raise_on_error=False)

    return read()


async def measure_floor(
    bundle: Any, layout: Any, user_ids: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    from redis.asyncio import Redis

    from service.engine import RecommendQuery, compute_batch
    from service.feature_store.redis_store import parse_record

    cap = bundle.artifacts.encoder.config.max_history
    rng = np.random.default_rng([args.seed, 7])
    unknown_base = int(np.max(user_ids)) + 1
    batches: list[list[int]] = []
    for _ in range(32):  # distinct user batches, cycled
        known = rng.choice(user_ids, size=args.batch)
        unknown = unknown_base + rng.integers(0, 1_000_000_000, size=args.batch)
        batches.append(np.where(rng.random(args.batch) < args.unknown_fraction, unknown, known).tolist())
    keys = [[(layout.user_key(u), layout.actions_key(u)) for u in batch] for batch in batches]
    client = Redis.from_url(args.redis_url)
    read_ms: list[float] = []
    read_cpu_ms: list[float] = []
    compute_ms: list[float] = []
    compute_cpu_ms: list[float] = []
    model_ms: list[float] = []
    try:
        for rep in range(args.warmup_reps + args.reps):
            b = rep % len(batches)
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            replies = await plain_multi_read(client, keys[b], cap - 1)
            read_wall, read_cpu = time.perf_counter() - wall, time.process_time() - cpu
            records = [
                parse_record(u, replies[2 * row], replies[2 * row + 1]) for row, u in enumerate(batches[b])
            ]
            now = int(time.time())
            queries = [RecommendQuery(r, now, args.k, frozenset(r.actions)) for r in records]
            wall, cpu = time.perf_counter(), time.process_time()
            answers = compute_batch(bundle, queries)
            compute_wall, compute_cpu = time.perf_counter() - wall, time.process_time() - cpu
            if rep < args.warmup_reps:
                continue
            read_ms.append(read_wall * 1e3)
            read_cpu_ms.append(read_cpu * 1e3)
            compute_ms.append(compute_wall * 1e3)
            compute_cpu_ms.append(compute_cpu * 1e3)
            model_ms.append(answers[0].model_seconds * 1e3)
        if any(len(a.item_ids) != args.k for a in answers):
            raise RuntimeError("compute_batch answered fewer than k items")
    finally:
        await client.aclose()
    read, compute = _stats(read_ms), _stats(compute_ms)
    per_request_us = (read["median_ms"] + compute["median_ms"]) * 1e3 / args.batch
    cpu_us = (statistics.median(read_cpu_ms) + statistics.median(compute_cpu_ms)) * 1e3 / args.batch
    return {
        "batch": args.batch,
        "k": args.k,
        "unknown_fraction": args.unknown_fraction,
        "reps": args.reps,
        "read": read,
        "compute": compute,
        "compute_model_only": _stats(model_ms),
        "read_cpu_median_ms": round(statistics.median(read_cpu_ms), 4),
        "compute_cpu_median_ms": round(statistics.median(compute_cpu_ms), 4),
        "floor_us_per_request": round(per_request_us, 2),
        "floor_cpu_us_per_request": round(cpu_us, 2),
        "definition": "(median wall time of a plain MULTI read of the batch's keys + median wall time of "
        "compute_batch of the batch) / batch",
    }


async def measure_store_vs_plain(
    layout: Any, cap: int, user_ids: np.ndarray, args: argparse.Namespace
) -> dict:
    """The store's read of one user against the plain read of the same keys, interleaved in rounds."""
    from service.feature_store.client import create_client
    from service.feature_store.redis_store import RedisFeatureStore
    from service.settings import ServiceSettings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from store_read import feast_status, time_calls

    timer = "bench/store_read.py time_calls"

    settings = ServiceSettings()  # the service's pool size and per-call bound
    pool_size, timeout_s = settings.redis_max_connections, settings.redis_timeout_ms / 1e3
    store_client = create_client(args.redis_url, pool_size, timeout_s)
    plain_client = create_client(args.redis_url, pool_size, timeout_s)
    try:
        store = RedisFeatureStore(store_client, layout, cap=cap, timeout_s=timeout_s)
        known = np.unique(user_ids).tolist()
        keys = {u: (layout.user_key(u), layout.actions_key(u)) for u in known}
        last = cap - 1

        async def plain(ids: list[int]) -> Any:
            return await plain_multi_read(plain_client, [keys[user_id] for user_id in ids], last)

        readers: dict[str, Callable[[list[int]], Awaitable[Any]]] = {"store": store.get_users, "plain": plain}
        sample = known[:3]
        records = await store.get_users(sample)
        replies = await plain(sample)
        if [int(v) for v in replies[1]] != records[0].actions:
            raise RuntimeError("the plain reader does not read the store's keys")
        rng = np.random.default_rng([args.seed, 11])
        names = list(readers)
        rounds: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        warm = [[int(u)] for u in rng.choice(known, size=200)]
        for name in names:
            await time_calls(readers[name], warm)
        for r in range(args.store_rounds):
            batches = [[int(u)] for u in rng.choice(known, size=args.store_calls)]
            for name in names[r % 2 :] + names[: r % 2]:
                gc.collect()
                rounds[name].append(await time_calls(readers[name], batches))
    finally:
        await store_client.aclose()
        await plain_client.aclose()
    med = {
        n: {key: round(statistics.median(row[key] for row in rows), 1) for key in rows[0]}
        for n, rows in rounds.items()
    }
    return {
        "users_per_call": 1,
        "rounds": args.store_rounds,
        "calls_per_round": args.store_calls,
        "store": med["store"],
        "plain": med["plain"],
        "ratio_p50": round(med["store"]["p50_us"] / med["plain"]["p50_us"], 3),
        "ratio_mean": round(med["store"]["mean_us"] / med["plain"]["mean_us"], 3),
        "per_round": rounds,
        "feast": feast_status(),
        "timer": timer,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from index_builder.settings import IndexSettings
    from service.engine import configure_threads, load_bundle, release_memory
    from service.feature_store import KeyLayout
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    configure_threads(settings.torch_threads, settings.faiss_threads)
    started = time.perf_counter()
    # The server's way: COLDWARM_TOWER_FORMAT where the service has that setting.
    tower = {"tower_format": settings.tower_format} if hasattr(settings, "tower_format") else {}
    bundle = load_bundle(Path(args.artifacts), IndexSettings(), settings.device, **tower)
    release_memory()  # as the service does after loading: gc.freeze
    load_s = time.perf_counter() - started
    layout = KeyLayout(args.prefix)
    user_ids = np.load(args.users)
    floor = await measure_floor(bundle, layout, user_ids, args)
    cap = bundle.artifacts.encoder.config.max_history
    store = await measure_store_vs_plain(layout, cap, user_ids, args)
    return {
        "bundle": {
            "model_version": bundle.model_version,
            "index_version": bundle.index_version,
            "n_items": bundle.n_items,
            "search_backend": bundle.searcher.name,
            "device": bundle.device,
            "tower_format": getattr(bundle, "tower_format", None),
            "load_s": round(load_s, 2),
            "torch_threads": settings.torch_threads,
            "faiss_threads": settings.faiss_threads,
        },
        "floor": floor,
        "store_vs_plain": store,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True, help="artifacts root or version directory")
    p.add_argument("--prefix", required=True, help="the key prefix the users were loaded under")
    p.add_argument("--users", type=Path, required=True, help=".npy of the loaded user ids")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--unknown-fraction", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--warmup-reps", type=int, default=20)
    p.add_argument("--store-rounds", type=int, default=5)
    p.add_argument("--store-calls", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
        loop_name = "uvloop"
    except ImportError:
        loop_factory, loop_name = None, "asyncio"
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(measure(args))
    result["loop"] = loop_name
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
