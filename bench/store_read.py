"""What the feature store's read costs over a plain redis-py read of the same keys (issue 11).

In one process and one event loop, against a real Redis: synthetic users (a profile and ~50 actions
each) are bulk-loaded by the project's loader under a fresh key prefix (deleted at the end), then these
readers are timed side by side, interleaved in rounds (the order rotates every round), on the same
random users:

- ``store``: ``RedisFeatureStore.get_users(ids)`` of a ``create_client`` client;
- ``plain``: a ``redis.asyncio`` client of the same pool settings (also ``create_client``) sending
  ``pipeline(transaction=True)`` HGETALL + LRANGE(0, cap-1) per user, key strings built in advance,
  replies left as redis-py returns them (no parsing into records);
- ``plain, default pool``: the same with redis-py's default (non-blocking) ``ConnectionPool``, to show
  what the blocking pool costs (information only);
- Feast's Python SDK when ``import feast`` works; otherwise recorded as not installed.

Each reader is timed at 1 user per call and at ``--batch`` users per call (reported per user too).
Every call is timed alone (perf_counter_ns); a round's p50 / p99 / mean come from its calls, and the
figures reported are the medians over rounds. A CPU-only breakdown times the parts of the store's read
that plain redis-py does not have: parsing one reply into a record, the ``asyncio.timeout`` bound, and
spelling a user's two keys.

Run: python bench/store_read.py [--redis-url redis://127.0.0.1:6379/0] [--users 5000] [--rounds 5]
                                [--calls 2000] [--batch 64] [--batch-calls 400] [--loop asyncio]
                                [--before bench/results/store_read.json]
``--before`` embeds an earlier run's results (e.g. of the code before a change) in the new files.
Writes bench/results/store_read.json and .md (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import timeit
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.data.schema import InteractionData, make_interaction_data  # noqa: E402
from service.feature_store.client import create_client  # noqa: E402
from service.feature_store.keys import KeyLayout  # noqa: E402
from service.feature_store.loader import bulk_load  # noqa: E402
from service.feature_store.records import DEFAULT_CAP, records_from_interactions  # noqa: E402
from service.feature_store.redis_store import RedisFeatureStore, parse_record  # noqa: E402

RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("bench.store_read")

Reader = Callable[[list[int]], Awaitable[Any]]


# ----- data --------------------------------------------------------------------------------------------
def synthetic_users(n_users: int, actions: tuple[int, int], seed: int) -> InteractionData:
    """Users 1..n with a full profile and ``actions`` (low, high) interactions each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(actions[0], actions[1] + 1, size=n_users)
    user_ids = np.repeat(np.arange(1, n_users + 1), lengths)
    interactions = pd.DataFrame(
        {
            "user_id": user_ids,
            "item_id": rng.integers(1, 100_000, size=len(user_ids)),
            "timestamp": 1_600_000_000 + rng.integers(0, 10**8, size=len(user_ids)),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            "gender": rng.choice(["F", "M"], size=n_users),
            "age": rng.choice(["1", "18", "25", "35", "45", "50", "56"], size=n_users),
            "occupation": rng.integers(0, 21, size=n_users).astype(str),
            "zip_code": [f"{z:05d}" for z in rng.integers(0, 100_000, size=n_users)],
        }
    )
    return make_interaction_data(interactions, users, None, name=f"store_read synthetic ({n_users} users)")


# ----- the readers -------------------------------------------------------------------------------------
def plain_reader(client: Any, layout: KeyLayout, cap: int, n_users: int) -> Reader:
    """HGETALL + LRANGE per user in one MULTI/EXEC, as anyone would write it with redis-py."""
    keys = [("", "")] + [(layout.user_key(u), layout.actions_key(u)) for u in range(1, n_users + 1)]
    last = cap - 1

    async def read(user_ids: list[int]) -> Any:
        async with client.pipeline(transaction=True) as pipe:
            for user_id in user_ids:
                user_key, actions_key = keys[user_id]
                pipe.hgetall(user_key)
                pipe.lrange(actions_key, 0, last)
            return await pipe.execute(raise_on_error=False)

    return read


def feast_status() -> str:
    try:
        import feast  # noqa: F401
    except ImportError:
        return "not installed"
    # Measuring Feast needs a feature repository and an online store of its own layout; not set up here.
    return f"installed ({metadata.version('feast')}), not measured: needs a Feast repository"


# ----- timing ------------------------------------------------------------------------------------------
def percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


async def time_calls(read: Reader, batches: list[list[int]]) -> dict[str, float]:
    """Each call timed alone; µs per call."""
    clock = time.perf_counter_ns
    spent: list[int] = []
    started = clock()
    for ids in batches:
        t0 = clock()
        await read(ids)
        spent.append(clock() - t0)
    total = clock() - started
    spent.sort()
    return {
        "p50_us": percentile(spent, 0.50),
        "p99_us": percentile(spent, 0.99),
        "mean_us": total / len(batches) / 1000,
    }


async def run_rounds(
    readers: dict[str, Reader], n_users: int, per_call: int, calls: int, rounds: int, seed: int
) -> dict[str, list[dict[str, float]]]:
    rng = np.random.default_rng(seed)
    names = list(readers)
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    warm = [rng.integers(1, n_users + 1, size=per_call).tolist() for _ in range(max(50, calls // 10))]
    for name in names:
        await time_calls(readers[name], warm)
    for r in range(rounds):
        # The same random users for every reader of a round; the order rotates so none always goes first.
        batches = [rng.integers(1, n_users + 1, size=per_call).tolist() for _ in range(calls)]
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            per_round[name].append(await time_calls(readers[name], batches))
        log.info(
            "%d users/call, round %d/%d: %s",
            per_call,
            r + 1,
            rounds,
            ", ".join(f"{n} {per_round[n][-1]['p50_us']:.0f} µs" for n in names),
        )
    return per_round


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(row[key] for row in rows), 1) for key in rows[0]}


# ----- the CPU-only breakdown ----------------------------------------------------------------------------
def per_call_us(call: Callable[[], Any], number: int) -> float:
    return round(min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6, 2)


async def breakdown(layout: KeyLayout, cap: int) -> dict[str, float]:
    """The parts of the store's read that a plain redis-py read does not have, without Redis."""
    fields = {
        b"gender": b"F", b"age": b"25", b"occupation": b"4", b"zip_code": b"55455",
        b"count": b"57", b"first_ts": b"1600000000", b"last_ts": b"1700000000",
    }  # fmt: skip
    actions = [str(10_000 + i).encode() for i in range(cap)]

    async def nothing() -> None:
        pass

    @contextlib.asynccontextmanager
    async def generator_guard() -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(0.1):
                yield
        except TimeoutError:
            raise

    async def coroutine_guard(call: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(0.1):
                return await call
        except TimeoutError:
            raise

    async def bare() -> None:
        async with asyncio.timeout(0.1):
            await nothing()

    async def in_generator_guard() -> None:
        async with generator_guard():
            await nothing()

    async def in_coroutine_guard() -> None:
        await coroutine_guard(nothing())

    async def awaited(step: Callable[[], Awaitable[None]], n: int = 20_000) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                await step()
            best = min(best, (time.perf_counter() - started) / n * 1e6)
        return round(best, 2)

    unbounded = await awaited(nothing)
    return {
        "parse_record_us": per_call_us(lambda: parse_record(42, fields, actions), 5_000),
        "keys_us": per_call_us(lambda: (layout.user_key(42), layout.actions_key(42)), 20_000),
        # Each: what the bound adds to awaiting a coroutine that returns at once.
        "asyncio_timeout_us": round(await awaited(bare) - unbounded, 2),
        "asynccontextmanager_guard_us": round(await awaited(in_generator_guard) - unbounded, 2),
        "coroutine_guard_us": round(await awaited(in_coroutine_guard) - unbounded, 2),
    }


# ----- the run -----------------------------------------------------------------------------------------
async def measure(args: argparse.Namespace, layout: KeyLayout, data: InteractionData) -> dict[str, Any]:
    store_client = create_client(args.redis_url, args.max_connections, args.timeout_s)
    plain_client = create_client(args.redis_url, args.max_connections, args.timeout_s)
    default_pool_client = Redis.from_url(args.redis_url, max_connections=args.max_connections)
    try:
        store = RedisFeatureStore(store_client, layout, cap=args.cap, timeout_s=args.timeout_s)
        plain = plain_reader(plain_client, layout, args.cap, args.users)
        # The store reads what the loader wrote, and the plain reader the same keys.
        sample = [1, 2, args.users, args.users + 1]
        got = await store.get_users(sample)
        if got != records_from_interactions(data, sample, cap=args.cap):
            raise SystemExit(f"the store does not read what was loaded: {got}")
        replies = await plain([1])
        if [int(v) for v in replies[1]] != got[0].actions:
            raise SystemExit("the plain reader does not read the store's keys")
        readers = {
            "store": store.get_users,
            "plain": plain,
            "plain, default pool": plain_reader(default_pool_client, layout, args.cap, args.users),
        }
        results: dict[str, Any] = {}
        for per_call, calls in ((1, args.calls), (args.batch, args.batch_calls)):
            rounds = await run_rounds(readers, args.users, per_call, calls, args.rounds, args.seed + per_call)
            results[str(per_call)] = {
                name: {"median_of_rounds": medians(rows), "rounds": rows} for name, rows in rounds.items()
            }
        return {"readers": results, "breakdown": await breakdown(layout, args.cap)}
    finally:
        await store_client.aclose()
        await plain_client.aclose()
        await default_pool_client.aclose()


def summarize(readers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for per_call, by_name in readers.items():
        store = by_name["store"]["median_of_rounds"]
        plain = by_name["plain"]["median_of_rounds"]
        out[per_call] = {
            "store_p50_us": store["p50_us"],
            "plain_p50_us": plain["p50_us"],
            "store_p50_us_per_user": round(store["p50_us"] / int(per_call), 2),
            "plain_p50_us_per_user": round(plain["p50_us"] / int(per_call), 2),
            "ratio_p50": round(store["p50_us"] / plain["p50_us"], 3),
            "ratio_mean": round(store["mean_us"] / plain["mean_us"], 3),
        }
    return out


def machine() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = None
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_py": version("redis"),
        "hiredis": version("hiredis"),
        "uvloop": version("uvloop"),
        "git_head": commit,
        "loadavg_at_start": list(os.getloadavg()),
    }


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"Feature store read vs plain redis-py, {cfg['users']} users loaded (~{cfg['actions']} actions each, "
        f"cap {cfg['cap']}), {cfg['rounds']} interleaved rounds, {cfg['loop']} loop; "
        "µs per call, medians over rounds of each round's p50 (p99, mean).",
        "",
        f"Command: `{report['command']}`",
        "",
        "| users/call | reader | p50 µs/call | p99 µs/call | mean µs/call | p50 µs/user "
        "| p50 ratio to plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for per_call, by_name in report["readers"].items():
        plain_p50 = by_name["plain"]["median_of_rounds"]["p50_us"]
        for name, row in by_name.items():
            m = row["median_of_rounds"]
            lines.append(
                f"| {per_call} | {name} | {m['p50_us']:.0f} | {m['p99_us']:.0f} | {m['mean_us']:.0f} | "
                f"{m['p50_us'] / int(per_call):.1f} | {m['p50_us'] / plain_p50:.2f}× |"
            )
        lines.append(f"| {per_call} | Feast Python SDK | {report['feast']} | | | | |")
    b = report["breakdown"]
    lines += [
        "",
        "CPU-only parts of the store's read (no Redis), µs: "
        f"parse_record of one user (7 hash fields, {cfg['cap']} actions) {b['parse_record_us']}, "
        f"asyncio.timeout enter+exit {b['asyncio_timeout_us']}, "
        f"a user's two key strings {b['keys_us']}.",
    ]
    if "coroutine_guard_us" in b:
        lines.append(
            "The bound with its error mapping, around a no-op await: "
            f"as an @asynccontextmanager {b['asynccontextmanager_guard_us']} µs, "
            f"as a plain coroutine {b['coroutine_guard_us']} µs."
        )
    if report.get("before"):
        before = report["before"]
        lines += [
            "",
            f"Before ({before.get('label') or 'an earlier run'}, `{before['command']}`):",
            "",
            "| users/call | store p50 µs | plain p50 µs | ratio "
            "| → now: store p50 µs | plain p50 µs | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for per_call, now in report["summary"].items():
            was = before["summary"].get(per_call)
            if was:
                lines.append(
                    f"| {per_call} | {was['store_p50_us']:.0f} | {was['plain_p50_us']:.0f} | "
                    f"{was['ratio_p50']:.2f}× | {now['store_p50_us']:.0f} | {now['plain_p50_us']:.0f} | "
                    f"{now['ratio_p50']:.2f}× |"
                )
        bb = before["breakdown"]
        lines.append("")
        lines.append(
            f"Before, CPU-only: parse_record {bb['parse_record_us']} µs, asyncio.timeout "
            f"{bb['asyncio_timeout_us']} µs, keys {bb['keys_us']} µs."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--users", type=int, default=5000, help="synthetic users loaded")
    parser.add_argument("--actions", type=int, default=50, help="mean actions per user (±5)")
    parser.add_argument("--cap", type=int, default=DEFAULT_CAP, help="the store's actions cap")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="calls per reader per round, 1 user each")
    parser.add_argument("--batch", type=int, default=64, help="users per call in the batch scenario")
    parser.add_argument("--batch-calls", type=int, default=400, help="calls per reader per round, batch")
    parser.add_argument("--max-connections", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=0.1, help="the store's per-call bound")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", type=Path, help="an earlier run's JSON to show beside this one")
    parser.add_argument("--label", default="", help="what code this run measures, e.g. 'before'")
    parser.add_argument("--out", type=Path, default=RESULTS / "store_read")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    before = json.loads(args.before.read_text()) if args.before else None
    if before:
        before.pop("before", None)  # one level of history is enough

    import redis

    sync = redis.Redis.from_url(args.redis_url, socket_timeout=10)
    sync.ping()
    layout = KeyLayout(prefix=f"storebench-{uuid.uuid4().hex[:12]}")
    data = synthetic_users(args.users, (args.actions - 5, args.actions + 5), args.seed)
    try:
        stats = bulk_load(sync, layout, data, cap=args.cap, progress=False)
        log.info("loaded %d users under %s in %.1fs", stats.users, layout.pattern(), stats.seconds)
        loop_factory = None
        if args.loop == "uvloop":
            import uvloop

            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            measured = runner.run(measure(args, layout, data))
    finally:
        deleted = 0
        for keys in _chunks(sync.scan_iter(match=layout.pattern(), count=1000), 1000):
            deleted += int(sync.delete(*keys))
        log.info("deleted %d keys", deleted)
        sync.close()

    report: dict[str, Any] = {
        "command": "python bench/store_read.py " + shlex.join(sys.argv[1:]),
        "label": args.label,
        "config": {
            key: getattr(args, key)
            for key in ("users", "actions", "cap", "rounds", "calls", "batch", "batch_calls")
        }
        | {"loop": args.loop, "timeout_s": args.timeout_s, "max_connections": args.max_connections},
        "machine": machine() | {"loadavg_at_end": list(os.getloadavg())},
        "feast": feast_status(),
        "summary": summarize(measured["readers"]),
        **measured,
    }
    if before:
        report["before"] = before
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _chunks(iterable: Any, size: int) -> Any:
    batch: list[Any] = []
    for item in iterable:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


if __name__ == "__main__":
    main()
