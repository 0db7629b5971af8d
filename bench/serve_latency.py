"""End-to-end serving latency of POST /recommend, batching off against on, and index search on large catalogs.

    python bench/serve_latency.py --artifacts artifacts            # the comparison, about 12 minutes
    python bench/serve_latency.py --artifacts A --batching on --repeats 0 --rates 500,1000 --duration 5
    python bench/serve_latency.py --skip-movielens --synthetic --sizes 100k     # index part only

Timing on a small machine is noisy: pause what else runs for the duration, and resume it whatever
happens, e.g. ``pids=$(pgrep -f "coldwarm train"); trap 'kill -CONT $pids' EXIT; kill -STOP $pids``.

1. HTTP scenario (MovieLens by default), one run measuring the service unbatched and batched side by
   side. Every user of ``--data`` is bulk-loaded into the real Redis under a fresh key prefix (deleted
   at the end). Then, in order:

   a. **Floor** (``bench/_serve_floor.py``, in a subprocess, before any server runs): the batched floor
      of one request, (a plain ``redis.asyncio`` MULTI read of 64 users' keys + ``compute_batch`` of
      them) / 64, medians of ``--floor-reps`` repetitions; and the feature store's read of one user
      against the plain client's read of the same keys (ratio of p50s), Feast's SDK when importable.
   b. One real uvicorn server per ``--batching`` mode, all started at once (one worker each, a free
      127.0.0.1 port each): ``off`` is COLDWARM_MAX_BATCH=1, ``on`` is ``--max-batch`` with
      ``--batch-wait-us``. Only one of them is under load at any moment; the others idle.
   c. **p99 at ``--repeat-rate``** (500 RPS): ``--repeats`` phases per mode, the modes alternating
      (off on, on off, ...) so that machine noise hits both; the median of the repeats' p99 is reported
      with every value.
   d. **Highest rate held**: a rate ladder per mode, the modes' steps interleaved. The ladder starts
      from the repeats' outcome at --repeat-rate (held when most repeats passed), climbs the fixed
      ``--rates`` until one fails, then a bounded search (``--search-steps``): x ``--search-factor``
      while everything passes, else bisection. A rate is held when p99 <= --slo-p99-ms (10 ms),
      errors <= --max-error-rate, degraded answers (load shed) <= --max-degraded-rate and
      achieved >= --min-achieved x target.
   e. **/recommend/batch**: ``--batch-users`` users per call from ``--batch-callers`` closed-loop callers
      (each for ``--batch-seconds``), on each batching server; the best users/s is reported.

   Each phase of c and d is open loop: requests (k=50, exclude_seen, ~10% unknown users) are sent on
   a schedule fixed in advance, for a warm-up plus a measured window. ``--arrivals poisson`` (the
   default): the gaps between due times are independent exponentials of mean 1 / rate from a numpy
   Generator seeded by (``--seed``, rate, repeat), so request i is due at t0 + the sum of the first i
   gaps, and both modes get the same schedule at the same rate; ``--arrivals uniform``: evenly spaced,
   i / rate. Latency is client-side, from each request's *scheduled* send time (queueing included, no
   coordinated omission). Around each measured window the benchmark reads the CPU seconds (utime +
   stime, /proc/<pid>/stat) of the server process, of Redis and of itself, and the answers completed in
   the window: **server CPU time per answered request**, compared at the highest rate held with the
   floor of (a). The server's ``coldwarm_batch_size`` histogram (/metrics) is read around every phase:
   the mean batch size. The machine's busy CPUs (/proc/stat) less this benchmark's own processes say
   what else ran: a phase during which others kept more than ``--max-other-cores`` busy is run again
   (at most ``--noise-retries`` times; the noisy one stays in the records, marked superseded).
   Targets (``targets`` in the results, each with its value and pass/fail): batched highest rate >=
   2.5x unbatched; batched p99 at 500 RPS <= 4 ms; batched server CPU per request <= 3x the floor;
   /recommend/batch >= 20,000 users/s; the store's read of one user <= 1.3x the plain client's.
2. Synthetic catalogs (``--synthetic``; skipped by default, and always with ``--skip-synthetic``):
   100k and 1M items by default, d = 64 + 1 folded bias: clustered item vectors
   and user queries built like real users (mean of a history drawn from a few taste clusters, plus
   profile-only cold users). Exact (flat), IVF and HNSW indexes are built with the project's
   ``build_index``; nprobe / efSearch are tuned up a grid until recall@100 against ``exact_search``
   reaches --recall-target on 1000 queries; single-query search latency is timed with one FAISS
   thread on 2000 other queries. ``--serve-synthetic`` also serves each synthetic catalog over HTTP
   (artifacts written by the project's ``write_artifacts`` with an untrained Cold & Warm Net user
   tower, index by ``build_index_artifacts``), with the same phases as 1 b-d (no floor).

Writes bench/results/serve_latency.json (machine, config, records, summary, floor, store_read,
batch_endpoint, targets) and a markdown report beside it (.md). Numbers depend on the machine and its
load: the JSON records both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import shlex
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
    ARRIVALS,
    BenchError,
    Connection,
    CpuSample,
    CpuTarget,
    PhaseResult,
    ProcessTree,
    ServerProcess,
    connect_redis,
    cpu_between,
    delete_keys,
    latency_summary,
    machine_info,
    render_request,
    run_async,
    run_phase,
    simple_get,
    simple_request,
    training_data_warning,
)
from _serve_floor import measure_in_subprocess  # noqa: E402

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
    scen.add_argument("--synthetic", action="store_true", help="also the synthetic catalogs (index part)")
    scen.add_argument("--skip-synthetic", action="store_true", help="no synthetic catalogs (the default)")
    scen.add_argument("--serve-synthetic", action="store_true", help="also serve the synthetic catalogs")
    scen.add_argument("--out", type=Path, default=DEFAULT_OUT)

    http = p.add_argument_group("HTTP load")
    http.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="artifacts root or version")
    http.add_argument("--data", default=str(DEFAULT_DATA), help="the data the artifacts were trained on")
    http.add_argument(
        "--batching",
        type=lambda s: parse_list(s, str),
        default=["off", "on"],
        help="servers compared: off (COLDWARM_MAX_BATCH=1) and/or on (--max-batch)",
    )
    http.add_argument("--max-batch", type=int, default=64, help="COLDWARM_MAX_BATCH of the batching server")
    http.add_argument("--batch-wait-us", type=float, default=0.0, help="its COLDWARM_BATCH_WAIT_US")
    http.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes of each service (CPU time summed over them and their supervisor)",
    )
    http.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="open-loop schedule")
    http.add_argument("--repeat-rate", type=float, default=500.0, help="rate of the repeated p99 phases")
    http.add_argument("--repeats", type=int, default=5, help="phases per mode at --repeat-rate (0: none)")
    http.add_argument(
        "--rates", type=lambda s: parse_list(s, float), default=[1000, 1500, 2000, 3000], help="ladder"
    )
    http.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    http.add_argument("--warmup", type=float, default=2.0, help="seconds per phase excluded from stats")
    http.add_argument("--search-steps", type=int, default=3, help="extra rates tried after the fixed ones")
    http.add_argument("--search-duration", type=float, default=10.0, help="measured seconds per search step")
    http.add_argument("--search-factor", type=float, default=1.5, help="step up when every rate passed")
    http.add_argument("--slo-p99-ms", type=float, default=10.0)
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
    http.add_argument(
        "--exact-batch-from",
        type=int,
        default=None,
        help="COLDWARM_INDEX_EXACT_BATCH_FROM of the servers (default: the service's; 0: FAISS always)",
    )
    http.add_argument("--no-uvloop", action="store_true", help="client on asyncio's default loop")
    http.add_argument(
        "--max-other-cores",
        type=float,
        default=0.25,
        help="a phase during which other processes kept more CPUs busy than this is run again",
    )
    http.add_argument("--noise-retries", type=int, default=2, help="times a noisy phase is run again")
    http.add_argument("--batch-users", type=int, default=256, help="users per /recommend/batch call")
    http.add_argument(
        "--batch-callers", type=lambda s: parse_list(s, int), default=[1, 2], help="concurrent batch callers"
    )
    http.add_argument("--batch-seconds", type=float, default=10.0, help="per /recommend/batch run (0: none)")
    http.add_argument("--floor-reps", type=int, default=300, help="repetitions of the floor's read + compute")
    http.add_argument("--store-rounds", type=int, default=5, help="rounds of store vs plain read")
    http.add_argument("--store-calls", type=int, default=1000, help="calls per reader per round")
    http.add_argument("--skip-floor", action="store_true", help="no floor, no store vs plain read")

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


def _per_request(phase: PhaseResult, name: str) -> float | None:
    value = phase.cpu_ms_per_answer(name)
    return None if value is None else round(value, 4)


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
        "arrivals": phase.arrivals,
        "offered_rps": round(phase.offered_rps, 1),
        "requests": phase.scheduled,
        "passed": passed(phase, stats, args),
        "error_kinds": dict(phase.error_kinds),
        "client_send_lag_p99_ms": lag["p99_ms"],
        "connections_opened": phase.connections_opened,
        # CPU over the measured window: seconds per process, and per answer completed in the window.
        "server_cpu_ms_per_request": _per_request(phase, "server"),
        # The server's event-loop thread alone (HTTP, validation, the store read, answers); the rest
        # of server_cpu_ms_per_request is the model thread's (and any other thread's).
        "server_loop_cpu_ms_per_request": _per_request(phase, "server_loop"),
        "redis_cpu_ms_per_request": _per_request(phase, "redis"),
        "client_cpu_ms_per_request": _per_request(phase, "client"),
        "cpu_seconds": phase.cpu_seconds or None,
        "cpu_window_s": round(phase.cpu_window_s, 3) if phase.cpu_seconds else None,
        "answers_in_window": phase.answers_in_window if phase.cpu_seconds else None,
        "machine_busy_cores": phase.machine_busy_cores,
        # What else kept the machine's CPUs busy meanwhile (other processes): noise, when above ~0.1.
        "other_busy_cores": other_busy_cores(phase),
    }


# The processes whose CPU time run_phase reads (server_loop is a thread of server).
PROCESSES = ("server", "redis", "client")


def other_busy_cores(phase: PhaseResult) -> float | None:
    if phase.machine_busy_cores is None or not phase.cpu_window_s:
        return None
    ours = sum(phase.cpu_seconds.get(name, 0.0) for name in PROCESSES) / phase.cpu_window_s
    return round(phase.machine_busy_cores - ours, 2)


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


def request_ids(user_ids: np.ndarray, args: argparse.Namespace, n: int, seed: int) -> list[int]:
    """Known users at random, ``unknown_fraction`` of unknown ones (ids above every known one)."""
    rng = np.random.default_rng(seed)
    known = rng.choice(user_ids, size=n)
    unknown = int(np.max(user_ids)) + 1 + rng.integers(0, 1_000_000_000, size=n)
    return [int(u) for u in np.where(rng.random(n) < args.unknown_fraction, unknown, known)]


def request_pool(port: int, user_ids: np.ndarray, args: argparse.Namespace, n: int = 60_000) -> list[bytes]:
    """Pre-rendered /recommend requests: known users at random, ``unknown_fraction`` of unknown ones."""
    return [
        render_request(port, "/recommend", {"user_id": u, "k": args.k, "exclude_seen": True})
        for u in request_ids(user_ids, args, n, args.seed + 1)
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


def batch_histogram(port: int) -> dict[str, float] | None:
    """The server's coldwarm_batch_size histogram from /metrics: count, sum and cumulative buckets."""
    status, body = simple_get(port, "/metrics", timeout_s=5.0)
    if status != 200:
        return None
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if not line.startswith("coldwarm_batch_size"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("coldwarm_batch_size_bucket"):
            out["le_" + name.split('le="', 1)[1].split('"', 1)[0]] = float(value)
        elif name in ("coldwarm_batch_size_count", "coldwarm_batch_size_sum"):
            out[name.removeprefix("coldwarm_batch_size_")] = float(value)
    return out


def batch_sizes_between(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """Model calls (batches) between two scrapes, the requests they computed, their mean size and the
    share of requests computed in batches of more than one."""
    if not before or not after or "count" not in after:
        return None
    batches = after["count"] - before.get("count", 0.0)
    requests = after["sum"] - before.get("sum", 0.0)
    alone = after.get("le_1.0", 0.0) - before.get("le_1.0", 0.0)
    return {
        "batches": int(batches),
        "requests": int(requests),
        "mean_size": round(requests / batches, 2) if batches else None,
        "batched_request_share": round(1 - alone / requests, 3) if requests else None,
    }


@dataclass
class Mode:
    """One server of the comparison: its batching setting, process and pre-rendered requests."""

    name: str  # "off" or "on"
    max_batch: int
    batch_wait_us: float
    server: ServerProcess
    requests: list[bytes]
    cpu_pids: dict[str, CpuTarget]

    @property
    def batching(self) -> bool:
        return self.max_batch > 1


def mode_settings(name: str, args: argparse.Namespace) -> tuple[int, float]:
    if name == "off":
        return 1, 0.0
    if name == "on":
        return args.max_batch, args.batch_wait_us
    raise BenchError(f"--batching takes off and on, got {name!r}")


class Ladder:
    """One mode's search for the highest rate held: the fixed rates upwards until one fails, then at most
    ``steps`` more rates, x ``factor`` while every rate passed, else halfway between the highest rate
    that passed and the lowest above it that failed (until they are within 10%)."""

    def __init__(self, rates: list[float], steps: int, factor: float) -> None:
        self.fixed = sorted(rates)
        self.steps = max(0, steps)
        self.factor = factor
        self.outcome: dict[float, bool] = {}
        self.searched = 0

    def bounds(self) -> tuple[float, float | None]:
        good = [r for r, ok in self.outcome.items() if ok]
        lo = max(good) if good else 0.0
        bad = [r for r, ok in self.outcome.items() if not ok and r > lo]
        return lo, (min(bad) if bad else None)

    def next(self) -> tuple[float, str] | None:
        """The next rate to try and whether it is a fixed or a search step; None when done."""
        lo, hi = self.bounds()
        if hi is None:
            for rate in self.fixed:
                if rate > lo and rate not in self.outcome:
                    return rate, "fixed"
        if self.searched >= self.steps:
            return None
        if hi is None:
            rate = float(round(lo * self.factor))
        else:
            if hi - lo <= max(1.0, 0.1 * hi):
                return None
            rate = float(round((lo + hi) / 2))
        if rate <= lo or rate in self.outcome or rate < 1:
            return None
        self.searched += 1
        return rate, "search"

    @property
    def best(self) -> float | None:
        return self.bounds()[0] or None


async def _batch_callers(
    port: int, bodies: list[bytes], users_per_call: int, callers: int, seconds: float
) -> dict[str, Any]:
    """``callers`` closed-loop callers of /recommend/batch for ``seconds``: answers counted from each
    body's bytes (an answer has an "items" list; an entry error has none)."""
    connections = [await Connection.open(port) for _ in range(callers)]
    started = time.perf_counter()
    deadline = started + seconds
    totals = {"calls": 0, "answers": 0, "degraded": 0, "errors": 0}
    latencies: list[float] = []

    async def call_loop(slot: int) -> None:
        i = slot
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            status, body, keep = await connections[slot].request(bodies[i % len(bodies)])
            latencies.append((time.perf_counter() - sent) * 1e3)
            i += callers
            totals["calls"] += 1
            if status != 200:
                totals["errors"] += users_per_call
            else:
                answered = body.count(b'"items":')
                totals["answers"] += answered
                totals["degraded"] += body.count(b'"degraded":true')
                totals["errors"] += users_per_call - answered
            if not keep:
                connections[slot].close()
                connections[slot] = await Connection.open(port)

    try:
        await asyncio.gather(*(call_loop(slot) for slot in range(callers)))
    finally:
        for conn in connections:
            conn.close()
    elapsed = time.perf_counter() - started
    model_answers = totals["answers"] - totals["degraded"]
    stats = latency_summary(latencies)
    return {
        **totals,
        "seconds": round(elapsed, 2),
        "users_per_s": round(model_answers / elapsed, 1),
        "call_p50_ms": stats["p50_ms"],
        "call_p99_ms": stats["p99_ms"],
    }


def batch_endpoint(mode: Mode, user_ids: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """/recommend/batch throughput of ``mode``'s server, in model-answered users per second."""
    port, n = mode.server.port, args.batch_users
    bodies = []
    for b in range(16):
        ids = request_ids(user_ids, args, n, args.seed + 100 + b)
        payload = {"requests": [{"user_id": u, "k": args.k, "exclude_seen": True} for u in ids]}
        bodies.append(render_request(port, "/recommend/batch", payload))
    # One call checked in full first: every entry answered with k items, in order, from the model.
    status, body = simple_request(
        port, "POST", "/recommend/batch", json.loads(bodies[0].split(b"\r\n\r\n")[1])
    )
    answer = json.loads(body) if status == 200 else {}
    results = answer.get("results") or []
    if status != 200 or len(results) != n or any(len(r.get("items", ())) != args.k for r in results):
        raise RuntimeError(f"/recommend/batch answered {status}: {body[:300]!r}")
    runs = []
    for callers in args.batch_callers:
        before_hist = batch_histogram(port)
        before = CpuSample.take(mode.cpu_pids)
        run = run_async(_batch_callers(port, bodies, n, callers, args.batch_seconds), not args.no_uvloop)
        cpu, busy = cpu_between(before, CpuSample.take(mode.cpu_pids))
        answered = max(1, run["answers"])
        run.update(
            callers=callers,
            server_cpu_us_per_user=round(cpu["server"] * 1e6 / answered, 1) if "server" in cpu else None,
            cpu_seconds=cpu,
            machine_busy_cores=busy,
            batch_sizes=batch_sizes_between(before_hist, batch_histogram(port)),
        )
        log(
            f"  [{mode.name}] /recommend/batch, {n} users/call, {callers} caller(s): "
            f"{run['users_per_s']:.0f} users/s ({run['calls']} calls, p50 {run['call_p50_ms']} ms, "
            f"errors {run['errors']}, degraded {run['degraded']}, "
            f"server CPU {run['server_cpu_us_per_user']} µs/user)"
        )
        runs.append(run)
        settle(mode.server, int(user_ids[0]), args)
    best = max(runs, key=lambda r: r["users_per_s"])
    return {
        "batching": mode.batching,
        "max_batch": mode.max_batch,
        "users_per_call": n,
        "best_users_per_s": best["users_per_s"],
        "best_callers": best["callers"],
        "runs": runs,
    }


def compare_modes(
    modes: list[Mode], info: ScenarioInfo, user_ids: np.ndarray, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The repeated phases at --repeat-rate, then the interleaved ladders; records and per-mode results."""
    records: list[dict[str, Any]] = []
    repeats: dict[str, list[dict[str, Any]]] = {m.name: [] for m in modes}
    ladders = {m.name: Ladder(args.rates, args.search_steps, args.search_factor) for m in modes}
    probe_user = int(user_ids[0])

    def run(mode: Mode, rate: float, duration: float, step: str, seed_tag: int) -> dict[str, Any]:
        """One phase; again (at most --noise-retries times) while other processes took more than
        --max-other-cores of the machine during it. The phases run again stay in the records, marked
        superseded, and count nowhere else."""
        for attempt in range(max(0, args.noise_retries) + 1):
            record = run_once(mode, rate, duration, step, seed_tag)
            others = record["other_busy_cores"]
            if others is None or others <= args.max_other_cores or attempt == args.noise_retries:
                return record
            record["superseded"] = f"other processes kept {others} CPUs busy"
            log(f"  other processes kept {others} CPUs busy during that phase: running it again")
        raise AssertionError("unreachable")

    def run_once(mode: Mode, rate: float, duration: float, step: str, seed_tag: int) -> dict[str, Any]:
        if not mode.server.alive():
            raise RuntimeError(f"the {mode.name} service died; log:\n{mode.server.log_tail()}")
        before = batch_histogram(mode.server.port)
        phase = run_async(
            run_phase(
                mode.server.port,
                mode.requests,
                rate,
                duration,
                args.warmup,
                args.request_timeout,
                args.max_connections,
                arrivals=args.arrivals,
                # The same schedule for every mode at a given rate and repeat.
                seed=[args.seed, int(rate), seed_tag],
                cpu_pids=mode.cpu_pids,
            ),
            use_uvloop=not args.no_uvloop,
        )
        record = http_record(info, phase, step, args)
        record.update(
            batching=mode.batching,
            max_batch=mode.max_batch,
            batch_wait_us=mode.batch_wait_us,
            batch_sizes=batch_sizes_between(before, batch_histogram(mode.server.port)),
        )
        records.append(record)
        stages = record["server_stage_ms"] or {}
        sizes = record["batch_sizes"] or {}
        log(
            f"  [{mode.name:3s}] {step:8s} {rate:6.0f} rps: achieved {record['achieved_rps']:7.1f}, "
            f"p50 {record['p50_ms']} p99 {record['p99_ms']} max {record['max_ms']} ms, "
            f"errors {record['errors']}/{record['requests']} {record['error_kinds'] or ''}"
            f"degraded {record['degraded']}, server total {stages.get('total')} ms (features "
            f"{stages.get('features')}, queue {stages.get('queue')}, model {stages.get('model')}, search "
            f"{stages.get('search')}), batch {sizes.get('mean_size')}, server CPU "
            f"{record['server_cpu_ms_per_request']} ms/req (event loop "
            f"{record['server_loop_cpu_ms_per_request']}), busy {record['machine_busy_cores']} cores "
            f"(others {record['other_busy_cores']}) "
            f"-> {'PASS' if record['passed'] else 'FAIL'}"
        )
        lag = record["client_send_lag_p99_ms"]
        if lag is not None and lag > 10.0:
            log(f"  note: sends ran up to {lag:.0f} ms late (p99): the load generator is short of CPU too")
        settle(mode.server, probe_user, args)
        return record

    for r in range(max(0, args.repeats)):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            repeats[mode.name].append(run(mode, args.repeat_rate, args.duration, f"repeat{r + 1}", r))
    for mode in modes:
        if repeats[mode.name]:  # the repeats are the ladder's step at --repeat-rate
            held = sum(rec["passed"] for rec in repeats[mode.name])
            ladders[mode.name].outcome[args.repeat_rate] = held * 2 > len(repeats[mode.name])
    turn = 0
    while True:
        order = modes if turn % 2 == 0 else modes[::-1]
        steps = [(mode, ladders[mode.name].next()) for mode in order]
        if all(step is None for _, step in steps):
            break
        for mode, step in steps:
            if step is None:
                continue
            rate, kind = step
            duration = args.duration if kind == "fixed" else args.search_duration
            record = run(mode, rate, duration, kind, 100 + turn)
            ladders[mode.name].outcome[rate] = record["passed"]
        turn += 1

    results: dict[str, Any] = {}
    for mode in modes:
        best = ladders[mode.name].best
        mine = [
            rec
            for rec in records
            if rec["max_batch"] == mode.max_batch
            and rec["batch_wait_us"] == mode.batch_wait_us
            and not rec.get("superseded")
        ]
        at_best = [rec for rec in mine if rec["target_rps"] == best and rec["passed"]]
        # The held phase at the best rate (the last one, for a repeated rate) gives the CPU figures.
        held = at_best[-1] if at_best else None
        p99s = [rec["p99_ms"] for rec in repeats[mode.name]]
        cpu_at_rate = [rec["server_cpu_ms_per_request"] for rec in repeats[mode.name]]
        results[mode.name] = {
            "batching": mode.batching,
            "max_batch": mode.max_batch,
            "batch_wait_us": mode.batch_wait_us,
            "max_sustained_rps": best,
            "repeat_rate": args.repeat_rate if p99s else None,
            "p99_at_repeat_rate_ms": round(float(np.median(p99s)), 3) if p99s and None not in p99s else None,
            "p99_at_repeat_rate_values_ms": p99s,
            "repeats_passed": sum(rec["passed"] for rec in repeats[mode.name]),
            "server_cpu_ms_per_request_at_repeat_rate": (
                round(float(np.median(cpu_at_rate)), 4) if cpu_at_rate and None not in cpu_at_rate else None
            ),
            "server_cpu_ms_per_request_at_max": held["server_cpu_ms_per_request"] if held else None,
            "server_loop_cpu_ms_per_request_at_max": held["server_loop_cpu_ms_per_request"] if held else None,
            "redis_cpu_ms_per_request_at_max": held["redis_cpu_ms_per_request"] if held else None,
            "client_cpu_ms_per_request_at_max": held["client_cpu_ms_per_request"] if held else None,
            "machine_busy_cores_at_max": held["machine_busy_cores"] if held else None,
            "batch_sizes_at_max": held["batch_sizes"] if held else None,
            "server_stage_ms_at_max": held["server_stage_ms"] if held else None,
            "other_busy_cores_max": max(
                (rec["other_busy_cores"] for rec in mine if rec["other_busy_cores"] is not None), default=None
            ),
            "rates_tried": {str(rate): ok for rate, ok in sorted(ladders[mode.name].outcome.items())},
        }
    return records, results


def index_manifest_of(artifacts_dir: Path) -> dict[str, Any]:
    from index_builder.build import INDEX_MANIFEST_FILE, resolve_index_dir

    return json.loads((resolve_index_dir(artifacts_dir) / INDEX_MANIFEST_FILE).read_text())


def manifest_recall(manifest: dict[str, Any]) -> float | None:
    value = manifest.get(f"recall_at_{manifest.get('recall_k', RECALL_K)}")
    return None if value is None else float(value)


def serving_env(
    artifacts_dir: Path,
    prefix: str,
    index_type: str,
    params: dict[str, Any],
    args: Any,
    max_batch: int = 64,
    batch_wait_us: float = 0.0,
) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLDWARM_INDEX_")}
    env.update(
        COLDWARM_ARTIFACTS_DIR=str(Path(artifacts_dir).resolve()),
        COLDWARM_REDIS_URL=args.redis_url,
        COLDWARM_KEY_PREFIX=prefix,
        COLDWARM_MAX_BATCH=str(max_batch),
        COLDWARM_BATCH_WAIT_US=f"{batch_wait_us:g}",
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
    if getattr(args, "exact_batch_from", None) is not None:
        env["COLDWARM_INDEX_EXACT_BATCH_FROM"] = str(args.exact_batch_from)
    return env


def redis_pid(url: str) -> int | None:
    """Redis's process id when it runs on this machine (its CPU time is then readable)."""
    client = connect_redis(url)
    try:
        pid = int(client.info("server").get("process_id", 0))
    finally:
        client.close()
    return pid if pid and Path(f"/proc/{pid}/stat").exists() else None


def serve_scenario(
    info: ScenarioInfo, artifacts_dir: Path, prefix: str, user_ids: np.ndarray, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Every --batching mode served at once, measured in turn; (records, summaries, batch endpoint runs)."""
    shared_pids = {"client": os.getpid()}
    if (pid := redis_pid(args.redis_url)) is not None:
        shared_pids["redis"] = pid
    with contextlib.ExitStack() as stack:
        modes: list[Mode] = []
        envs: dict[str, dict[str, str]] = {}
        ready: dict[str, Any] = {}
        for name in args.batching:
            max_batch, wait_us = mode_settings(name, args)
            env = serving_env(
                artifacts_dir, prefix, info.index_type, info.index_params, args, max_batch, wait_us
            )
            log(
                f"{info.scenario}: starting the {name} service ({info.index_type}, {info.catalog_size} "
                f"items, max batch {max_batch}, wait {wait_us:g} µs)"
            )
            started = time.perf_counter()
            server = stack.enter_context(ServerProcess(env, REPO, workers=args.workers))
            log(f"  ready on {server.url} after {time.perf_counter() - started:.1f}s")
            assert server.process is not None
            # The server is uvicorn and every process below it (its workers, with --workers > 1); its
            # event loops are their main threads.
            root = server.process.pid
            pids: dict[str, CpuTarget] = {
                "server": ProcessTree(root),
                "server_loop": ProcessTree(root, main_threads=True),
                **shared_pids,
            }
            requests = request_pool(server.port, user_ids, args)
            modes.append(Mode(name, max_batch, wait_us, server, requests, pids))
            envs[name] = env
            status, body = simple_get(server.port, "/readyz")
            with contextlib.suppress(ValueError):
                ready[name] = json.loads(body) if status == 200 else {"status": status}
        records, results = compare_modes(modes, info, user_ids, args)
        endpoint = []
        if args.batch_seconds > 0 and args.batch_callers:
            for mode in modes:
                if mode.batching:
                    endpoint.append(
                        {
                            "scenario": info.scenario,
                            "workers": args.workers,
                            **batch_endpoint(mode, user_ids, args),
                        }
                    )
    summaries = []
    for name, result in results.items():
        env = envs[name]
        summaries.append(
            {
                "scenario": info.scenario,
                "catalog_size": info.catalog_size,
                "index_type": info.index_type,
                "workers": args.workers,
                **result,
                "criteria": {
                    "p99_ms": args.slo_p99_ms,
                    "max_error_rate": args.max_error_rate,
                    "max_degraded_rate": args.max_degraded_rate,
                    "min_achieved_fraction": args.min_achieved,
                    "arrivals": args.arrivals,
                },
                "server_env": {
                    k: v for k, v in env.items() if k.startswith("COLDWARM_") and "TOKEN" not in k
                },
                "readyz": ready.get(name),
            }
        )
        log(
            f"{info.scenario} [{name}]: highest rate held {result['max_sustained_rps']} rps, p99 at "
            f"{args.repeat_rate:g} rps {result['p99_at_repeat_rate_ms']} ms (median of "
            f"{result['p99_at_repeat_rate_values_ms']}), server CPU at the highest rate "
            f"{result['server_cpu_ms_per_request_at_max']} ms/request"
        )
    return records, summaries, endpoint


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def target(value: float | None, goal: float, at_most: bool, unit: str, what: str) -> dict[str, Any]:
    ok = None if value is None else (value <= goal if at_most else value >= goal)
    return {"what": what, "value": value, "goal": f"{'<=' if at_most else '>='} {goal:g}{unit}", "pass": ok}


def targets_of(summaries: list[dict[str, Any]], floor: dict[str, Any] | None, endpoint: list[dict]) -> dict:
    """Issue 11's targets, each with the value measured in this run and whether it passed."""
    on = next((s for s in summaries if s["batching"]), None)
    off = next((s for s in summaries if not s["batching"]), None)
    floor_us = ((floor or {}).get("floor") or {}).get("floor_us_per_request")
    store = (floor or {}).get("store_vs_plain") or {}
    cpu_on = on and on.get("server_cpu_ms_per_request_at_max")
    repeats = f"median of {len(on['p99_at_repeat_rate_values_ms'])}" if on else ""
    best_batch = max((e["best_users_per_s"] for e in endpoint), default=None)
    return {
        "batched_vs_unbatched_max_rps": target(
            ratio(on and on["max_sustained_rps"], off and off["max_sustained_rps"]),
            2.5, False, "x", "highest rate held, batching on / off",
        ),
        "p99_at_500_rps_batching_on_ms": target(
            on and on["p99_at_repeat_rate_ms"], 4.0, True, " ms",
            f"p99 at {on and on['repeat_rate']} rps with batching on, {repeats}",
        ),
        "cpu_per_request_vs_floor": target(
            ratio(cpu_on * 1e3 if cpu_on else None, floor_us), 3.0, True, "x",
            "server CPU per request at the highest rate held (batching on) / batched floor",
        ),
        "batch_endpoint_users_per_s": target(
            best_batch, 20_000, False, " users/s", "/recommend/batch, best of the callers tried"
        ),
        "store_read_vs_plain": target(
            store.get("ratio_p50"), 1.3, True, "x", "store read of one user / plain redis-py read, p50"
        ),
    }  # fmt: skip


def movielens_scenario(args: argparse.Namespace) -> dict[str, Any]:
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
    user_ids = user_ids.astype(np.int64)
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
    floor = None
    with users_in_redis(args, data, artifacts.encoder.config.max_history) as prefix:
        if not args.skip_floor:
            log(
                f"floor: {args.floor_reps} x (plain MULTI read + compute_batch) of 64 users; "
                "store vs plain read"
            )
            started = time.perf_counter()
            floor = measure_in_subprocess(
                artifacts.directory, prefix, user_ids, args.redis_url, k=args.k,
                unknown_fraction=args.unknown_fraction, seed=args.seed, reps=args.floor_reps,
                store_rounds=args.store_rounds, store_calls=args.store_calls,
            )  # fmt: skip
            log_floor(floor, time.perf_counter() - started)
        records, summaries, endpoint = serve_scenario(info, artifacts.directory, prefix, user_ids, args)
    floor_us = ((floor or {}).get("floor") or {}).get("floor_us_per_request")
    for summary in summaries:
        summary["model_version"] = artifacts.version
        summary["index_version"] = manifest.get("index_version")
        cpu = summary["server_cpu_ms_per_request_at_max"]
        summary["floor_us_per_request"] = floor_us
        summary["cpu_vs_floor_at_max"] = ratio(cpu * 1e3 if cpu else None, floor_us)
        summary["batch_endpoint_users_per_s"] = next(
            (e["best_users_per_s"] for e in endpoint if e["max_batch"] == summary["max_batch"]), None
        )
    return {
        "records": records,
        "summary": summaries,
        "floor": floor,
        "batch_endpoint": endpoint,
        "targets": targets_of(summaries, floor, endpoint),
    }


def log_floor(floor: dict[str, Any], seconds: float) -> None:
    if "error" in floor:
        log(f"  floor failed: {floor['error']}")
        return
    f, store = floor["floor"], floor["store_vs_plain"]
    log(
        f"  floor {f['floor_us_per_request']} µs/request (read of {f['batch']} {f['read']['median_ms']} ms + "
        f"compute_batch {f['compute']['median_ms']} ms; CPU {f['floor_cpu_us_per_request']} µs/request) "
        f"in {seconds:.0f}s"
    )
    if "error" in store:
        log(f"  store vs plain: {store['error']}")
    else:
        log(
            f"  store read of one user p50 {store['store']['p50_us']} µs vs plain "
            f"{store['plain']['p50_us']} µs: {store['ratio_p50']}x; Feast: {store['feast']}"
        )


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
                phase_records, served, _ = serve_scenario(info, directory, prefix, user_ids, args)
                records.extend(phase_records)
                summaries.extend(served)
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
        "| scenario | batching | step | items | index | params | target rps | achieved rps | p50 ms | p90 ms "
        "| p99 ms | max ms | errors | degraded | recall@100 "
        "| server features / queue / model / search / total ms | mean batch | server CPU ms/req | s |"
    )
    lines = [head, "|" + "---|" * 19]
    for r in records:
        stages = r.get("server_stage_ms")
        stage_text = (
            " / ".join(_fmt(stages.get(s), 2) for s in ("features", "queue", "model", "search", "total"))
            if stages
            else "–"
        )
        mark = "" if r.get("passed") is None else (" ✓" if r["passed"] else " ✗")
        if r.get("superseded"):
            mark += " (noisy: run again)"
        batching = "–" if r.get("batching") is None else ("on" if r["batching"] else "off")
        sizes = r.get("batch_sizes") or {}
        lines.append(
            f"| {r['scenario']} | {batching} | {r.get('step', '')}{mark} | {r['catalog_size']} "
            f"| {r['index_type']} | {_params_text(r)} | {_fmt(r['target_rps'], 0)} "
            f"| {_fmt(r['achieved_rps'])} "
            f"| {_fmt(r['p50_ms'], 2)} | {_fmt(r['p90_ms'], 2)} | {_fmt(r['p99_ms'], 2)} "
            f"| {_fmt(r['max_ms'], 2)} "
            f"| {r['errors']} | {_fmt(r['degraded'])} | {_fmt(r['recall_at_100'], 4)} | {stage_text} "
            f"| {_fmt(sizes.get('mean_size'), 2)} | {_fmt(r.get('server_cpu_ms_per_request'), 3)} "
            f"| {_fmt(r['duration_s'])} |"
        )
    return "\n".join(lines)


def comparison_table(result: dict[str, Any]) -> str:
    """Batching off against on, side by side, for the HTTP scenarios that compared them."""
    summaries = [s for s in result["summary"] if "batching" in s]
    if not summaries:
        return ""
    floor = result.get("floor") or {}
    store = floor.get("store_vs_plain") or {}
    columns = [f"{s['scenario']} batching {'on' if s['batching'] else 'off'}" for s in summaries]

    def values(s: dict[str, Any]) -> list[str]:
        sizes = s.get("batch_sizes_at_max") or {}
        p99s = ", ".join(_fmt(v, 2) for v in s.get("p99_at_repeat_rate_values_ms") or [])
        return [
            f"{_fmt(s['max_batch'])} / {_fmt(s['batch_wait_us'], 0)} µs / {s.get('workers', 1)}",
            _fmt(s["max_sustained_rps"], 0),
            f"{_fmt(s['p99_at_repeat_rate_ms'], 2)} ({p99s})",
            f"{s.get('repeats_passed')}/{len(s.get('p99_at_repeat_rate_values_ms') or [])}",
            _fmt(s.get("server_cpu_ms_per_request_at_repeat_rate"), 3),
            _fmt(s.get("server_cpu_ms_per_request_at_max"), 3),
            _fmt(s.get("server_loop_cpu_ms_per_request_at_max"), 3),
            _fmt(s.get("redis_cpu_ms_per_request_at_max"), 3),
            _fmt(s.get("client_cpu_ms_per_request_at_max"), 3),
            _fmt(s.get("machine_busy_cores_at_max"), 2),
            _fmt(sizes.get("mean_size"), 2),
            _fmt(s.get("floor_us_per_request"), 1),
            _fmt(s.get("cpu_vs_floor_at_max"), 2),
            _fmt(s.get("batch_endpoint_users_per_s"), 0),
            _fmt(s.get("other_busy_cores_max"), 2),
        ]

    per_call = (result.get("batch_endpoint") or [{}])[0].get("users_per_call", "–")
    rows = [
        "max batch / batch wait / workers",
        f"highest rate held, rps (p99 <= {summaries[0]['criteria']['p99_ms']:g} ms)",
        f"p99 at {_fmt(summaries[0].get('repeat_rate'), 0)} rps, ms: median (each run)",
        "runs at that rate that held",
        "server CPU ms / request at that rate (median)",
        "server CPU ms / request at the highest rate held",
        "  of which the event-loop thread (the rest: model thread)",
        "Redis CPU ms / request at the highest rate held",
        "load generator CPU ms / request at the highest rate held",
        "machine CPUs busy at the highest rate held",
        "mean batch size at the highest rate held",
        "batched floor, µs / request",
        "server CPU / floor at the highest rate held",
        f"/recommend/batch users/s ({per_call}/call)",
        "CPUs kept busy by other processes, worst phase (noise)",
    ]
    cells = [values(s) for s in summaries]
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(c[i] for c in cells) + " |" for i, row in enumerate(rows)]
    notes = []
    if floor.get("floor"):
        f = floor["floor"]
        notes.append(
            f"Floor: plain MULTI read of {f['batch']} users {f['read']['median_ms']} ms + compute_batch "
            f"{f['compute']['median_ms']} ms (medians of {f['reps']}) = {f['floor_us_per_request']} µs / "
            f"request; CPU time of the same {f['floor_cpu_us_per_request']} µs / request."
        )
    elif floor.get("error"):
        notes.append(f"Floor: failed: {floor['error']}")
    if store.get("ratio_p50") is not None:
        notes.append(
            f"Store read of one user: p50 {store['store']['p50_us']} µs vs plain redis-py "
            f"{store['plain']['p50_us']} µs = {store['ratio_p50']}x (mean {store['ratio_mean']}x; "
            f"{store['rounds']} rounds of {store['calls_per_round']} calls). Feast SDK: {store['feast']}."
        )
    elif store.get("error"):
        notes.append(f"Store vs plain: {store['error']}")
    for e in result.get("batch_endpoint") or []:
        runs = ", ".join(
            f"{r['callers']} caller(s) {_fmt(r['users_per_s'], 0)} users/s (p50 {r['call_p50_ms']} "
            f"ms/call, server CPU {r['server_cpu_us_per_user']} µs/user, degraded {r['degraded']}, "
            f"errors {r['errors']})"
            for r in e["runs"]
        )
        notes.append(f"/recommend/batch ({e['scenario']}, max batch {e['max_batch']}): {runs}.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def targets_table(targets: dict[str, Any]) -> str:
    lines = ["| target | measured | goal | |", "|---|---|---|---|"]
    for t in targets.values():
        mark = "–" if t["pass"] is None else ("pass" if t["pass"] else "**miss**")
        lines.append(f"| {t['what']} | {_fmt(t['value'], 3)} | {t['goal']} | {mark} |")
    return "\n".join(lines)


def summary_lines(result: dict[str, Any]) -> str:
    lines = []
    for s in result["summary"]:
        mode = "" if "batching" not in s else f", batching {'on' if s['batching'] else 'off'}"
        lines.append(
            f"- {s['scenario']} ({s['index_type']}, {s['catalog_size']} items{mode}): highest rate held "
            f"{_fmt(s['max_sustained_rps'], 0)} rps (p99 <= {s['criteria']['p99_ms']} ms, errors <= "
            f"{s['criteria']['max_error_rate']:.0%}, degraded <= {s['criteria']['max_degraded_rate']:.0%}, "
            f"achieved >= {s['criteria']['min_achieved_fraction']:.0%}, "
            f"{s['criteria'].get('arrivals', 'uniform')} arrivals)"
        )
    return "\n".join(lines)


def write_results(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    parts = []
    if result.get("command"):
        parts.append(f"Command: `{result['command']}`")
    comparison = comparison_table(result)
    if comparison:
        parts.append(comparison)
    if result.get("targets"):
        parts.append(targets_table(result["targets"]))
    if result["records"]:
        parts.append(markdown_table(result["records"]))
    summary = summary_lines(result)
    if summary:
        parts.append(summary)
    text = "\n\n".join(parts) + "\n"
    out.with_suffix(".md").write_text(text)
    print()
    print(text)


def http_seconds(args: argparse.Namespace) -> float:
    """Upper bound of one HTTP scenario: starts, repeats, ladder steps, batch endpoint, settling."""
    modes = max(1, len(args.batching))
    phase = args.warmup + args.duration + 2.0
    repeats = max(0, args.repeats) * modes * phase
    fixed = len(args.rates) * modes * phase
    search = max(0, args.search_steps) * modes * (args.warmup + args.search_duration + 2.0)
    endpoint = len(args.batch_callers) * (args.batch_seconds + 2.0) * args.batching.count("on")
    return 20.0 * modes + repeats + fixed + search + endpoint


def plan_text(args: argparse.Namespace) -> str:
    parts = []
    if not args.skip_movielens:
        floor = "" if args.skip_floor else "floor and store read (~1 min), then "
        parts.append(
            f"HTTP scenario over {args.artifacts}: {floor}batching {' vs '.join(args.batching)} "
            f"(at most ~{http_seconds(args) / 60:.1f} min)"
        )
    if run_synthetic(args):
        sizes = ", ".join(size_label(n) for n in args.sizes)
        text = f"synthetic catalogs {sizes} with {', '.join(args.types)}"
        if args.serve_synthetic:
            served = len(args.sizes) * len(args.types)
            text += f", each served over HTTP ({served} x ~{http_seconds(args) / 60:.1f} min + index builds)"
        parts.append(text)
    return "; ".join(parts) or "nothing to do"


def run_synthetic(args: argparse.Namespace) -> bool:
    return (args.synthetic or args.serve_synthetic) and not args.skip_synthetic


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that every finally (server, Redis keys) runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": shlex.join(
            ["python", "bench/serve_latency.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "records": [],
        "summary": [],
    }
    status = 0
    log(f"plan: {plan_text(args)}")
    try:
        for name in args.batching:
            mode_settings(name, args)
        if not args.skip_movielens:
            movielens = movielens_scenario(args)
            result["records"] += movielens.pop("records")
            result["summary"] += movielens.pop("summary")
            result.update(movielens)
        if run_synthetic(args):
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
        result["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        if result["records"]:
            write_results(args.out, result)
            log(f"wrote {args.out} and {args.out.with_suffix('.md')} ({result['wall_seconds']}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
