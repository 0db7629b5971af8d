"""Soak: mixed POST /recommend and POST /events traffic at a fixed rate for a long time (300 RPS for 10
minutes by default); reports errors, p99 over time and the growth of the server's RSS.

    python bench/soak.py --artifacts artifacts          # the full soak: 1 min warm-up + 10 min, ~12 min
    python bench/soak.py --artifacts A --duration 40 --warmup 10 --window 10 --out /tmp/soak.json

Set-up as in ``bench/serve_latency.py``: every user of ``--data`` is bulk-loaded into the real Redis
under a fresh key prefix (deleted at the end, also on Ctrl-C or SIGTERM); the service runs as a real
uvicorn server in a subprocess (one worker, COLDWARM_* settings) on a free 127.0.0.1 port, the only
address this benchmark talks to. One open-loop schedule, without gaps, sends --rate requests per second
for --warmup + --duration seconds; every latency is client-side, from the request's *scheduled* send
time (queueing included, no coordinated omission); each request gives up --request-timeout seconds
after its due time, so the run is bounded.

Traffic (seeded): --events-fraction of the requests are /events for a catalog item (ids from the
artifacts' items.npz), without a timestamp (the server stamps them now); --fresh-event-share of those go
to --fresh-users users unknown at the start, who move from cold-start to warm-up during the soak, the
rest to known users. The others are /recommend (k=50, exclude_seen) for known users, except
--unknown-fraction of them for users unknown at the start: half never-seen ids, half the fresh users.

Every --window seconds (warm-up windows included, marked and left out of the totals) one progress line
and one record: achieved rps (answered requests due in the window / its length), p50/p99/max per
endpoint, errors by kind, degraded answers, client send lag, and the server's RSS (VmRSS of the uvicorn
process, read from /proc at the window's end). At the end: totals, overall p99 and the worst window's
p99; the RSS growth = (end - baseline) / baseline, where the baseline is VmRSS sampled at the instant
the warm-up ends (before any load when --warmup is 0) and the end is VmRSS at the end of the last
window, plus the least-squares RSS slope over the measured windows; and an event audit: every user sent
an event must have, in Redis, its interaction count from before the soak plus the events the service
acknowledged (HTTP 200). Fewer is a lost event; more comes from requests the client gave up on.

Targets (exit 1 when one fails): zero errors, RSS growth below --max-rss-growth-pct (5 %), no lost
event, achieved rate >= --min-achieved x --rate. Exit 2 when a precondition is missing (artifacts,
Redis), 130 when interrupted. Writes bench/results/soak.json (machine, config, windows, summary) and a
markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve_common import (  # noqa: E402  (bench/ is not a package)
    Outcome,
    ServerProcess,
    latency_summary,
    machine_info,
    open_loop,
    render_request,
    run_async,
)
from serve_latency import (  # noqa: E402
    DEFAULT_DATA,
    REPO,
    BenchError,
    _fmt,
    _terminate,
    index_manifest_of,
    log,
    serving_env,
    users_in_redis,
)

DEFAULT_OUT = REPO / "bench" / "results" / "soak.json"
RECOMMEND, EVENTS = "recommend", "events"
ENDPOINTS = (RECOMMEND, EVENTS)


class ServerDied(RuntimeError):
    """The uvicorn process exited during the soak."""


# ----- command line -----------------------------------------------------------------------------------
def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="artifacts root or version")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the data the artifacts were trained on")
    p.add_argument("--rate", type=positive, default=300.0, help="requests per second, both endpoints")
    p.add_argument("--duration", type=positive, default=600.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds excluded from stats and RSS baseline")
    p.add_argument("--window", type=positive, default=30.0, help="seconds per reported window")
    p.add_argument("--events-fraction", type=fraction, default=0.2, help="share of requests to /events")
    p.add_argument("--fresh-users", type=int, default=500, help="users unknown at the start given events")
    p.add_argument("--fresh-event-share", type=fraction, default=0.5, help="share of /events for them")
    p.add_argument("--unknown-fraction", type=fraction, default=0.1, help="/recommend for unknown users")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--request-timeout", type=positive, default=5.0, help="seconds after the due time")
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--max-rss-growth-pct", type=float, default=5.0, help="target: RSS growth after warm-up")
    p.add_argument("--min-achieved", type=fraction, default=0.95, help="target: fraction of --rate")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument(
        "--redis-timeout-ms", type=float, default=None, help="COLDWARM_REDIS_TIMEOUT_MS (default: service's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-uvloop", action="store_true", help="client on asyncio's default loop")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the .md goes beside it")
    return p


# ----- the traffic ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Request i of the schedule: an event (user[i], item[i]) or a /recommend for user[i]."""

    is_event: np.ndarray  # bool (n,)
    user: np.ndarray  # int64 (n,)
    item: np.ndarray  # int64 (n,), meaningful for events
    fresh_users: np.ndarray  # int64: the users unknown at the start that get events


def make_plan(n: int, known: np.ndarray, item_ids: np.ndarray, args: argparse.Namespace) -> Plan:
    rng = np.random.default_rng(args.seed)
    top = int(known.max()) + 1
    fresh = top + np.arange(args.fresh_users, dtype=np.int64)
    never_seen = top + args.fresh_users + rng.integers(0, 1_000_000_000, n)  # never sent an event
    is_event = rng.random(n) < args.events_fraction
    draw = rng.random(n)
    fresh_below = np.where(is_event, args.fresh_event_share, args.unknown_fraction / 2)
    unknown_below = np.where(is_event, args.fresh_event_share, args.unknown_fraction)
    user = np.where(
        draw < fresh_below,
        rng.choice(fresh, n),
        np.where(draw < unknown_below, never_seen, rng.choice(known, n)),
    )
    return Plan(is_event, user.astype(np.int64), rng.choice(item_ids, n).astype(np.int64), fresh)


# ----- per-window accounting --------------------------------------------------------------------------
@dataclass
class EndpointStats:
    requests: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    degraded: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        stats = latency_summary(self.latencies_ms)
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "p50_ms": stats["p50_ms"],
            "p99_ms": stats["p99_ms"],
            "max_ms": stats["max_ms"],
            "degraded": self.degraded,
        }


@dataclass
class Window:
    index: int
    phase: str  # "warmup" or "soak"
    start_s: float  # since the schedule's start
    end_s: float
    first: int  # first request index due in the window
    stop: int  # one past the last
    endpoints: dict[str, EndpointStats] = field(
        default_factory=lambda: {name: EndpointStats() for name in ENDPOINTS}
    )
    send_lag_ms: list[float] = field(default_factory=list)
    rss_kb: int | None = None
    client_rss_kb: int | None = None
    report: dict[str, Any] | None = None  # set once every request of the window is done

    def latencies_ms(self) -> list[float]:
        return [x for stats in self.endpoints.values() for x in stats.latencies_ms]

    def finalize(self, baseline_kb: int | None) -> dict[str, Any]:
        kinds: Counter = Counter()
        for name, stats in self.endpoints.items():
            unfinished = stats.requests - stats.ok - sum(stats.errors.values())
            if unfinished > 0:  # cancelled at the end of the schedule (bounded wait), as run_phase counts
                stats.errors["cancelled"] += unfinished
            kinds.update({f"{name}:{kind}": count for kind, count in stats.errors.items()})
        length = self.end_s - self.start_s
        ok = sum(stats.ok for stats in self.endpoints.values())
        overall = latency_summary(self.latencies_ms())
        self.report = {
            "window": self.index,
            "phase": self.phase,
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "requests": sum(stats.requests for stats in self.endpoints.values()),
            "ok": ok,
            "achieved_rps": round(ok / length, 1) if length > 0 else None,
            "p50_ms": overall["p50_ms"],
            "p99_ms": overall["p99_ms"],
            "max_ms": overall["max_ms"],
            "errors": sum(kinds.values()),
            "error_kinds": dict(kinds),
            "degraded": self.endpoints[RECOMMEND].degraded,
            "endpoints": {name: stats.record() for name, stats in self.endpoints.items()},
            "client_send_lag_p99_ms": latency_summary(self.send_lag_ms)["p99_ms"],
            "server_rss_mb": mib(self.rss_kb),
            "server_rss_vs_baseline_pct": growth_pct(baseline_kb, self.rss_kb),
            "client_rss_mb": mib(self.client_rss_kb),
        }
        return self.report


def make_windows(args: argparse.Namespace) -> list[Window]:
    """Windows of --window seconds tiling the warm-up, then the measured part (each may end shorter)."""
    spans: list[tuple[str, float, float]] = []
    for phase, start, stop in (
        ("warmup", 0.0, args.warmup),
        ("soak", args.warmup, args.warmup + args.duration),
    ):
        edge = start
        while edge < stop - 1e-9:
            spans.append((phase, edge, min(edge + args.window, stop)))
            edge += args.window

    def first_due(seconds: float) -> int:  # request i is due at i / rate
        return math.ceil(seconds * args.rate - 1e-9)

    return [
        Window(i, phase, start, end, first_due(start), first_due(end))
        for i, (phase, start, end) in enumerate(spans)
    ]


def read_status_kb(pid: int | None, name: str = "VmRSS") -> int | None:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM); None where there is none (process gone, no /proc)."""
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def server_pid(server: ServerProcess) -> int | None:
    """The uvicorn process's id (one worker: it serves the requests itself)."""
    return server.process.pid if server.process is not None else None


def mib(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def growth_pct(baseline: float | None, value: float | None) -> float | None:
    if baseline is None or value is None or baseline <= 0:
        return None
    return round((value - baseline) / baseline * 100, 2)


# ----- the soak ------------------------------------------------------------------------------------------
class Soak:
    """One open-loop schedule over ``plan``, a monitor sampling RSS and reporting windows beside it."""

    def __init__(self, server: ServerProcess, plan: Plan, args: argparse.Namespace) -> None:
        self.server = server
        self.plan = plan
        self.args = args
        self.windows = make_windows(args)
        self.firsts = [w.first for w in self.windows]
        self.n_requests = self.windows[-1].stop if self.windows else 0
        for w in self.windows:
            events = int(np.count_nonzero(plan.is_event[w.first : w.stop]))
            w.endpoints[EVENTS].requests = events
            w.endpoints[RECOMMEND].requests = w.stop - w.first - events
        self.acked: Counter = Counter()  # user id -> events answered with 200
        self.events_sent = 0
        self.event_errors = 0
        self.rss_start_kb: int | None = None
        self.baseline_kb: int | None = None
        self.peak_kb: int | None = None
        self.completed = False

    @property
    def pid(self) -> int | None:
        return server_pid(self.server)

    # The load generator's callback, in the event loop: a few dict updates per request.
    def on_done(self, outcome: Outcome) -> None:
        i = outcome.index
        window = self.windows[bisect.bisect_right(self.firsts, i) - 1]
        is_event = bool(self.plan.is_event[i])
        stats = window.endpoints[EVENTS if is_event else RECOMMEND]
        window.send_lag_ms.append(outcome.lag_s * 1e3)
        self.events_sent += is_event
        error, answer = outcome.parse()
        if error is not None:
            stats.errors[error] += 1
            self.event_errors += is_event
            return
        stats.ok += 1
        stats.latencies_ms.append(outcome.latency_ms)
        if is_event:
            self.acked[int(self.plan.user[i])] += 1
        elif answer.get("degraded"):
            stats.degraded += 1

    def request_at(self, i: int) -> bytes:
        user = int(self.plan.user[i])
        if self.plan.is_event[i]:
            return render_request(
                self.server.port, "/events", {"user_id": user, "item_id": int(self.plan.item[i])}
            )
        payload = {"user_id": user, "k": self.args.k, "exclude_seen": True}
        return render_request(self.server.port, "/recommend", payload)

    def sample_rss(self, window: Window | None) -> int | None:
        if not self.server.alive():
            raise ServerDied(f"the service exited during the soak; log:\n{self.server.log_tail()}")
        rss = read_status_kb(self.pid)
        if window is not None:
            window.rss_kb = rss
            window.client_rss_kb = read_status_kb(os.getpid())
        return rss

    def report(self, window: Window) -> None:
        record = window.finalize(self.baseline_kb)
        n_phase = sum(w.phase == window.phase for w in self.windows)
        n_before = sum(w.phase == window.phase for w in self.windows[: window.index])
        parts = []
        for name in ENDPOINTS:
            e = record["endpoints"][name]
            parts.append(
                f"/{name} p50 {_fmt(e['p50_ms'], 2)} p99 {_fmt(e['p99_ms'], 2)} max {_fmt(e['max_ms'], 1)}"
            )
        vs = record["server_rss_vs_baseline_pct"]
        rss_note = "" if window.phase == "warmup" or vs is None else f" ({vs:+.2f}% vs baseline)"
        log(
            f"{window.phase:6s} {n_before + 1:3d}/{n_phase} t={window.end_s:6.0f}s "
            f"{_fmt(record['achieved_rps'])} rps | {' | '.join(parts)} ms | errors {record['errors']}"
            f"{' ' + str(record['error_kinds']) if record['errors'] else ''} | degraded {record['degraded']}"
            f" | server RSS {_fmt(record['server_rss_mb'])} MB{rss_note}"
        )

    async def monitor(self, t0: float, schedule: asyncio.Task[Any]) -> None:
        """RSS at each window's end (and the warm-up's); a window's report once its requests are done."""
        grace = self.args.request_timeout + 0.25  # every request gives up this long after its due time
        events: list[tuple[float, int, Window]] = []  # (moment, 0 = sample RSS / 1 = report, window)
        for w in self.windows:
            events += [(w.end_s, 0, w), (w.end_s + grace, 1, w)]
        events.sort(key=lambda e: (e[0], e[1]))
        for moment, action, window in events:
            due = t0 + moment
            if not schedule.done() and due > time.perf_counter():
                await asyncio.wait({schedule}, timeout=due - time.perf_counter())
            if schedule.done() and not schedule.cancelled() and schedule.exception() is not None:
                return  # run() re-raises it
            if action == 1:  # early only when the schedule is over: then every request is done
                self.report(window)
                continue
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            self.sample_rss(window)
            if window.phase == "warmup" and self.windows[window.index + 1].phase == "soak":
                self.baseline_kb = window.rss_kb  # the instant the warm-up ends

    async def run(self) -> None:
        self.rss_start_kb = self.sample_rss(None)
        if self.args.warmup <= 0:
            self.baseline_kb = self.rss_start_kb
        t0 = time.perf_counter() + 0.2
        schedule = asyncio.create_task(
            open_loop(
                self.server.port,
                self.request_at,
                self.n_requests,
                self.args.rate,
                self.args.request_timeout,
                self.args.max_connections,
                self.on_done,
                t0,
            )
        )
        try:
            await self.monitor(t0, schedule)
            await schedule
        finally:
            if not schedule.done():
                schedule.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await schedule
        self.peak_kb = read_status_kb(self.pid, "VmHWM")
        self.completed = True


# ----- Redis audit ---------------------------------------------------------------------------------------
def stored_counts(client: Any, prefix: str, users: np.ndarray) -> np.ndarray:
    """The interaction count each user has in the feature store (0 for a user without keys)."""
    from service.feature_store import KeyLayout

    layout = KeyLayout(prefix)
    counts: list[int] = []
    for start in range(0, len(users), 1000):
        pipe = client.pipeline(transaction=False)
        for user in users[start : start + 1000]:
            pipe.hget(layout.user_key(int(user)), "count")
        counts += [int(value) if value is not None else 0 for value in pipe.execute()]
    return np.asarray(counts, dtype=np.int64)


def event_audit(
    soak: Soak, users: np.ndarray, before: np.ndarray, after: np.ndarray, fresh: np.ndarray
) -> dict[str, Any]:
    acked = np.asarray([soak.acked.get(int(u), 0) for u in users], dtype=np.int64)
    diff = after - (before + acked)
    is_fresh = np.isin(users, fresh)

    def part(mask: np.ndarray) -> dict[str, int]:
        return {
            "users": int(mask.sum()),
            "acknowledged": int(acked[mask].sum()),
            "stored": int((after - before)[mask].sum()),
            "lost": int(-diff[mask & (diff < 0)].sum()),
            "extra": int(diff[mask & (diff > 0)].sum()),
            "mismatched_users": int((mask & (diff != 0)).sum()),
        }

    fresh_part, known_part = part(is_fresh), part(~is_fresh)
    return {
        "fresh_users": fresh_part,
        "known_users": known_part,
        "lost": fresh_part["lost"] + known_part["lost"],
        "extra": fresh_part["extra"] + known_part["extra"],
        "fresh_users_by_group_at_end": fresh_groups(after[is_fresh]),
        "note": "stored = count in Redis after - before; lost = acknowledged but not stored; extra = stored "
        "without an acknowledgement (requests the client gave up on)",
    }


def fresh_groups(counts: np.ndarray) -> dict[str, int]:
    from model.evaluation.protocol import user_group

    return dict(Counter(user_group(int(c)) for c in counts))


@contextlib.contextmanager
def redis_client(url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


# ----- summary and output ---------------------------------------------------------------------------------
def summarize(soak: Soak, args: argparse.Namespace) -> dict[str, Any]:
    measured = [w for w in soak.windows if w.phase == "soak" and w.report is not None]
    reports = [w.report for w in measured]
    kinds: Counter = Counter()
    for r in reports:
        kinds.update(r["error_kinds"])
    endpoints = {}
    for name in ENDPOINTS:
        stats = latency_summary([x for w in measured for x in w.endpoints[name].latencies_ms])
        endpoints[name] = {
            "requests": sum(r["endpoints"][name]["requests"] for r in reports),
            "ok": sum(r["endpoints"][name]["ok"] for r in reports),
            "errors": sum(r["endpoints"][name]["errors"] for r in reports),
            **{key: stats[key] for key in ("p50_ms", "p99_ms", "max_ms")},
        }
    overall = latency_summary([x for w in measured for x in w.latencies_ms()])
    worst = max(reports, key=lambda r: r["p99_ms"] or 0.0, default=None)
    seconds = sum(w.end_s - w.start_s for w in measured)
    ok = sum(r["ok"] for r in reports)
    end_kb = measured[-1].rss_kb if measured else None
    soak_rss = [(w.end_s, w.rss_kb) for w in measured if w.rss_kb is not None]
    slope = None
    if len(soak_rss) >= 2:
        t, rss = np.asarray(soak_rss, dtype=np.float64).T
        slope = round(float(np.polyfit(t / 60.0, rss / 1024.0, 1)[0]), 3)
    growth = growth_pct(soak.baseline_kb, end_kb)
    achieved = ok / seconds if seconds > 0 else 0.0
    errors = sum(kinds.values())
    return {
        "complete": soak.completed and len(measured) == sum(w.phase == "soak" for w in soak.windows),
        "measured_seconds": round(seconds, 1),
        "requests": sum(r["requests"] for r in reports),
        "ok": ok,
        "achieved_rps": round(achieved, 1),
        "errors": errors,
        "error_kinds": dict(kinds),
        "degraded": sum(r["degraded"] for r in reports),
        "p50_ms": overall["p50_ms"],
        "p99_ms": overall["p99_ms"],
        "max_ms": overall["max_ms"],
        "worst_window_p99_ms": worst["p99_ms"] if worst else None,
        "worst_window": worst["window"] if worst else None,
        "endpoints": endpoints,
        "rss": {
            "baseline": "VmRSS sampled at the instant the warm-up ends"
            if args.warmup > 0
            else "VmRSS before any load (no warm-up)",
            "start_mb": mib(soak.rss_start_kb),
            "baseline_mb": mib(soak.baseline_kb),
            "end_mb": mib(end_kb),
            "growth_pct": growth,
            "slope_mb_per_min": slope,
            "peak_mb": mib(soak.peak_kb),
            "client_end_mb": mib(measured[-1].client_rss_kb) if measured else None,
        },
        "events": {
            "sent": soak.events_sent,
            "acknowledged": sum(soak.acked.values()),
            "not_acknowledged": soak.event_errors,
            "fresh_users": len(soak.plan.fresh_users),
        },
    }


def judge(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """Pass/fail per target; None for one that could not be checked (no RSS, no audit), which fails."""
    audit, growth = summary.get("event_audit"), summary["rss"]["growth_pct"]
    checks = {
        "zero_errors": summary["errors"] == 0,
        "rss_growth_below_target": None if growth is None else growth < args.max_rss_growth_pct,
        "no_lost_events": None if audit is None else audit["lost"] == 0,
        "rate_held": summary["achieved_rps"] >= args.min_achieved * args.rate,
        "complete": summary["complete"],
    }
    summary["targets"] = {
        "errors": 0,
        "rss_growth_pct_below": args.max_rss_growth_pct,
        "lost_events": 0,
        "achieved_rps_at_least": round(args.min_achieved * args.rate, 1),
    }
    summary["checks"] = checks
    summary["passed"] = all(ok is True for ok in checks.values())


def markdown(result: dict[str, Any]) -> str:
    head = (
        "| window | phase | end s | requests | achieved rps | p99 ms | /recommend p50 / p99 / max ms "
        "| /events p50 / p99 / max ms | errors | degraded | server RSS MB | RSS vs baseline |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in result["windows"]:
        cells = [
            " / ".join(_fmt(r["endpoints"][name][key], 2) for key in ("p50_ms", "p99_ms", "max_ms"))
            for name in ENDPOINTS
        ]
        vs = r["server_rss_vs_baseline_pct"]
        lines.append(
            f"| {r['window']} | {r['phase']} | {_fmt(r['end_s'], 0)} | {r['requests']} "
            f"| {_fmt(r['achieved_rps'])} | {_fmt(r['p99_ms'], 2)} | {cells[0]} | {cells[1]} "
            f"| {r['errors']} | {r['degraded']} | {_fmt(r['server_rss_mb'])} "
            f"| {'–' if r['phase'] == 'warmup' or vs is None else f'{vs:+.2f}%'} |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(summary_lines(result["summary"], result["config"]))


def summary_lines(s: dict[str, Any], config: dict[str, Any]) -> list[str]:
    if not s:
        return ["- no measured window"]
    rss, events, audit = s["rss"], s["events"], s.get("event_audit")
    p99 = {name: s["endpoints"][name]["p99_ms"] for name in ENDPOINTS}
    lines = [
        f"- {s['requests']} requests over {s['measured_seconds']:g} s after a {config['warmup']:g} s warm-up "
        f"at {config['rate']:g} rps target: achieved {s['achieved_rps']} rps, errors {s['errors']}"
        f"{' ' + str(s['error_kinds']) if s['errors'] else ''}, degraded {s['degraded']}",
        f"- p99 {_fmt(s['p99_ms'], 2)} ms overall (/recommend {_fmt(p99[RECOMMEND], 2)}, /events "
        f"{_fmt(p99[EVENTS], 2)}); worst window p99 {_fmt(s['worst_window_p99_ms'], 2)} ms "
        f"(window {s['worst_window']})",
        f"- server RSS: {_fmt(rss['start_mb'])} MB before load, baseline {_fmt(rss['baseline_mb'])} MB "
        f"({rss['baseline']}), end {_fmt(rss['end_mb'])} MB: growth {_fmt(rss['growth_pct'], 2)} %, "
        f"slope {_fmt(rss['slope_mb_per_min'], 3)} MB/min, peak {_fmt(rss['peak_mb'])} MB",
        f"- events: {events['acknowledged']} acknowledged of {events['sent']} sent",
    ]
    if audit:
        fresh = audit["fresh_users"]
        lines[-1] += (
            f"; Redis audit: {audit['lost']} lost, {audit['extra']} extra (fresh users: {fresh['stored']} "
            f"stored / {fresh['acknowledged']} acknowledged over {fresh['users']} users, groups at end "
            f"{audit['fresh_users_by_group_at_end']}; known users: {audit['known_users']['stored']} / "
            f"{audit['known_users']['acknowledged']})"
        )
    else:
        lines[-1] += "; no Redis audit (the soak did not finish)"
    if "checks" in s:
        marks = {True: "✓", False: "✗", None: "not checked"}
        verdict = ", ".join(f"{name} {marks[ok]}" for name, ok in s["checks"].items())
        lines.append(f"- {'PASS' if s['passed'] else 'FAIL'}: {verdict}")
    return lines


def write_results(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)


# ----- main ------------------------------------------------------------------------------------------------
def run_soak(args: argparse.Namespace, holder: dict[str, Any]) -> None:
    """Set-up, the soak, the audit; fills ``holder`` (soak, audit, service) as it goes, for main's report."""
    from model.artifacts import ArtifactError, load_artifacts
    from model.data.loading import load_dataset
    from model.data.schema import DataFormatError

    try:
        artifacts = load_artifacts(args.artifacts)
        manifest = index_manifest_of(artifacts.directory)
        log(f"loading data {args.data}")
        data = load_dataset(args.data)
    except (ArtifactError, DataFormatError) as error:
        raise BenchError(
            f"{error}\n  make artifacts with `coldwarm run --data {args.data}` and pass --artifacts DIR"
        ) from error
    known = np.union1d(data.users["user_id"].to_numpy(np.int64), data.interactions["user_id"].to_numpy())
    item_ids = np.asarray(artifacts.items.item_ids, dtype=np.int64)
    cap = artifacts.encoder.config.max_history
    holder["service"] = {
        "model_version": artifacts.version,
        "index_version": manifest.get("index_version"),
        "index_type": manifest.get("type"),
        "n_items": int(manifest["n_items"]),
        "known_users": len(known),
    }
    directory = artifacts.directory
    del artifacts  # the client needs none of the model
    gc.collect()
    with users_in_redis(args, data, cap) as prefix:
        del data
        env = serving_env(directory, prefix, str(manifest["type"]), dict(manifest.get("params", {})), args)
        holder["service"]["server_env"] = {
            k: v for k, v in env.items() if k.startswith("COLDWARM_") and "TOKEN" not in k
        }
        log("starting the service")
        started = time.perf_counter()
        with ServerProcess(env, REPO) as server, redis_client(args.redis_url) as client:
            ready_s = time.perf_counter() - started
            log(f"  ready on {server.url} after {ready_s:.1f}s (pid {server_pid(server)})")
            plan = make_plan(make_windows(args)[-1].stop, known, item_ids, args)
            soak = Soak(server, plan, args)
            holder["soak"] = soak
            audited = np.unique(plan.user[plan.is_event])
            before = stored_counts(client, prefix, audited)
            ends = time.localtime(time.time() + args.warmup + args.duration)
            log(
                f"soak: {args.rate:g} rps ({args.events_fraction:.0%} /events) for {args.warmup:g} s "
                f"warm-up + {args.duration:g} s, {soak.n_requests} requests, a line every {args.window:g} s; "
                f"ends about {time.strftime('%H:%M:%S', ends)}"
            )
            run_async(soak.run(), use_uvloop=not args.no_uvloop)
            if soak.event_errors:  # a request the client gave up on may still be in the server
                time.sleep(args.request_timeout)
            after = stored_counts(client, prefix, audited)
            holder["audit"] = event_audit(soak, audited, before, after, plan.fresh_users)
            log(
                f"event audit: {holder['audit']['lost']} lost, {holder['audit']['extra']} extra over "
                f"{len(audited)} users"
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fresh_users < 1 or args.warmup < 0 or args.k < 1 or args.max_connections < 1:
        build_parser().error("--fresh-users, --k and --max-connections must be >= 1, --warmup >= 0")
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    machine = machine_info()  # before the load: its load average says whether the machine was quiet
    holder: dict[str, Any] = {}
    status = 0
    try:
        run_soak(args, holder)
    except BenchError as error:
        log(f"error: {error}")
        status = 2
    except ServerDied as error:
        log(f"error: {error}")
        status = 1
    except (KeyboardInterrupt, SystemExit):
        log("interrupted: writing what was measured so far")
        status = 130
    finally:
        soak: Soak | None = holder.get("soak")
        if soak is not None:
            summary = summarize(soak, args)
            summary["event_audit"] = holder.get("audit")
            summary["service"] = holder.get("service")
            judge(summary, args)
            result = {
                "machine": machine,
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "windows": [w.report for w in soak.windows if w.report is not None],
                "summary": summary,
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
            write_results(args.out, result)
            log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
            if status == 0 and not summary["passed"]:
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
