"""A Redis Cluster master killed under load: what the service answers, how long writes fail, and how many
acknowledged events survive, without and with WAIT (COLDWARM_REDIS_WAIT_REPLICAS=1).

For each setting: a private cluster (three masters, three replicas, ``cluster-node-timeout`` 1 s:
tests/redis_cluster.py), ``coldwarm serve`` on it (the artifacts given, COLDWARM_REDIS_CLUSTER=true),
and an open-loop client at ``--rate`` requests/s, half ``POST /events`` (each with its own event id,
users drawn from ``--users``) and half ``POST /recommend``. ``--kill-at`` seconds in, one master is
SIGKILLed. After the load, every acknowledged event (answered 200) is looked for in its user's stored
event ids. Recorded: acknowledged, stored, lost, write_recovery_s (kill → the last failed write),
write_503 (writes refused meanwhile), errors_5xx (any other 5xx, and any 5xx of a read: reads must
degrade instead), degraded reads.

Run: python bench/redis_failover.py [--artifacts artifacts] [--rate 100] [--seconds 30]
Writes bench/results/redis_failover.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from redis_cluster import Cluster, running_cluster  # noqa: E402

from service.feature_store.keys import KeyLayout  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@dataclass
class Outcomes:
    acknowledged: dict[str, int] = field(default_factory=dict)  # event id -> user
    write_failures: list[float] = field(default_factory=list)  # seconds since the kill
    write_503: int = 0
    errors_5xx: int = 0
    read_5xx: int = 0
    degraded_reads: int = 0
    reads: int = 0
    writes: int = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(
    cluster: Cluster, artifacts: Path, prefix: str, wait: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "COLDWARM_ARTIFACTS_DIR": str(artifacts.resolve()),
        "COLDWARM_REDIS_URL": cluster.url,
        "COLDWARM_REDIS_CLUSTER": "true",
        "COLDWARM_KEY_PREFIX": prefix,
        "COLDWARM_REDIS_WAIT_REPLICAS": str(wait),
        "COLDWARM_REDIS_WAIT_TIMEOUT_MS": "50",
        # Users exist only through this run's events: a fresh prefix, empty on purpose (no load marker).
        "COLDWARM_REQUIRE_FEATURE_MARKER": "false",
    }
    command = [sys.executable, "-m", "coldwarm", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the service did not become ready")
        time.sleep(0.25)


async def load(url: str, cluster: Cluster, args: argparse.Namespace, item_ids: list[int]) -> Outcomes:
    outcomes = Outcomes()
    rng = random.Random(args.seed)
    killed_at: float | None = None
    started = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()

    async def event(client: httpx.AsyncClient, seq: int) -> None:
        user = rng.randrange(1, args.users + 1)
        event_id = f"e{seq}"
        body = {"user_id": user, "item_id": rng.choice(item_ids), "event_id": event_id}
        outcomes.writes += 1
        try:
            response = await client.post(f"{url}/events", json=body)
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        if status == 200:
            outcomes.acknowledged[event_id] = user
            return
        if killed_at is not None:
            outcomes.write_failures.append(time.perf_counter() - killed_at)
        outcomes.write_503 += status == 503
        outcomes.errors_5xx += status >= 500 and status != 503

    async def read(client: httpx.AsyncClient) -> None:
        outcomes.reads += 1
        try:
            response = await client.post(
                f"{url}/recommend", json={"user_id": rng.randrange(1, args.users + 1), "k": 20}
            )
        except httpx.HTTPError:
            outcomes.read_5xx += 1
            return
        if response.status_code >= 500:
            outcomes.read_5xx += 1
            outcomes.errors_5xx += 1
        elif response.status_code == 200 and response.json()["degraded"]:
            outcomes.degraded_reads += 1

    async with httpx.AsyncClient(timeout=5.0, limits=httpx.Limits(max_connections=64)) as client:
        n = int(args.rate * args.seconds)
        for seq in range(n):
            due = started + seq / args.rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if killed_at is None and time.perf_counter() - started >= args.kill_at:
                cluster.kill(cluster.masters()[0])
                killed_at = time.perf_counter()
            task = asyncio.create_task(event(client, seq) if seq % 2 == 0 else read(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return outcomes


def stored_event_ids(cluster: Cluster, layout: KeyLayout, users: set[int]) -> dict[int, set[str]]:
    client = cluster.client()
    stored = {}
    for user in users:
        raw = client.hget(layout.user_key(user), "event_ids") or b""
        stored[user] = set(raw.decode().split())
    client.close()
    return stored


def run(args: argparse.Namespace, wait: int, item_ids: list[int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory, running_cluster(Path(directory)) as cluster:
        prefix = f"failover{wait}"
        process, url = start_service(cluster, args.artifacts, prefix, wait)
        try:
            outcomes = asyncio.run(load(url, cluster, args, item_ids))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not cluster.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)
        by_user: dict[int, list[str]] = {}
        for event_id, user in outcomes.acknowledged.items():
            by_user.setdefault(user, []).append(event_id)
        stored = stored_event_ids(cluster, KeyLayout(prefix=prefix), set(by_user))
        # The store keeps a user's last 8 event ids: users with more acknowledged events than that are
        # left out of the count rather than guessed at.
        checked = {u: ids for u, ids in by_user.items() if len(ids) <= 8}
        acknowledged = sum(len(ids) for ids in checked.values())
        found = sum(len(set(ids) & stored[u]) for u, ids in checked.items())
    return {
        "wait_replicas": wait,
        "requests": outcomes.reads + outcomes.writes,
        "acknowledged": acknowledged,
        "stored": found,
        "lost": acknowledged - found,
        "write_recovery_s": round(max(outcomes.write_failures), 2) if outcomes.write_failures else 0.0,
        "write_503": outcomes.write_503,
        "errors_5xx": outcomes.errors_5xx,
        "read_5xx": outcomes.read_5xx,
        "degraded_reads": outcomes.degraded_reads,
        "reads": outcomes.reads,
        "users_left_out": len(by_user) - len(checked),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--kill-at", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "redis_failover")
    args = parser.parse_args()
    from model.artifacts import load_artifacts

    item_ids = [int(i) for i in load_artifacts(args.artifacts).items.item_ids[:500]]
    rows = [run(args, wait, item_ids) for wait in (0, 1)]
    columns = list(rows[0])
    lines = [
        f"A master of a 3+3 Redis Cluster (cluster-node-timeout 1 s) SIGKILLed {args.kill_at:.0f} s into "
        f"{args.seconds:.0f} s of {args.rate:.0f} requests/s (half /events, half /recommend), one "
        "`coldwarm serve` worker.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows),
        "",
        "Command: `python bench/redis_failover.py`",
        "",
    ]
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"config": vars(args) | {"artifacts": str(args.artifacts), "out": str(args.out)}, "runs": rows},
            indent=2,
        )
        + "\n"
    )
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
