"""Memory of ``coldwarm serve --workers N``: resident and proportional set size of each worker, and how
much of it is the memory-mapped index shared between them.

Starts the service with N workers (and, for comparison, with the index read into each worker's memory,
COLDWARM_INDEX_MMAP=false) on the given artifacts and the real Redis, waits until every worker answers,
and reads /proc/<pid>/smaps_rollup of each worker: Rss, Pss (shared pages split among the processes
sharing them), anonymous and file-backed memory.

Run: python bench/worker_memory.py [--artifacts artifacts] [--workers 2]
Writes bench/results/worker_memory.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _serve_common import child_pids, free_port  # bench/ is not a package: run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIELDS = ("Rss", "Pss", "Anonymous", "Pss_File", "Shared_Clean")


def workers_of(pid: int) -> list[int]:
    """uvicorn's worker processes below ``pid`` (multiprocessing children, not its helpers)."""
    return [
        child for child in child_pids(pid) if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def rollup(pid: int) -> dict[str, float]:
    """MiB of each FIELDS entry of /proc/<pid>/smaps_rollup."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            out[name] = round(int(rest.split()[0]) / 1024, 1)
    return out


def measure(artifacts: Path, workers: int, mmap: bool, redis_url: str) -> dict[str, Any]:
    port = free_port()
    env = {
        **os.environ,
        "COLDWARM_ARTIFACTS_DIR": str(artifacts.resolve()),
        "COLDWARM_REDIS_URL": redis_url,
        "COLDWARM_KEY_PREFIX": "worker-memory",
        "COLDWARM_INDEX_MMAP": "true" if mmap else "false",
    }
    command = [sys.executable, "-m", "coldwarm", "serve", "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            pids = workers_of(process.pid)
            ready = 0
            if len(pids) == workers:
                for _ in range(4 * workers):
                    with contextlib.suppress(httpx.TransportError):
                        ready += httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            if ready == 4 * workers:
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the workers did not become ready")
            time.sleep(0.5)
        for user in range(1, 200):  # touch the model and the index in every worker
            httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": user, "k": 50}, timeout=10)
        per_worker = [rollup(pid) for pid in workers_of(process.pid)]
        return {"workers": workers, "mmap": mmap, "per_worker_mib": per_worker}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=RESULTS / "worker_memory")
    args = parser.parse_args()
    runs = [measure(args.artifacts, args.workers, mmap, args.redis_url) for mmap in (True, False)]
    lines = [
        f"`coldwarm serve --workers {args.workers}` on {args.artifacts}, MiB per worker after 200 requests "
        "(/proc/<pid>/smaps_rollup):",
        "",
        "| index | worker | " + " | ".join(FIELDS) + " |",
        "|---|---|" + "---|" * len(FIELDS),
    ]
    for run in runs:
        for number, worker in enumerate(run["per_worker_mib"], 1):
            cells = " | ".join(str(worker.get(f, "")) for f in FIELDS)
            lines.append(f"| {'memory-mapped' if run['mmap'] else 'read'} | {number} | {cells} |")
    lines += ["", "Command: `python bench/worker_memory.py`", ""]
    args.out.with_suffix(".json").write_text(
        json.dumps({"artifacts": str(args.artifacts), "runs": runs}, indent=2) + "\n"
    )
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
