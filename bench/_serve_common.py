"""Helpers of ``bench/serve_latency.py`` and ``bench/soak.py``: an open-loop HTTP load generator, the
service as a real uvicorn subprocess, Redis key cleanup, latency statistics and the machine description.

The load generator is a small HTTP/1.1 client on raw asyncio streams (keep-alive connections from a
pool, no pipelining): httpx costs about a millisecond of CPU per request, which on a 2-core machine
would be taken from the server under test. Requests are sent on a schedule fixed in advance whatever
the server does, and every latency is measured from the request's *scheduled* send time, so queueing in
the client (no free connection, a late event loop) and in the server counts: no coordinated omission.

Arrivals (``arrival_offsets``): ``poisson`` (the default of ``run_phase``) makes the gaps between due
times independent exponentials of mean 1 / rate, drawn from a ``numpy.random.Generator`` of a given
seed, so request i is due at t0 + gap_1 + ... + gap_i: bursts and lulls as independent users make
them, and the same schedule again for the same seed. ``uniform`` spaces them evenly, i / rate.

``run_phase`` can also read the CPU seconds (utime + stime of /proc/<pid>/stat) of given processes at
the start and the end of its measured window, with the answers completed within it: the server's CPU
time per answered request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

try:  # the service's own JSON library (a serve dependency); plain json otherwise
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

HOST = "127.0.0.1"  # the only host this benchmark ever talks to


# ----- statistics -----------------------------------------------------------------------------------
def latency_summary(latencies_ms: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    if len(values) == 0:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(float(values.max()), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


# ----- machine ----------------------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers depend on; the load average says whether the machine was quiet."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "faiss": _version("faiss"),
        "numpy": _version("numpy"),
        "uvicorn": _version("uvicorn"),
        "fastapi": _version("fastapi"),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ----- the service in a subprocess ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the benchmark dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """``python -m uvicorn --factory service.app:app_factory`` on 127.0.0.1 and a free port, ``workers``
    worker processes (one: the server is that process; more: a supervisor and its workers).

    Use as a context manager: the process is terminated (then killed) on exit, whatever happened.
    """

    def __init__(
        self, env: dict[str, str], cwd: Path, ready_timeout_s: float = 300.0, workers: int = 1
    ) -> None:
        self.env = env
        self.workers = workers
        self.cwd = cwd
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        # Kept open for the server's lifetime (its stdout and stderr); closed in close().
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="coldwarm-bench-server-", suffix=".log", delete=False
        )
        self.log_path = Path(self._log.name)

    def __enter__(self) -> ServerProcess:
        try:
            for attempt in range(3):  # a free port may be taken between choosing and binding it
                self.port = free_port()
                self._start()
                if self._wait_ready():
                    return self
                self.stop()
                if "address already in use" not in self.log_tail().lower() or attempt == 2:
                    raise RuntimeError(f"the service did not become ready; log:\n{self.log_tail()}")
            raise RuntimeError("unreachable")
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _start(self) -> None:
        command = [
            sys.executable, "-m", "uvicorn", "--factory", "service.app:app_factory",
            "--host", HOST, "--port", str(self.port), "--workers", str(self.workers),
            "--log-level", "warning", "--no-access-log",
            # Longer than any idle gap of the load generator's pooled connections.
            "--timeout-keep-alive", "120",
        ]  # fmt: skip
        self._log.seek(0)
        self._log.truncate()
        self.process = subprocess.Popen(
            command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def _wait_ready(self) -> bool:
        """Polls /readyz until 200; False when the process exits or the time is up."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            status, _ = simple_get(self.port, "/readyz", timeout_s=2.0)
            if status == 200:
                return True
            time.sleep(0.25)
        return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    def close(self) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def simple_request(
    port: int, method: str, path: str, payload: dict[str, Any] | None = None, timeout_s: float = 2.0
) -> tuple[int | None, bytes]:
    """One blocking request to 127.0.0.1 (health checks, probes); (None, b"") when nothing answers."""
    body = b"" if payload is None else json.dumps(payload).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
    if payload is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            sock.sendall(head.encode() + b"\r\n" + body)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None, b""
    raw = b"".join(chunks)
    status_head, _, answer = raw.partition(b"\r\n\r\n")
    try:
        return int(status_head[9:12]), answer
    except ValueError:
        return None, b""


def simple_get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int | None, bytes]:
    return simple_request(port, "GET", path, None, timeout_s)


# ----- Redis -------------------------------------------------------------------------------------------
class BenchError(RuntimeError):
    """A precondition the benchmark cannot work around (no artifacts, no Redis); reported, exit 2."""


def connect_redis(url: str) -> Any:
    """A redis-py client of ``url`` that has answered a PING, or a BenchError saying why not."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        raise BenchError(f"no Redis at {url}: {error}") from error
    return client


def training_data_warning(manifest: dict[str, Any], data: Any, consequence: str) -> str | None:
    """A warning when ``data`` is not the data the artifacts were trained on; None when it is, or when
    the manifest records no fingerprint to tell."""
    from model.artifacts import DataMismatchError, check_training_data

    if not manifest.get("data_fingerprint"):
        return None
    try:
        check_training_data(manifest, data)
    except DataMismatchError as error:
        return f"WARNING: {error}: {consequence}"
    return None


def delete_keys(client: Any, pattern: str) -> int:
    """Deletes every key matching ``pattern`` (SCAN, never KEYS); returns how many."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


# ----- the HTTP/1.1 client ----------------------------------------------------------------------------
class StaleConnection(ConnectionError):
    """A pooled connection the server had closed before we used it; safe to retry once."""


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.uses = 0

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes, bool]:
        """(status, body, keep_alive) of one request written as ``raw``."""
        reused = self.uses > 0
        self.uses += 1
        self.writer.write(raw)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            if reused and (not isinstance(error, asyncio.IncompleteReadError) or not error.partial):
                raise StaleConnection(str(error)) from error
            raise
        status = int(head[9:12])
        length: int | None = None
        chunked = False
        keep_alive = True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                keep_alive = False
        if length is not None:
            body = await self.reader.readexactly(length)
        elif chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.read()
            keep_alive = False
        return status, body, keep_alive

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class ConnectionPool:
    """At most ``size`` keep-alive connections; a request waits for a free one (counted in its latency).

    The queue holds idle connections and ``None`` for a free slot without a connection; LIFO, so that
    warm connections are reused before new ones are opened.
    """

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.idle: asyncio.LifoQueue[Connection | None] = asyncio.LifoQueue()
        for _ in range(size):
            self.idle.put_nowait(None)
        self.opened = 0

    async def acquire(self) -> Connection:
        conn = await self.idle.get()
        if conn is not None:
            return conn
        try:
            conn = await Connection.open(self.port)
        except BaseException:
            self.idle.put_nowait(None)
            raise
        self.opened += 1
        return conn

    def release(self, conn: Connection | None, reusable: bool) -> None:
        if conn is not None and reusable:
            self.idle.put_nowait(conn)
            return
        if conn is not None:
            conn.close()
        self.idle.put_nowait(None)

    def close(self) -> None:
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if conn is not None:
                conn.close()


# ----- one open-loop phase ----------------------------------------------------------------------------
STAGES = ("features", "queue", "model", "search", "total")


@dataclass(slots=True)
class Outcome:
    """One request of an open-loop schedule, as the load generator saw it."""

    index: int  # position in the schedule
    scheduled: float  # time.perf_counter() of its due time
    lag_s: float  # how late it was handed to the connection pool
    done: float  # time.perf_counter() when it was answered or failed
    status: int  # HTTP status; 0 when nothing was answered
    body: bytes
    error: str | None  # "timeout" or the exception's name when the transport failed, else None

    @property
    def latency_ms(self) -> float:
        """From the *scheduled* send time: client and server queueing count."""
        return (self.done - self.scheduled) * 1e3

    def parse(self) -> tuple[str | None, Any]:
        """(error kind, None) for a failure (transport, non-200, bad JSON), else (None, the JSON answer)."""
        if self.error is not None:
            return self.error, None
        if self.status != 200:
            return f"http_{self.status}", None
        try:
            return None, _loads(self.body)
        except ValueError:
            return "bad_json", None


@dataclass
class PhaseResult:
    target_rps: float
    duration_s: float
    scheduled: int = 0  # requests scheduled in the measured window
    ok: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    degraded: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    last_done: float = 0.0
    window_start: float = 0.0
    connections_opened: int = 0
    arrivals: str = "uniform"
    # Requests due in the measured window per second of it: the rate actually offered (Poisson: close to
    # the target, not equal).
    offered_rps: float = 0.0
    # CPU seconds of each process given to run_phase over the measured window, and the answers (HTTP
    # 200, measured or not) completed within that window; empty when no process was given.
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    cpu_window_s: float = 0.0
    answers_in_window: int = 0
    machine_busy_cores: float | None = None

    def cpu_ms_per_answer(self, name: str) -> float | None:
        """CPU milliseconds of process ``name`` per answer completed in the measured window."""
        if name not in self.cpu_seconds or not self.answers_in_window:
            return None
        return self.cpu_seconds[name] * 1e3 / self.answers_in_window

    @property
    def achieved_rps(self) -> float:
        span = max(self.duration_s, self.last_done - self.window_start)
        return self.ok / span if span > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.scheduled if self.scheduled else 1.0

    @property
    def degraded_rate(self) -> float:
        """Answers that came back degraded (load shed, Redis trouble): served, but not the model's."""
        return self.degraded / self.scheduled if self.scheduled else 1.0

    def add(self, outcome: Outcome) -> None:
        """Counts one measured request."""
        self.send_lag_ms.append(outcome.lag_s * 1e3)
        error, answer = outcome.parse()
        if error is not None:
            self.errors += 1
            self.error_kinds[error] += 1
            return
        self.ok += 1
        self.latencies_ms.append(outcome.latency_ms)
        self.last_done = max(self.last_done, outcome.done)
        if answer.get("degraded"):
            self.degraded += 1
        stages = answer.get("latency_ms") or {}
        for name in STAGES:
            value = stages.get(name)
            if isinstance(value, int | float):
                self.stage_ms[name].append(float(value))

    def server_stages(self) -> dict[str, float] | None:
        if not self.stage_ms["total"]:
            return None
        out = {name: round(float(np.mean(values)), 3) for name, values in self.stage_ms.items() if values}
        # What the stages leave out of the total: the event loop's own work and waits (parsing, the
        # answer's serialisation, handing results back from the model thread).
        parts = ("features", "queue", "model", "search")
        out["other"] = round(out["total"] - sum(out.get(s, 0.0) for s in parts), 3)
        total = np.asarray(self.stage_ms["total"])
        out["total_p50"] = round(float(np.percentile(total, 50)), 3)
        out["total_p99"] = round(float(np.percentile(total, 99)), 3)
        return out


def render_request(port: int, path: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _one_request(
    pool: ConnectionPool,
    raw: bytes,
    index: int,
    scheduled: float,
    deadline: float,
    on_done: Callable[[Outcome], None],
) -> None:
    lag = time.perf_counter() - scheduled
    error: str | None = None
    status = 0
    body = b""
    try:
        async with asyncio.timeout(max(deadline - time.perf_counter(), 0.001)):
            for attempt in (0, 1):
                conn = await pool.acquire()
                try:
                    status, body, keep = await conn.request(raw)
                except StaleConnection:
                    pool.release(conn, reusable=False)
                    if attempt == 1:
                        raise
                    continue
                except BaseException:
                    pool.release(conn, reusable=False)
                    raise
                pool.release(conn, reusable=keep)
                break
    except TimeoutError:
        error = "timeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        error = type(exc).__name__
    on_done(Outcome(index, scheduled, lag, time.perf_counter(), status, body, error))


class ScheduleEnd(NamedTuple):
    abandoned: int  # requests still unfinished after the final wait (cancelled; on_done never saw them)
    connections_opened: int


async def open_loop(
    port: int,
    request_at: Callable[[int], bytes],
    n_requests: int,
    rate: float,
    timeout_s: float,
    max_connections: int,
    on_done: Callable[[Outcome], None],
    t0: float | None = None,
    offsets: Sequence[float] | np.ndarray | None = None,
) -> ScheduleEnd:
    """Sends ``request_at(i)`` for i < n_requests, request i due at t0 + offsets[i] (default i / rate)
    whatever the server does; ``on_done`` gets the outcome of each one (in the event loop: keep it cheap).

    Bounded: no request is sent after the schedule ends, each one gives up ``timeout_s`` after its due
    time, and the final wait is bounded too. ``t0`` defaults to 50 ms from now.
    """
    pool = ConnectionPool(port, max_connections)
    if t0 is None:
        t0 = time.perf_counter() + 0.05
    due = [t0 + i / rate for i in range(n_requests)] if offsets is None else [t0 + float(o) for o in offsets]
    if len(due) < n_requests:
        raise ValueError(f"{len(due)} offsets for {n_requests} requests")
    tasks: set[asyncio.Task[None]] = set()
    abandoned = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a client-side collection pause would show up as server latency
    try:
        for i in range(n_requests):
            scheduled = due[i]
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(
                _one_request(pool, request_at(i), i, scheduled, scheduled + timeout_s, on_done)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=timeout_s + 2.0)
            for task in pending:  # cannot happen unless a timeout failed to fire; bounded regardless
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
                abandoned = len(pending)
    finally:
        pool.close()
        if gc_was_enabled:
            gc.enable()
    return ScheduleEnd(abandoned, pool.opened)


ARRIVALS = ("poisson", "uniform")


def arrival_offsets(
    rate: float, seconds: float, kind: str = "poisson", seed: int | Sequence[int] = 0
) -> np.ndarray:
    """Due times (seconds from the schedule's start, ascending, all < ``seconds``) of requests at ``rate``.

    poisson: cumulative sums of exponential gaps of mean 1 / rate from ``np.random.default_rng(seed)``
    (the same seed, the same schedule); uniform: i / rate.
    """
    if rate <= 0 or seconds <= 0:
        return np.empty(0)
    if kind == "uniform":
        return np.arange(int(round(seconds * rate))) / rate
    if kind != "poisson":
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    expected = seconds * rate
    chunks: list[np.ndarray] = []
    last = 0.0
    while last < seconds:  # almost always one draw: 6 sigma above the expected count, plus a margin
        gaps = rng.exponential(1.0 / rate, size=int(expected + 6 * np.sqrt(expected) + 16))
        offsets = last + np.cumsum(gaps)
        chunks.append(offsets)
        last = float(offsets[-1])
    offsets = np.concatenate(chunks)
    return offsets[offsets < seconds]


# ----- CPU time of processes -------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcessTree:
    """A process and every process below it (``uvicorn --workers N``: the supervisor and its
    workers); ``main_threads`` counts each one's main thread alone (the workers' event loops)."""

    root: int
    main_threads: bool = False


CpuTarget = int | tuple[int, int] | ProcessTree


def _stat_fields(path: str) -> list[bytes] | None:
    """The fields of a /proc stat file after the command name, from the 3rd (state) on."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    # The command name (2nd field) may hold spaces and parentheses: the fields after its last ')'.
    return raw[raw.rindex(b")") + 2 :].split()


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid``, from /proc/<pid>/task/<tid>/children (none once it is gone)."""
    try:
        return [
            int(c)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        ]
    except OSError:
        return []


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(child_pids(pid))
    return found


def process_cpu_seconds(target: CpuTarget) -> float | None:
    """utime + stime from /proc: of process ``pid`` (all its threads), of one thread for (pid, tid),
    or summed over a ``ProcessTree``; None when the process (the tree's root) is unreadable."""
    if isinstance(target, ProcessTree):
        pids = descendants(target.root)
        spent = [process_cpu_seconds((pid, pid) if target.main_threads else pid) for pid in pids]
        return None if spent[0] is None else sum(s for s in spent if s is not None)
    path = f"/proc/{target[0]}/task/{target[1]}/stat" if isinstance(target, tuple) else f"/proc/{target}/stat"
    fields = _stat_fields(path)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # proc(5) 14, 15


def machine_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None when unreadable."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class CpuSample:
    at: float
    processes: dict[str, float | None]
    machine: tuple[int, int] | None

    @classmethod
    def take(cls, pids: dict[str, CpuTarget]) -> CpuSample:
        return cls(
            time.perf_counter(), {n: process_cpu_seconds(p) for n, p in pids.items()}, machine_cpu_ticks()
        )


def cpu_between(first: CpuSample, last: CpuSample) -> tuple[dict[str, float], float | None]:
    """CPU seconds of each process between two samples, and the CPUs the whole machine kept busy."""
    spent = {
        name: round(after - before, 3)
        for name, after in last.processes.items()
        if after is not None and (before := first.processes.get(name)) is not None
    }
    busy = None
    if first.machine and last.machine and last.machine[1] > first.machine[1]:
        cores = os.cpu_count() or 1
        busy_ticks = last.machine[0] - first.machine[0]
        busy = round(cores * busy_ticks / (last.machine[1] - first.machine[1]), 2)
    return spent, busy


async def run_phase(
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float,
    warmup_s: float,
    timeout_s: float,
    max_connections: int,
    arrivals: str = "uniform",
    seed: int | Sequence[int] = 0,
    cpu_pids: dict[str, CpuTarget] | None = None,
) -> PhaseResult:
    """Sends ``requests`` (cycled) at ``rate`` per second for warmup_s + duration_s, open loop.

    Due times follow ``arrivals`` (``arrival_offsets``: poisson with ``seed``, or uniform). Only requests
    due after the warm-up are measured. Bounded: no request is sent after the schedule ends, and each
    one gives up ``timeout_s`` after its due time. With ``cpu_pids`` ({name: pid, or (pid, tid) for one
    thread}), the CPU seconds of each over the measured window [t0 + warmup_s, t0 + warmup_s +
    duration_s] are recorded, with the answers completed in that window.
    """
    result = PhaseResult(target_rps=rate, duration_s=duration_s, arrivals=arrivals)
    offsets = arrival_offsets(rate, warmup_s + duration_s, arrivals, seed)
    n_total = len(offsets)
    n_warmup = int(np.searchsorted(offsets, warmup_s - 1e-9))
    t0 = time.perf_counter() + 0.05
    result.window_start = t0 + warmup_s
    window_end = result.window_start + duration_s
    result.scheduled = n_total - n_warmup
    result.offered_rps = result.scheduled / duration_s if duration_s > 0 else 0.0
    answered_at: list[float] = []

    def measure(outcome: Outcome) -> None:
        if outcome.status == 200:
            answered_at.append(outcome.done)
        if outcome.index >= n_warmup:
            result.add(outcome)

    async def sample_cpu() -> tuple[CpuSample, CpuSample] | None:
        if not cpu_pids:
            return None
        await asyncio.sleep(max(0.0, result.window_start - time.perf_counter()))
        first = CpuSample.take(cpu_pids)
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        return first, CpuSample.take(cpu_pids)

    sampler = asyncio.create_task(sample_cpu())
    try:
        end = await open_loop(
            port,
            lambda i: requests[i % len(requests)],
            n_total,
            rate,
            timeout_s,
            max_connections,
            measure,
            t0,
            offsets,
        )
        samples = await sampler
    finally:
        if not sampler.done():
            sampler.cancel()
    if samples is not None:
        first, last = samples
        result.cpu_seconds, result.machine_busy_cores = cpu_between(first, last)
        result.cpu_window_s = last.at - first.at
        result.answers_in_window = sum(1 for t in answered_at if first.at <= t <= last.at)
    result.connections_opened = end.connections_opened
    if end.abandoned:
        missing = result.scheduled - result.ok - result.errors
        result.errors += missing
        result.error_kinds["cancelled"] += missing
    return result


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (less client CPU per request), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(coro: Any, use_uvloop: bool = True) -> Any:
    with asyncio.Runner(loop_factory=event_loop_factory() if use_uvloop else None) as runner:
        return runner.run(coro)
