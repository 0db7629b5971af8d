"""bench/_serve_common.py's CPU reading of a server with several workers: the supervisor's own
/proc figures miss its workers' time, which ``ProcessTree`` sums in."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package
from _serve_common import ProcessTree, descendants, process_cpu_seconds  # noqa: E402

BURN_S = 0.5
# A parent that idles while its child burns BURN_S of CPU, then prints the child's pid and waits.
PARENT = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import time
start = time.process_time()
while time.process_time() - start < {BURN_S}:
    pass
time.sleep(60)
'''])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_process_tree_counts_the_cpu_time_of_the_processes_below_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while (process_cpu_seconds(child) or 0.0) < BURN_S * 0.9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(descendants(parent.pid)) == {parent.pid, child}
        alone = process_cpu_seconds(parent.pid)
        tree = process_cpu_seconds(ProcessTree(parent.pid))
        loops = process_cpu_seconds(ProcessTree(parent.pid, main_threads=True))
        assert alone is not None and tree is not None and loops is not None
        assert tree >= alone + BURN_S * 0.9
        # The burning child is single-threaded: its main thread is all of its time.
        assert loops >= BURN_S * 0.9
    finally:
        for pid in descendants(parent.pid)[1:]:
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()


def test_an_unreadable_process_reads_as_none() -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert process_cpu_seconds(finished.pid) is None
    assert process_cpu_seconds(ProcessTree(finished.pid)) is None
