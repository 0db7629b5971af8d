"""End-to-end serving latency of POST /recommend, and index search latency/recall on large catalogs.

    python bench/serve_latency.py --artifacts artifacts            # everything, about 10 minutes
    python bench/serve_latency.py --artifacts A --skip-synthetic --rates 100,300 --duration 10
    python bench/serve_latency.py --skip-movielens --sizes 100k     # index part only

1. HTTP scenario (MovieLens by default). Every user of ``--data`` is bulk-loaded into the real Redis
   under a fresh key prefix (deleted at the end); the service runs as a real uvicorn server in a
   subprocess (one worker, COLDWARM_* settings) on a free 127.0.0.1 port; an open-loop load generator
   sends /recommend (k=50, exclude_seen, ~10% unknown users) at fixed rates, each for a warm-up plus a
   measured window. Latency is client-side, from each request's *scheduled* send time (queueing
   included, no coordinated omission). Then a bounded step search finds the highest rate the service
   holds: p99 <= --slo-p99-ms, errors <= --max-error-rate, degraded answers (load shed) <=
   --max-degraded-rate, achieved >= --min-achieved x target.
2. Synthetic catalogs (100k and 1M items by default, d = 64 + 1 folded bias): clustered item vectors
   and user queries built like real users (mean of a history drawn from a few taste clusters, plus
   profile-only cold users). Exact (flat), IVF and HNSW indexes are built with the project's
   ``build_index``; nprobe / efSearch are tuned up a grid until recall@100 against ``exact_search``
   reaches --recall-target on 1000 queries; single-query search latency is timed with one FAISS
   thread on 2000 other queries. ``--serve-synthetic`` also serves each synthetic catalog over HTTP
   (artifacts written by the project's ``write_artifacts`` with an untrained Cold & Warm Net user
   tower, index by ``build_index_artifacts``).

Writes bench/results/serve_latency.json (machine, config, records, summary) and a markdown table
beside it (.md). Numbers depend on the machine and its load: the JSON records both.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve_common import (  # noqa: E402  (bench/ is not a package)
    BenchError,
    PhaseResult,
    ServerProcess,
    connect_redis,
    delete_keys,
    latency_summary,
    machine_info,
    render_request,
    run_async,
    run_phase,
    simple_request,
    training_data_warning,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-1m-first2999"
DEFAULT_OUT = REPO / "bench" / "results" / "serve_latency.json"
RECALL_K = 100
# Above this many items the HNSW defaults drop to M=16 / efConstruction=64 to bound the build time.
LARGE_CATALOG = 500_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----- command line -----------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if factor > 1 else text) * factor)


def parse_list(text: str, kind: type = float) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def size_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    scen = p.add_argument_group("scenarios")
    scen.add_argument("--skip-movielens", action="store_true", help="no HTTP scenario over --artifacts")
    scen.add_argument("--skip-synthetic", action="store_true", help="no synthetic catalogs")
    scen.add_argument("--serve-synthetic", action="store_true", help="also serve the synthetic catalogs")
    scen.add_argument("--out", type=Path, default=DEFAULT_OUT)

    http = p.add_argument_group("HTTP load")
    http.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="artifacts root or version")
    http.add_argument("--data", default=str(DEFAULT_DATA), help="the data the artifacts were trained on")
    http.add_argument("--rates", type=lambda s: parse_list(s, float), default=[100, 300, 500, 1000])
    http.add_argument("--duration", type=float, default=20.0, help="measured seconds per rate")
    http.add_argument("--warmup", type=float, default=3.0, help="seconds per rate excluded from stats")
    http.add_argument("--search-steps", type=int, default=3, help="extra rates tried after the fixed ones")
    http.add_argument("--search-duration", type=float, default=10.0, help="measured seconds per search step")
    http.add_argument("--search-factor", type=float, default=1.5, help="step up when every rate passed")
    http.add_argument("--slo-p99-ms", type=float, default=50.0)
    http.add_argument("--max-error-rate", type=float, default=0.01)
    http.add_argument(
        "--max-degraded-rate", type=float, default=0.01, help="shed or degraded answers allowed for a pass"
    )
    http.add_argument("--min-achieved", type=float, default=0.95, help="fraction of the target rate")
    http.add_argument("--k", type=int, default=50)
    http.add_argument("--unknown-fraction", type=float, default=0.1, help="requests for unknown users")
    http.add_argument("--request-timeout", type=float, default=5.0, help="seconds after the due time")
    http.add_argument("--max-connections", type=int, default=256)
    http.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    http.add_argument(
        "--redis-timeout-ms", type=float, default=None, help="COLDWARM_REDIS_TIMEOUT_MS (default: service's)"
    )
    http.add_argument("--no-uvloop", action="store_true", help="client on asyncio's default loop")

    syn = p.add_argument_group("synthetic catalogs")
    syn.add_argument("--sizes", type=lambda s: parse_list(s, parse_size), default=[100_000, 1_000_000])
    syn.add_argument("--types", type=lambda s: parse_list(s, str), default=["flat", "ivf", "hnsw"])
    syn.add_argument("--dim", type=int, default=64, help="embedding dim; the index has one more")
    syn.add_argument("--recall-queries", type=int, default=1000)
    syn.add_argument("--latency-queries", type=int, default=2000)
    syn.add_argument("--latency-max-seconds", type=float, default=45.0, help="cap per index (slow flat)")
    syn.add_argument("--recall-target", type=float, default=0.95)
    syn.add_argument("--ivf-nlist", type=int, default=None, help="default: the project's ~4*sqrt(n)")
    syn.add_argument("--nprobe-grid", type=lambda s: parse_list(s, int), default=[4, 8, 16, 32, 64, 128, 256])
    syn.add_argument(
        "--ef-grid", type=lambda s: parse_list(s, int), default=[100, 128, 192, 256, 384, 512, 768, 1024]
    )
    syn.add_argument("--hnsw-m", type=int, default=None, help=f"default 32, 16 from {LARGE_CATALOG} items")
    syn.add_argument(
        "--hnsw-ef-construction", type=int, default=None, help=f"default 200, 64 from {LARGE_CATALOG} items"
    )
    syn.add_argument("--synthetic-users", type=int, default=5000, help="users loaded for --serve-synthetic")
    syn.add_argument("--seed", type=int, default=0)
    return p


# ----- records ------------------------------------------------------------------------------------------
@dataclass
class ScenarioInfo:
    scenario: str
    catalog_size: int
    index_type: str
    index_params: dict[str, Any]
    recall_at_100: float | None


def passed(phase: PhaseResult, stats: dict[str, Any], args: argparse.Namespace) -> bool:
    return (
        stats["p99_ms"] is not None
        and stats["p99_ms"] <= args.slo_p99_ms
        and phase.error_rate <= args.max_error_rate
        and phase.degraded_rate <= args.max_degraded_rate
        and phase.achieved_rps >= args.min_achieved * phase.target_rps
    )


def http_record(
    info: ScenarioInfo, phase: PhaseResult, step: str, args: argparse.Namespace
) -> dict[str, Any]:
    stats = latency_summary(phase.latencies_ms)
    lag = latency_summary(phase.send_lag_ms)
    return {
        "scenario": info.scenario,
        "catalog_size": info.catalog_size,
        "index_type": info.index_type,
        "index_params": info.index_params,
        "target_rps": phase.target_rps,
        "achieved_rps": round(phase.achieved_rps, 1),
        "p50_ms": stats["p50_ms"],
        "p90_ms": stats["p90_ms"],
        "p99_ms": stats["p99_ms"],
        "max_ms": stats["max_ms"],
        "errors": phase.errors,
        "degraded": phase.degraded,
        "recall_at_100": info.recall_at_100,
        "server_stage_ms": phase.server_stages(),
        "duration_s": phase.duration_s,
        # extras
        "step": step,
        "requests": phase.scheduled,
        "passed": passed(phase, stats, args),
        "error_kinds": dict(phase.error_kinds),
        "client_send_lag_p99_ms": lag["p99_ms"],
        "connections_opened": phase.connections_opened,
    }


# ----- the HTTP scenario ----------------------------------------------------------------------------------
@contextlib.contextmanager
def users_in_redis(args: argparse.Namespace, data: Any, cap: int) -> Iterator[str]:
    """Bulk-loads every user of ``data`` under a fresh key prefix; yields the prefix; deletes its keys."""

    from service.feature_store import KeyLayout
    from service.feature_store.loader import bulk_load

    client = connect_redis(args.redis_url)
    layout = KeyLayout(f"coldwarm-bench-{uuid.uuid4().hex[:12]}")
    try:
        stats = bulk_load(client, layout, data, cap=cap, progress=False)
        log(
            f"loaded {stats.users} users ({stats.actions} actions) into Redis in {stats.seconds:.1f}s "
            f"under prefix {layout.prefix}"
        )
        yield layout.prefix
    finally:
        deleted = delete_keys(client, layout.pattern())
        client.close()
        log(f"deleted {deleted} Redis keys under {layout.prefix}")


def request_pool(port: int, user_ids: np.ndarray, args: argparse.Namespace, n: int = 60_000) -> list[bytes]:
    """Pre-rendered /recommend requests: known users at random, ``unknown_fraction`` of unknown ones."""
    rng = np.random.default_rng(args.seed + 1)
    known = rng.choice(user_ids, size=n)
    unknown = int(np.max(user_ids)) + 1 + rng.integers(0, 1_000_000_000, size=n)
    ids = np.where(rng.random(n) < args.unknown_fraction, unknown, known)
    return [
        render_request(port, "/recommend", {"user_id": int(u), "k": args.k, "exclude_seen": True})
        for u in ids
    ]


def settle(server: ServerProcess, user_id: int, args: argparse.Namespace, max_s: float = 30.0) -> None:
    """Waits until the server has worked off what an overloaded phase left queued (requests whose
    clients gave up are still computed): a probe /recommend must answer within the SLO."""
    deadline = time.monotonic() + max_s
    time.sleep(0.5)
    while time.monotonic() < deadline and server.alive():
        started = time.monotonic()
        payload = {"user_id": user_id, "k": args.k, "exclude_seen": True}
        status, _ = simple_request(server.port, "POST", "/recommend", payload, timeout_s=5.0)
        if status == 200 and (time.monotonic() - started) * 1e3 < args.slo_p99_ms:
            return
        time.sleep(0.5)
    log(f"  the server did not settle within {max_s:.0f}s; going on")


def rate_ladder(
    server: ServerProcess, info: ScenarioInfo, user_ids: np.ndarray, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], float | None]:
    """The fixed rates, then a bounded search; returns the records and the highest rate that passed."""
    requests = request_pool(server.port, user_ids, args)
    records: list[dict[str, Any]] = []
    outcome: dict[float, bool] = {}

    def run(rate: float, duration: float, step: str) -> None:
        if not server.alive():
            raise RuntimeError(f"the service died; log:\n{server.log_tail()}")
        phase = run_async(
            run_phase(
                server.port,
                requests,
                rate,
                duration,
                args.warmup,
                args.request_timeout,
                args.max_connections,
            ),
            use_uvloop=not args.no_uvloop,
        )
        record = http_record(info, phase, step, args)
        records.append(record)
        outcome[rate] = record["passed"]
        stages = record["server_stage_ms"] or {}
        log(
            f"  {step:6s} {rate:7.0f} rps: achieved {record['achieved_rps']:7.1f}, "
            f"p50 {record['p50_ms']} p99 {record['p99_ms']} max {record['max_ms']} ms, "
            f"errors {record['errors']}/{record['requests']} {record['error_kinds'] or ''}, "
            f"degraded {record['degraded']}, server total {stages.get('total')} ms "
            f"(features {stages.get('features')}, model {stages.get('model')}, "
            f"search {stages.get('search')}) "
            f"-> {'PASS' if record['passed'] else 'FAIL'}"
        )
        lag = record["client_send_lag_p99_ms"]
        if lag is not None and lag > 10.0:
            log(f"  note: sends ran up to {lag:.0f} ms late (p99): the load generator is short of CPU too")
        settle(server, int(user_ids[0]), args)

    for rate in args.rates:
        run(rate, args.duration, "fixed")
    good = [r for r, ok in outcome.items() if ok]
    lo = max(good) if good else 0.0
    bad = [r for r, ok in outcome.items() if not ok and r > lo]
    hi = min(bad) if bad else None
    for _ in range(max(0, args.search_steps)):
        if hi is None:
            rate = float(round(lo * args.search_factor))
        else:
            if hi - lo <= max(1.0, 0.1 * hi):
                break
            rate = float(round((lo + hi) / 2))
        if rate <= lo or rate in outcome or rate < 1:
            break
        run(rate, args.search_duration, "search")
        if outcome[rate]:
            lo = rate
        else:
            hi = rate
    return records, (lo or None)


def index_manifest_of(artifacts_dir: Path) -> dict[str, Any]:
    from index_builder.build import INDEX_MANIFEST_FILE, resolve_index_dir

    return json.loads((resolve_index_dir(artifacts_dir) / INDEX_MANIFEST_FILE).read_text())


def manifest_recall(manifest: dict[str, Any]) -> float | None:
    value = manifest.get(f"recall_at_{manifest.get('recall_k', RECALL_K)}")
    return None if value is None else float(value)


def serving_env(artifacts_dir: Path, prefix: str, index_type: str, params: dict[str, Any], args: Any) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLDWARM_INDEX_")}
    env.update(
        COLDWARM_ARTIFACTS_DIR=str(Path(artifacts_dir).resolve()),
        COLDWARM_REDIS_URL=args.redis_url,
        COLDWARM_KEY_PREFIX=prefix,
        PYTHONUNBUFFERED="1",
    )
    env.pop("COLDWARM_ADMIN_TOKEN", None)  # no admin endpoint in a benchmark
    # The server applies its own COLDWARM_INDEX_* search breadth, not the one the index was built with.
    if index_type == "ivf" and "nprobe" in params:
        env["COLDWARM_INDEX_NPROBE"] = str(params["nprobe"])
    if index_type == "hnsw" and "ef_search" in params:
        env["COLDWARM_INDEX_EF_SEARCH"] = str(params["ef_search"])
    if args.redis_timeout_ms is not None:
        env["COLDWARM_REDIS_TIMEOUT_MS"] = str(args.redis_timeout_ms)
    return env


def serve_scenario(
    info: ScenarioInfo, artifacts_dir: Path, prefix: str, user_ids: np.ndarray, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    env = serving_env(artifacts_dir, prefix, info.index_type, info.index_params, args)
    log(f"{info.scenario}: starting the service ({info.index_type}, {info.catalog_size} items)")
    started = time.perf_counter()
    with ServerProcess(env, REPO) as server:
        log(f"  ready on {server.url} after {time.perf_counter() - started:.1f}s")
        records, best = rate_ladder(server, info, user_ids, args)
    summary = {
        "scenario": info.scenario,
        "catalog_size": info.catalog_size,
        "index_type": info.index_type,
        "max_sustained_rps": best,
        "criteria": {
            "p99_ms": args.slo_p99_ms,
            "max_error_rate": args.max_error_rate,
            "max_degraded_rate": args.max_degraded_rate,
            "min_achieved_fraction": args.min_achieved,
        },
        "server_env": {k: v for k, v in env.items() if k.startswith("COLDWARM_") and "TOKEN" not in k},
    }
    log(f"{info.scenario}: highest rate held {best} rps")
    return records, summary


def movielens_scenario(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from model.artifacts import ArtifactError, load_artifacts
    from model.data.loading import load_dataset

    try:
        artifacts = load_artifacts(args.artifacts)
        manifest = index_manifest_of(artifacts.directory)
    except ArtifactError as error:
        raise BenchError(
            f"{error}\n  make artifacts with `coldwarm run --data {args.data}` and pass --artifacts DIR, "
            "or skip this scenario with --skip-movielens"
        ) from error
    log(f"loading data {args.data}")
    data = load_dataset(args.data)
    warning = training_data_warning(
        artifacts.manifest, data, "the users still get answers, but their histories mean little"
    )
    if warning:
        log(warning)
    user_ids = np.union1d(data.users["user_id"].to_numpy(np.int64), data.interactions["user_id"].to_numpy())
    name = "movielens" if Path(str(args.data)).is_dir() else f"http-{data.name}"
    params = dict(manifest.get("params", {}))
    params["recall_k"] = manifest.get("recall_k")
    info = ScenarioInfo(
        scenario=name,
        catalog_size=int(manifest["n_items"]),
        index_type=str(manifest["type"]),
        index_params=params,
        recall_at_100=manifest_recall(manifest),
    )
    with users_in_redis(args, data, artifacts.encoder.config.max_history) as prefix:
        records, summary = serve_scenario(info, artifacts.directory, prefix, user_ids.astype(np.int64), args)
    summary["model_version"] = artifacts.version
    summary["index_version"] = manifest.get("index_version")
    return records, [summary]


# ----- synthetic catalogs -----------------------------------------------------------------------------------
@dataclass
class Catalog:
    """Unit item embeddings around clusters that sit around a few topics; item ids 1..n."""

    unit: np.ndarray  # float32 (n, d)
    bias: np.ndarray  # float32 (n,)
    cluster: np.ndarray  # int64 (n,)
    cluster_topic: np.ndarray  # int64 (n_clusters,)
    topics: np.ndarray  # float32 (n_topics, d)
    scale: float = 10.0

    @property
    def n(self) -> int:
        return len(self.unit)

    @property
    def dim(self) -> int:
        return int(self.unit.shape[1])

    @property
    def item_ids(self) -> np.ndarray:
        return np.arange(1, self.n + 1, dtype=np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def make_catalog(n: int, d: int, seed: int) -> Catalog:
    """Two-level structure, as learned item embeddings have: 32 topics; n/200 clusters (cos ~0.8 to their
    topic) of power-law sizes; items at cos ~0.75 to their cluster. Biases N(0, 0.5), cosine scale 10."""
    rng = np.random.default_rng(seed)
    n_topics, n_clusters = 32, max(1, n // 200)
    topics = _unit(rng.standard_normal((n_topics, d))).astype(np.float32)
    cluster_topic = rng.integers(0, n_topics, n_clusters)
    centres = _unit(topics[cluster_topic] + rng.standard_normal((n_clusters, d)) * (0.75 / math.sqrt(d)))
    weights = rng.permutation(1.0 / np.arange(1, n_clusters + 1) ** 0.7)
    cluster = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    unit = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):  # chunks: float64 temporaries of 1M x 64 would be 512 MB
        stop = min(start + 100_000, n)
        noise = rng.standard_normal((stop - start, d)) * (0.9 / math.sqrt(d))
        unit[start:stop] = _unit(centres[cluster[start:stop]] + noise)
    bias = rng.normal(0.0, 0.5, n).astype(np.float32)
    return Catalog(unit, bias, cluster.astype(np.int64), cluster_topic.astype(np.int64), topics)


def sample_users(
    cat: Catalog, n: int, rng: np.random.Generator, cold_fraction: float = 0.2
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(float32 (n, d) unit user embeddings, histories as item ids) like the model's users: a cold user
    is near a topic (profile only); the others are the mean of a history of 5-50 items drawn from 1-3
    taste clusters (a random item's cluster, then clusters of the same topic), plus noise."""
    order = np.argsort(cat.cluster, kind="stable")
    counts = np.bincount(cat.cluster, minlength=len(cat.cluster_topic))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    clusters_of_topic = [
        np.flatnonzero((cat.cluster_topic == t) & (counts > 0)) for t in range(len(cat.topics))
    ]
    d = cat.dim
    users = np.empty((n, d), dtype=np.float32)
    histories: list[np.ndarray] = []
    for u in range(n):
        if rng.random() < cold_fraction:
            topic = cat.topics[rng.integers(len(cat.topics))]
            users[u] = _unit((topic + rng.standard_normal(d) * (1.0 / math.sqrt(d)))[None])[0]
            histories.append(np.empty(0, dtype=np.int64))
            continue
        first = int(cat.cluster[rng.integers(cat.n)])
        same_topic = clusters_of_topic[int(cat.cluster_topic[first])]
        tastes = np.concatenate([[first], rng.choice(same_topic, size=rng.integers(0, 3))])
        length = int(rng.integers(5, 51))
        picked = tastes[rng.integers(0, len(tastes), length)]
        positions = order[starts[picked] + (rng.random(length) * counts[picked]).astype(np.int64)]
        mean = cat.unit[positions].mean(axis=0)
        users[u] = _unit((mean + rng.standard_normal(d) * (0.3 / math.sqrt(d)))[None])[0]
        histories.append(positions + 1)  # item ids are positions + 1
    return users, histories


def time_single_queries(index: Any, queries: np.ndarray, k: int, max_seconds: float) -> list[float]:
    """Milliseconds per one-query search with one FAISS thread, as the service searches."""
    import faiss

    from index_builder.faiss_index import search

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for row in range(min(50, len(queries))):  # warm caches and lazy allocations
            search(index, queries[row : row + 1], k)
        latencies = []
        started = time.perf_counter()
        for row in range(len(queries)):
            t = time.perf_counter()
            search(index, queries[row : row + 1], k)
            latencies.append((time.perf_counter() - t) * 1e3)
            if time.perf_counter() - started > max_seconds:
                break
        return latencies
    finally:
        faiss.omp_set_num_threads(threads)


def index_settings_for(kind: str, n: int, args: argparse.Namespace) -> Any:
    from index_builder.settings import IndexSettings

    return IndexSettings(
        type=kind,
        nlist=args.ivf_nlist,
        nprobe=args.nprobe_grid[0],
        hnsw_m=args.hnsw_m or (16 if n >= LARGE_CATALOG else 32),
        ef_construction=args.hnsw_ef_construction or (64 if n >= LARGE_CATALOG else 200),
        ef_search=args.ef_grid[0],
        recall_k=RECALL_K,
    )


def tune(index: Any, settings: Any, queries: np.ndarray, exact: np.ndarray, args: argparse.Namespace):
    """Walks nprobe / efSearch up its grid until recall@100 >= target; returns (settings, recall, grid)."""
    from index_builder.faiss_index import apply_search_params, resolve_nlist, search
    from index_builder.recall import recall_at_k

    if settings.type == "ivf":
        nlist = resolve_nlist(index.ntotal, settings.nlist)
        name, grid = "nprobe", sorted({min(p, nlist) for p in args.nprobe_grid})
    elif settings.type == "hnsw":
        name, grid = "ef_search", sorted(set(args.ef_grid))
    else:
        name, grid = None, [None]
    tried: dict[str, float] = {}
    chosen, recall = settings, 0.0
    for value in grid:
        candidate = settings if name is None else settings.model_copy(update={name: value})
        apply_search_params(index, candidate)
        _, approx = search(index, queries, RECALL_K)
        recall = recall_at_k(approx, exact, RECALL_K)
        chosen = candidate
        if name is not None:
            tried[f"{name}={value}"] = round(recall, 4)
            log(f"    {name}={value}: recall@{RECALL_K} {recall:.4f}")
        if recall >= args.recall_target:
            break
    apply_search_params(index, chosen)
    return chosen, recall, tried


def synthetic_offline(
    cat: Catalog, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, tuple[Any, float]]]:
    """Recall and single-query latency of each index type; returns records and the tuned settings."""
    import faiss

    from index_builder.faiss_index import build_index, exact_search, index_params
    from index_builder.vectors import fold_bias, query_vectors

    n = cat.n
    label = size_label(n)
    rng = np.random.default_rng(args.seed + 2)
    vectors = fold_bias(cat.unit, cat.bias, cat.scale)
    ids = cat.item_ids
    users, _ = sample_users(cat, args.recall_queries + args.latency_queries, rng)
    queries = query_vectors(users)
    recall_queries, latency_queries = queries[: args.recall_queries], queries[args.recall_queries :]
    started = time.perf_counter()
    _, exact = exact_search(vectors, ids, recall_queries, RECALL_K)
    log(
        f"synthetic {label}: exact top-{RECALL_K} of {len(recall_queries)} queries in "
        f"{time.perf_counter() - started:.1f}s ({faiss.omp_get_max_threads()} threads)"
    )
    records, tuned = [], {}
    for kind in args.types:
        settings = index_settings_for(kind, n, args)
        params = index_params(settings, n)
        log(f"synthetic {label}: building {kind} {params if kind != 'ivf' else {'nlist': params['nlist']}}")
        started = time.perf_counter()
        index = build_index(vectors, ids, settings, progress=True)
        build_s = time.perf_counter() - started
        log(f"  built in {build_s:.1f}s")
        settings, recall, tried = tune(index, settings, recall_queries, exact, args)
        tuned[kind] = (settings, recall)
        started = time.perf_counter()
        latencies = time_single_queries(index, latency_queries, RECALL_K, args.latency_max_seconds)
        seconds = time.perf_counter() - started
        stats = latency_summary(latencies)
        log(
            f"  {kind}: recall@{RECALL_K} {recall:.4f}, single query p50 {stats['p50_ms']} "
            f"p99 {stats['p99_ms']} max {stats['max_ms']} ms over {len(latencies)} queries"
        )
        records.append(
            {
                "scenario": f"synthetic-{label}-search",
                "catalog_size": n,
                "index_type": kind,
                "index_params": {
                    **index_params(settings, n),
                    "build_s": round(build_s, 2),
                    "tuning": tried or None,
                    "search_k": RECALL_K,
                    "faiss_threads": 1,
                },
                "target_rps": None,
                "achieved_rps": None,
                **{key: stats[key] for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms")},
                "errors": 0,
                "degraded": None,
                "recall_at_100": round(recall, 4),
                "server_stage_ms": None,
                "duration_s": round(seconds, 2),
                "step": "single-query",
                "requests": len(latencies),
                "mean_ms": stats["mean_ms"],
            }
        )
        del index
        gc.collect()
    return records, tuned


GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Documentary")


def synthetic_user_data(cat: Catalog, args: argparse.Namespace) -> Any:
    """Users with profiles and the histories of ``sample_users``, as InteractionData over the catalog."""
    import pandas as pd

    from model.data.schema import make_interaction_data

    rng = np.random.default_rng(args.seed + 3)
    _, histories = sample_users(cat, args.synthetic_users, rng)
    now = int(time.time())
    rows_user, rows_item, rows_ts = [], [], []
    for user, history in enumerate(histories, start=1):
        if len(history):
            start = now - int(rng.integers(1, 400)) * 86_400
            rows_user.append(np.full(len(history), user))
            rows_item.append(history)  # oldest first, at increasing timestamps
            rows_ts.append(np.sort(rng.integers(start, now - 60, len(history))))
    interactions = pd.DataFrame(
        {
            "user_id": np.concatenate(rows_user),
            "item_id": np.concatenate(rows_item),
            "timestamp": np.concatenate(rows_ts),
            "rating": 4.0,
        }
    )
    n_users = len(histories)
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            "gender": rng.choice(["M", "F"], n_users),
            "age": rng.choice(["1", "18", "25", "35", "45", "50", "56"], n_users),
            "occupation": rng.integers(0, 21, n_users).astype(str),
            "zip_code": rng.integers(10_000, 99_999, n_users).astype(str),
        }
    )
    topic = cat.cluster_topic[cat.cluster]
    items = pd.DataFrame(
        {
            "item_id": cat.item_ids,
            "title": "",
            "genres": np.asarray(GENRES, dtype=object)[topic % len(GENRES)],
            "year": (1950 + cat.cluster % 70).astype(np.int64),
        }
    )
    return make_interaction_data(interactions, users, items, f"synthetic-catalog-{size_label(cat.n)}")


def write_synthetic_artifacts(cat: Catalog, data: Any, root: Path) -> Path:
    """The project's artifacts for the synthetic catalog: an untrained Cold & Warm Net user tower over an
    encoder whose catalog is the synthetic item ids, and the synthetic item vectors as the item table."""
    import torch

    from model.artifacts import ItemTable, data_fingerprint, write_artifacts
    from model.features import FeatureEncoder
    from model.nn.cold_warm_net import ColdWarmNet
    from model.settings import FeatureConfig, ModelConfig

    torch.manual_seed(0)
    user_ids = data.users["user_id"].to_numpy(np.int64)
    encoder = FeatureEncoder.fit(data, user_ids, FeatureConfig())
    if not np.array_equal(encoder.catalog_item_ids, cat.item_ids):
        raise RuntimeError("the encoder's catalog differs from the synthetic item ids")
    net = ColdWarmNet(encoder, ModelConfig(embedding_dim=cat.dim))
    net.eval()
    items = ItemTable(cat.item_ids, cat.unit, cat.bias)
    manifest = {
        "model_name": "cold_warm_net (untrained; synthetic catalog benchmark)",
        "dataset": data.name,
        "data_fingerprint": data_fingerprint(data),
        "scale": cat.scale,
        "feature_config": encoder.config.model_dump(mode="json"),
        "metrics": {},
    }
    return write_artifacts(root, net.user_tower, items, encoder, manifest)


def synthetic_serving(
    cat: Catalog, tuned: dict[str, tuple[Any, float]], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from index_builder.build import build_index_artifacts
    from index_builder.faiss_index import index_params
    from model.settings import FeatureConfig

    label = size_label(cat.n)
    log(f"synthetic {label}: writing serving artifacts ({args.synthetic_users} users)")
    data = synthetic_user_data(cat, args)
    user_ids = data.users["user_id"].to_numpy(np.int64)
    records: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="coldwarm-bench-artifacts-") as tmp:
        directory = write_synthetic_artifacts(cat, data, Path(tmp))
        with users_in_redis(args, data, FeatureConfig().max_history) as prefix:
            for kind, (settings, recall) in tuned.items():
                log(f"synthetic {label}: building the served {kind} index")
                started = time.perf_counter()
                build_index_artifacts(directory, settings=settings, progress=True)
                log(f"  built and published in {time.perf_counter() - started:.1f}s")
                params = index_params(settings, cat.n)
                params["recall_from"] = "offline tuning (realistic queries); served tower is untrained"
                info = ScenarioInfo(f"synthetic-{label}-http", cat.n, kind, params, round(recall, 4))
                phase_records, summary = serve_scenario(info, directory, prefix, user_ids, args)
                records.extend(phase_records)
                summaries.append(summary)
    return records, summaries


# ----- output ---------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _params_text(record: dict[str, Any]) -> str:
    params = record.get("index_params") or {}
    keys = ("nlist", "nprobe", "m", "ef_construction", "ef_search")
    return " ".join(f"{k}={params[k]}" for k in keys if k in params) or "–"


def markdown_table(records: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | step | items | index | params | target rps | achieved rps | p50 ms | p90 ms | p99 ms "
        "| max ms | errors | degraded | recall@100 | server features / model / search / total ms | s |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in records:
        stages = r.get("server_stage_ms")
        stage_text = (
            " / ".join(_fmt(stages.get(s), 2) for s in ("features", "model", "search", "total"))
            if stages
            else "–"
        )
        mark = "" if r.get("passed") is None else (" ✓" if r["passed"] else " ✗")
        lines.append(
            f"| {r['scenario']} | {r.get('step', '')}{mark} | {r['catalog_size']} | {r['index_type']} "
            f"| {_params_text(r)} | {_fmt(r['target_rps'], 0)} | {_fmt(r['achieved_rps'])} "
            f"| {_fmt(r['p50_ms'], 2)} | {_fmt(r['p90_ms'], 2)} | {_fmt(r['p99_ms'], 2)} "
            f"| {_fmt(r['max_ms'], 2)} "
            f"| {r['errors']} | {_fmt(r['degraded'])} | {_fmt(r['recall_at_100'], 4)} | {stage_text} "
            f"| {_fmt(r['duration_s'])} |"
        )
    return "\n".join(lines)


def write_results(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result["records"])
    summary = "\n".join(
        f"- {s['scenario']} ({s['index_type']}, {s['catalog_size']} items): highest rate held "
        f"{_fmt(s['max_sustained_rps'], 0)} rps (p99 <= {s['criteria']['p99_ms']} ms, errors <= "
        f"{s['criteria']['max_error_rate']:.0%}, degraded <= {s['criteria']['max_degraded_rate']:.0%}, "
        f"achieved >= {s['criteria']['min_achieved_fraction']:.0%})"
        for s in result["summary"]
    )
    out.with_suffix(".md").write_text(f"{table}\n\n{summary}\n")
    print()
    print(table)
    if summary:
        print()
        print(summary)


def http_seconds(args: argparse.Namespace) -> float:
    """Upper bound of one HTTP scenario: start, phases, search steps, settling."""
    fixed = sum(args.warmup + args.duration + 2.0 for _ in args.rates)
    search = max(0, args.search_steps) * (args.warmup + args.search_duration + 2.0)
    return 15.0 + fixed + search


def plan_text(args: argparse.Namespace) -> str:
    parts = []
    if not args.skip_movielens:
        parts.append(f"HTTP scenario over {args.artifacts} (at most ~{http_seconds(args) / 60:.1f} min)")
    if not args.skip_synthetic:
        sizes = ", ".join(size_label(n) for n in args.sizes)
        text = f"synthetic catalogs {sizes} with {', '.join(args.types)}"
        if args.serve_synthetic:
            served = len(args.sizes) * len(args.types)
            text += f", each served over HTTP ({served} x ~{http_seconds(args) / 60:.1f} min + index builds)"
        parts.append(text)
    return "; ".join(parts) or "nothing to do"


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that every finally (server, Redis keys) runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "records": [],
        "summary": [],
    }
    status = 0
    log(f"plan: {plan_text(args)}")
    try:
        if not args.skip_movielens:
            records, summaries = movielens_scenario(args)
            result["records"] += records
            result["summary"] += summaries
        if not args.skip_synthetic:
            for n in args.sizes:
                cat = make_catalog(n, args.dim, args.seed)
                records, tuned = synthetic_offline(cat, args)
                result["records"] += records
                if args.serve_synthetic:
                    records, summaries = synthetic_serving(cat, tuned, args)
                    result["records"] += records
                    result["summary"] += summaries
                del cat
                gc.collect()
    except BenchError as error:
        log(f"error: {error}")
        status = 2
    except (KeyboardInterrupt, SystemExit):
        log("interrupted: writing what was measured so far")
        status = 130
    finally:
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        if result["records"]:
            write_results(args.out, result)
            log(f"wrote {args.out} and {args.out.with_suffix('.md')} ({result['wall_seconds']}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
