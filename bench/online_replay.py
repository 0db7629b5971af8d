"""Served quality against offline quality: the protocol's test points replayed through the HTTP API.

    python bench/online_replay.py --artifacts artifacts                  # MovieLens users 1-2,999
    python bench/online_replay.py --artifacts A --limit-users 30         # a quick look
    python bench/online_replay.py --artifacts A --url http://127.0.0.1:8000   # a service already running

The evaluation protocol (shared/DESIGN.md) scores each test user after their first h interactions
straight from the data; the service only knows what its API was told. This benchmark replays every
protocol point (``split_users(data).test``, ``build_eval_points``) the way a client would: a fresh user
id per point, the profile, the h history interactions as ``POST /events`` with their own timestamps,
then ``POST /recommend`` (k=100, the whole history excluded) in two modes:

- ``data_time``: ``request_time`` = the point's request time, the "now" the offline evaluation uses;
- ``wall_clock``: no ``request_time``, so "now" is the service's clock, as for live traffic (for old
  data, every user then looks like one returning after years).

In the same run the same artifacts are evaluated offline on the same points (``ArtifactsRanker`` +
``evaluate``), and the served answers are scored with the protocol's own ``compute_metrics`` /
``summarise``. Data-time figures must equal the offline ones (up to float ties); the wall-clock
figures say what a live user with the same history gets.

Unless ``--url`` is given, the service runs as a real uvicorn subprocess (the app of ``coldwarm
serve``: ``create_app`` with ``COLDWARM_*`` settings) on a free 127.0.0.1 port, with the real Redis
under a key prefix of its own (deleted afterwards) and load shedding out of reach. Writes
``<out>.json`` and a markdown summary ``<out>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve_common import (
    BenchError,
    ServerProcess,
    connect_redis,
    delete_keys,
    machine_info,
    training_data_warning,
)  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-1m-first2999"
DEFAULT_OUT = REPO / "bench" / "results" / "online_replay"
HEADLINE = ("recall@50", "ndcg@50")
GROUPS = ("cold_start", "warm_up", "active", "all")
# Load shedding would hand out the cold-start answer instead of the model's: out of reach here.
MAX_QUEUE_MS = 600_000
# A replay measures quality, not latency: a slow Redis call must not turn into a degraded answer.
REDIS_TIMEOUT_MS = 2000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="artifacts root or version dir")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the data the artifacts were trained on")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for the service started here")
    p.add_argument("--url", default=None, help="replay against this running service instead of starting one")
    p.add_argument("--concurrency", type=int, default=4, help="points replayed at once")
    p.add_argument("--k", type=int, default=100, help="items asked per /recommend (>= 100 for the metrics)")
    p.add_argument("--limit-users", type=int, default=None, help="only the first N test users (quick runs)")
    p.add_argument(
        "--base-user-id",
        type=int,
        default=None,
        help="first replay user id (one per point); default 10^12 for a service started here, a random "
        "one with --url so that a second run against the same store does not meet the first's users",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="for the offline evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes <out>.json and <out>.md")
    return p


# ----- inputs -----------------------------------------------------------------------------------------
def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[Any], np.ndarray]:
    """(artifacts, data, the protocol's test points, the protocol's catalog)."""
    from model.artifacts import ArtifactError, load_artifacts
    from model.data.loading import load_dataset
    from model.data.split import split_users
    from model.evaluation.protocol import build_eval_points

    try:
        artifacts = load_artifacts(args.artifacts)
    except ArtifactError as error:
        raise BenchError(f"{error}\n  make artifacts with `coldwarm run --data {args.data}`") from error
    log(f"artifacts {artifacts.directory} (model {artifacts.version}, {artifacts.manifest.get('dataset')})")
    log(f"loading data {args.data}")
    data = load_dataset(args.data)
    warning = training_data_warning(
        artifacts.manifest, data, "offline and served figures still compare, but neither means much"
    )
    if warning:
        log(warning)
    test_users = split_users(data).test
    if args.limit_users is not None:
        test_users = test_users[: args.limit_users]
    points = build_eval_points(data, test_users)
    log(f"{len(test_users)} test users, {len(points)} points, {sum(p.h for p in points)} events to replay")
    return artifacts, data, points, data.catalog_item_ids()


# ----- offline ----------------------------------------------------------------------------------------
def offline_figures(
    artifacts: Any, data: Any, points: list[Any], catalog: np.ndarray, progress: bool
) -> tuple[Any, Any, np.ndarray]:
    """(ranker, the protocol's evaluation of the exported artifacts, their gate weights) on the points."""
    from model.evaluation.protocol import evaluate
    from model.ranker import ArtifactsRanker

    started = time.perf_counter()
    ranker = ArtifactsRanker("offline", artifacts, data.users, catalog)
    result = evaluate(ranker, points, catalog, progress=progress)
    gates = ranker.gates(points)
    log(f"offline evaluation in {time.perf_counter() - started:.1f}s")
    return ranker, result, gates


def agreement(
    ranker: Any, points: list[Any], catalog: np.ndarray, replayed: Any, batch_size: int = 256
) -> dict[str, dict[str, Any]]:
    """Per mode: how many served top-k lists are the offline top-k exactly, and how far the served
    scores are from the offline scores of the same items. Equal metrics could hide compensating
    differences; these cannot, and they say whether a gap comes from scoring or from ranking."""
    from model.evaluation.metrics import EMPTY_SLOT
    from model.evaluation.protocol import exclude_history, top_k

    k = replayed.k
    identical = dict.fromkeys(replayed.modes, 0)
    score_gap: dict[str, list[float]] = {mode: [] for mode in replayed.modes}
    for start in range(0, len(points), batch_size):
        batch = points[start : start + batch_size]
        scores = np.array(ranker.score(batch), dtype=np.float64)
        exclude_history(scores, batch, catalog)
        offline_ranked = top_k(scores, k)
        for mode, ranking in replayed.modes.items():
            served = ranking.ranked[start : start + batch_size]
            identical[mode] += int((served == offline_ranked).all(axis=1).sum())
            valid = served != EMPTY_SLOT
            offline_scores = np.take_along_axis(scores, np.where(valid, served, 0), axis=1)
            gaps = np.abs(ranking.scores[start : start + batch_size] - offline_scores)
            score_gap[mode].extend(np.where(valid, gaps, 0.0).max(axis=1, initial=0.0).tolist())
    out = {}
    for mode in replayed.modes:
        gaps = np.asarray(score_gap[mode])
        out[mode] = {
            "identical_top_k": identical[mode],
            "points": len(points),
            "k": k,
            "max_abs_score_diff": round(float(gaps.max(initial=0.0)), 6),
            "median_abs_score_diff": round(float(np.median(gaps)), 6) if len(gaps) else None,
        }
        log(
            f"  {mode}: {identical[mode]} of {len(points)} top-{k} lists identical to offline, "
            f"score difference max {out[mode]['max_abs_score_diff']:.2e}"
        )
    return out


# ----- served -----------------------------------------------------------------------------------------
def server_env(artifacts_dir: Path, prefix: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        COLDWARM_ARTIFACTS_DIR=str(Path(artifacts_dir).resolve()),
        COLDWARM_REDIS_URL=redis_url,
        COLDWARM_KEY_PREFIX=prefix,
        COLDWARM_MAX_QUEUE_MS=str(MAX_QUEUE_MS),
        COLDWARM_REDIS_TIMEOUT_MS=str(REDIS_TIMEOUT_MS),
        # The replay writes every user through the API into a fresh prefix: empty on purpose, not a
        # store that lost its load (no load marker needed).
        COLDWARM_REQUIRE_FEATURE_MARKER="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("COLDWARM_ADMIN_TOKEN", None)  # no admin endpoint in a benchmark
    return env


def replay(url: str, artifacts: Any, data: Any, points: list[Any], catalog: np.ndarray, args: Any) -> Any:
    import httpx

    from service.replay import MODES, ReplayError, replay_points

    log(f"replaying {len(points)} points against {url} ({args.concurrency} at a time, k={args.k})")
    try:
        result = asyncio.run(
            replay_points(
                url,
                points,
                data,
                catalog,
                modes=MODES,
                k=args.k,
                base_user_id=args.base_user_id,
                concurrency=args.concurrency,
                expected_model_version=artifacts.version,
                progress=not args.no_progress,
            )
        )
    except (ReplayError, httpx.HTTPError) as error:
        raise BenchError(f"replay against {url} failed: {type(error).__name__}: {error}") from error
    requests = sum(result.requests.values())
    log(f"replayed in {result.seconds:.1f}s: {requests} requests ({requests / result.seconds:.0f}/s)")
    return result


def served_by_own_server(
    artifacts: Any, data: Any, points: list[Any], catalog: np.ndarray, args: Any
) -> tuple[Any, dict[str, str]]:
    """Starts the service over the artifacts with its own Redis key prefix, replays, cleans up."""

    from service.feature_store import KeyLayout

    client = connect_redis(args.redis_url)
    layout = KeyLayout(f"coldwarm-replay-{uuid.uuid4().hex[:12]}")
    env = server_env(artifacts.directory, layout.prefix, args.redis_url)
    try:
        with contextlib.ExitStack() as stack:
            log(f"starting the service (key prefix {layout.prefix})")
            started = time.perf_counter()
            try:
                server = stack.enter_context(ServerProcess(env, REPO))
            except RuntimeError as error:  # it did not become ready; the error holds its log
                raise BenchError(str(error)) from error
            log(f"  ready on {server.url} after {time.perf_counter() - started:.1f}s")
            result = replay(server.url, artifacts, data, points, catalog, args)
    finally:
        deleted = delete_keys(client, layout.pattern())
        client.close()
        log(f"deleted {deleted} Redis keys under {layout.prefix}")
    return result, {k: v for k, v in env.items() if k.startswith("COLDWARM_") and "TOKEN" not in k}


# ----- figures ----------------------------------------------------------------------------------------
def rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {m: round(float(v), 6) for m, v in metrics.items()}


def by_key(table: dict[Any, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Group (or h) -> rounded metrics, keys as strings for JSON."""
    return {str(key): rounded(metrics) for key, metrics in table.items()}


def differences(offline: Any, served: dict[str, Any], metric: str = "recall@50") -> dict[str, Any]:
    """served - offline of one metric per mode and group; relative to offline (None where it is 0)."""
    out: dict[str, Any] = {}
    for mode, result in served.items():
        out[mode] = {}
        for group, values in offline.groups.items():
            base, value = values[metric], result.groups[group][metric]
            out[mode][group] = {
                "metric": metric,
                "absolute": round(value - base, 6),
                "relative": round(value / base - 1, 6) if base else None,
            }
    return out


def report(
    args: argparse.Namespace,
    argv: list[str],
    artifacts: Any,
    points: list[Any],
    catalog: np.ndarray,
    offline: Any,
    offline_gates: np.ndarray,
    replayed: Any,
    agreed: dict[str, dict[str, Any]],
    server_settings: dict[str, str] | None,
) -> dict[str, Any]:
    from model.evaluation.protocol import evaluate_rankings, gate_cold_means
    from service.replay import DATA_TIME, WALL_CLOCK

    served = {
        mode: evaluate_rankings(f"served_{mode}", points, ranking.ranked, catalog)
        for mode, ranking in replayed.modes.items()
    }
    gates = {"offline": gate_cold_means(points, offline_gates)}
    for mode, ranking in replayed.modes.items():
        gates[f"served_{mode}"] = gate_cold_means(points, ranking.gates)
    index_versions = sorted({v for r in replayed.modes.values() for v in r.index_versions})
    return {
        "artifacts": {
            "directory": str(artifacts.directory),
            "model_version": artifacts.version,
            "dataset": artifacts.manifest.get("dataset"),
            "model_name": artifacts.manifest.get("model_name"),
            "index_versions": index_versions,
        },
        "data": str(args.data),
        "points": {g: int(n) for g, n in offline.points.items()},
        "offline": by_key(offline.groups),
        "served_data_time": by_key(served[DATA_TIME].groups),
        "served_wall_clock": by_key(served[WALL_CLOCK].groups),
        "gate_cold_mean": {source: {g: round(v, 6) for g, v in ms.items()} for source, ms in gates.items()},
        "differences": differences(offline, served),
        # Served answers against the offline top-k and scores of the same points, point by point.
        "agreement": agreed,
        "degraded": {
            mode: {"answers": r.degraded, "reasons": r.degraded_reasons} for mode, r in replayed.modes.items()
        },
        # A non-200 answer stops the replay with its body (ReplayError): a finished run had none.
        "non_200": 0,
        # Per h (the cold-start curve): where served and offline part, if they do.
        "curves": {
            "offline": by_key(offline.curve),
            **{f"served_{mode}": by_key(result.curve) for mode, result in served.items()},
        },
        "replay": {
            "url": args.url or "started here",
            "server_settings": server_settings,
            "base_user_id": replayed.base_user_id,
            "k": replayed.k,
            "concurrency": args.concurrency,
            "requests": replayed.requests,
            "seconds": round(replayed.seconds, 1),
            "limit_users": args.limit_users,
        },
        "command": command_line(argv),
    }


def command_line(argv: list[str]) -> str:
    return shlex.join(["python", "bench/online_replay.py", *argv])


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """One table per group: offline / served data time / served wall clock."""
    art = result["artifacts"]
    lines = [
        f"# Online replay: {art['model_version']} ({art['dataset']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Artifacts `{art['directory']}`, index {', '.join(art['index_versions']) or '–'}; data "
        f"`{result['data']}`; replay of {result['replay']['requests'].get('POST /recommend', 0)} /recommend "
        f"calls in {result['replay']['seconds']}s; degraded answers: "
        + ", ".join(f"{mode} {d['answers']}" for mode, d in result["degraded"].items())
        + "; non-200: 0.",
        "",
        f"Served top-{result['replay']['k']} lists identical to the offline ones: "
        + ", ".join(
            f"{mode} {a['identical_top_k']} / {a['points']} "
            f"(max score difference {a['max_abs_score_diff']:.1e})"
            for mode, a in result["agreement"].items()
        )
        + ".",
        "",
    ]
    sources = (
        ("offline", "offline", None),
        ("served, data time", "served_data_time", "data_time"),
        ("served, wall clock", "served_wall_clock", "wall_clock"),
    )
    for group in GROUPS:
        if group not in result["offline"]:
            continue
        lines += [
            f"## {group} ({result['points'][group]} points)",
            "",
            "| source | Recall@50 | NDCG@50 | mean gate cold weight | Δ Recall@50 vs offline |",
            "|---|---|---|---|---|",
        ]
        for label, key, mode in sources:
            values = result[key][group]
            gate = result["gate_cold_mean"][key].get(group)
            if mode is None:
                delta = "–"
            else:
                diff = result["differences"][mode][group]
                relative = "" if diff["relative"] is None else f" ({diff['relative']:+.1%})"
                delta = f"{diff['absolute']:+.4f}{relative}"
            lines.append(
                f"| {label} | {_fmt(values['recall@50'])} | {_fmt(values['ndcg@50'])} | {_fmt(gate, 3)} "
                f"| {delta} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_results(out: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    md_path.write_text(text + "\n")
    print()
    print(text)
    return json_path, md_path


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that every finally (server, Redis keys) runs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.k < 100:
        build_parser().error("--k must be at least 100: the protocol's metrics go to K = 100")
    if args.concurrency < 1:
        build_parser().error("--concurrency must be at least 1")
    if args.base_user_id is None:
        args.base_user_id = random.randrange(10**12, 2**62) if args.url else 10**12
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    machine = machine_info()
    try:
        import torch

        torch.set_num_threads(args.torch_threads)
        artifacts, data, points, catalog = load_inputs(args)
        if not points:
            raise BenchError("no evaluation points (too few test users with enough interactions)")
        ranker, offline, offline_gates = offline_figures(
            artifacts, data, points, catalog, not args.no_progress
        )
        if args.url:
            replayed, server_settings = replay(args.url, artifacts, data, points, catalog, args), None
        else:
            replayed, server_settings = served_by_own_server(artifacts, data, points, catalog, args)
        agreed = agreement(ranker, points, catalog, replayed)
        result = report(
            args, argv, artifacts, points, catalog, offline, offline_gates, replayed, agreed, server_settings
        )
    except BenchError as error:
        log(f"error: {error}")
        return 2
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine
    json_path, md_path = write_results(args.out, result)
    log(f"wrote {json_path} and {md_path} ({result['wall_seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
