"""The load balancer of the compose stack: docker/haproxy/haproxy.cfg, the `lb` service's HAProxy.

- `haproxy -c` accepts the compose config as it is (Docker's DNS and the `api` host do not resolve
  here: `init-addr none` lets the servers start without an address), and rejects a broken copy of it;
- the SAME file, with only its Docker parts swapped for loopback ones (the `server-template` lines
  become one `server` line per local api, the `resolvers` section goes, the `bind` port is a free one;
  timeouts, retries, health checks and everything else are used as they are), runs in front of two real
  `coldwarm serve` processes over the real Redis and the test artifacts:
  both serve (round robin, each one's request counter); one, whose batcher holds every request 200 ms
  (so that some are always in flight on it), is SIGKILLed under a steady stream of /recommend through
  the proxy: every answer is a 200 (the requests it held are retried on the survivor), and afterwards
  every request goes to the survivor without a retry; with Redis away
  (a relay to the real Redis is cut) no replica is ready, and the live ones (/healthz) keep /recommend
  answering, degraded, instead of HAProxy's own 503, until Redis returns.

Skipped when no `haproxy` binary is installed, except under CI=true, where it is a failure
(.ci/install-system-deps installs Debian's).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import ServingArtifacts, load_users, parse_metrics  # noqa: E402

pytest_plugins = ["service_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = ROOT / "docker" / "haproxy" / "haproxy.cfg"
REPLICA_HEADER = "x-coldwarm-replica"
# Server options that only mean something with a DNS name: dropped from the loopback `server` lines.
DNS_OPTIONS = {"resolvers", "resolve-prefer", "resolve-net", "resolve-opts", "init-addr"}
STARTUP_S = 120
REDIS_TARGET = ("127.0.0.1", 6379)

RATE_PER_S = 40.0  # the stream through the proxy during the kill, over CLIENTS threads
CLIENTS = 8
BEFORE_S = 2.0  # normal operation before the kill
AFTER_S = 3.0  # after the SIGKILL
# The victim (api-1) holds each request it has read this long (its batcher waits for more), so that
# the kill always cuts requests in flight: HAProxy must send them again.
VICTIM_BATCH_WAIT_US = 200_000
HTTP_TIMEOUT_S = 15.0
# A request that meets a reset connection instead of a closed one (the dead replica had not read it,
# or HAProxy sent it on a kept-alive connection to the replica before noticing that the replica had
# closed it) is a read error, not an empty response. HAProxy retries it too since 2.6.14 / 2.4.23
# ("BUG/MINOR: http-ana: Do a L7 retry on read error if there is no response", June 2023; the compose
# image, `haproxy:2.6-alpine`, is a later 2.6). Debian 12's 2.6.12 does not: it answers 502, or, on a
# kept-alive server connection, closes the client's connection without an answer ("the client is
# required to retry"). With such a binary, those requests (rare: none in most runs here), at most one
# per client connection and all within KILL_WINDOW_S of the kill, are reported instead of failing.
READ_ERROR_RETRY_SINCE = (2, 6, 14)
KILL_WINDOW_S = 0.5


def haproxy_binary() -> str:
    binary = shutil.which("haproxy")
    if binary is None:
        reason = "no haproxy binary (.ci/install-system-deps installs Debian's haproxy)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}: under CI=true this check must run")
        pytest.skip(reason)
    return binary


def haproxy_version() -> tuple[int, ...]:
    result = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True, timeout=30)
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", result.stdout)
    assert match, result.stdout
    return tuple(int(part) for part in match.groups())


def haproxy_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----- the config -----------------------------------------------------------------------------------
def config_lines() -> list[list[str]]:
    """The config's directives, split into words (comments and blank lines dropped)."""
    lines = [line.split("#", 1)[0].split() for line in HAPROXY_CONFIG.read_text().splitlines()]
    return [words for words in lines if words]


def loopback_config(text: str, listen_port: int, backend_ports: list[int]) -> str:
    """The compose config, run on loopback: each `server-template` becomes one `server` per local api
    (its options kept, less the DNS ones), the `resolvers` section goes, `bind` gets a free port.
    Every other line is kept as it is."""
    out: list[str] = []
    in_resolvers = False
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words and not line[0].isspace():  # a section header
            in_resolvers = words[0] == "resolvers"
        if in_resolvers:
            continue
        if words[:1] == ["bind"]:
            out.append(f"    bind 127.0.0.1:{listen_port}")
        elif words[:1] == ["server-template"]:
            prefix, _count, address, *options = words[1:]
            assert address == "api:8000", line
            kept: list[str] = []
            skip = False
            for word in options:
                if skip:
                    skip = False
                elif word in DNS_OPTIONS:
                    skip = True  # and its argument
                else:
                    kept.append(word)
            for number, port in enumerate(backend_ports, start=1):
                out.append(f"    server {prefix}{number} 127.0.0.1:{port} {' '.join(kept)}".rstrip())
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def test_haproxy_accepts_the_compose_config(tmp_path: Path) -> None:
    result = haproxy_check(HAPROXY_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    # The check really checks: a misspelt retry condition, an unknown directive, and a server that
    # must resolve `api` at start-up (here, where no Docker DNS answers) are each refused.
    text = HAPROXY_CONFIG.read_text()
    assert "response-timeout" in text and "init-addr none" in text
    for name, broken in (
        ("misspelt", text.replace("response-timeout", "response-timeuot")),
        (
            "unknown",
            text.replace("    balance roundrobin", "    balance roundrobin\n    retry-everything yes"),
        ),
        ("libc", text.replace("init-addr none", "init-addr libc")),
    ):
        assert broken != text, name
        path = tmp_path / f"{name}.cfg"
        path.write_text(broken)
        result = haproxy_check(path)
        assert result.returncode != 0, f"{name}: haproxy -c accepted {path}\n{result.stdout}{result.stderr}"


def test_config_balances_every_replica_with_checks_and_retries() -> None:
    """What the README promises of the balancer, read from the file the compose stack mounts."""
    lines = config_lines()
    sections: dict[str, list[str]] = {}
    section = ""
    for words in lines:
        if words[0] in ("global", "defaults", "resolvers", "frontend", "backend"):
            section = " ".join(words)
            sections[section] = []
        else:
            sections[section].append(" ".join(words))
    # Docker's embedded DNS, asked every second.
    assert {"nameserver docker 127.0.0.11:53", "timeout resolve 1s"} <= set(sections["resolvers docker"])
    # Every replica of `api` (up to 10), found by that resolver, in rotation while /readyz says ready...
    template = "server-template api- 10 api:8000 check resolvers docker resolve-prefer ipv4 init-addr none"
    assert sections["backend api"] == [
        "balance roundrobin",
        "option httpchk GET /readyz",
        "http-check expect status 200",
        template,
    ]
    # ... or, while none is ready (Redis away), while /healthz says alive: degraded answers, not 503s.
    assert sections["backend api-live"] == [
        "balance roundrobin",
        "option httpchk GET /healthz",
        "http-check expect status 200",
        template.replace("api- ", "live- "),
    ]
    frontend = sections["frontend api"]
    assert frontend[-2:] == ["use_backend api-live if { nbsrv(api) eq 0 }", "default_backend api"]
    assert "bind :8000" in frontend
    # A failed request goes to another replica: connection failures, a replica that died with the
    # request (empty response) or hung (response timeout); writes only on connection failures.
    defaults = sections["defaults"]
    assert "retries 3" in defaults and "option redispatch 1" in defaults
    # Only a request held whole can be replayed: the POST bodies are waited for before forwarding.
    assert "option http-buffer-request" in defaults
    (retry_on,) = [line for line in defaults if line.startswith("retry-on ")]
    assert {"conn-failure", "empty-response", "response-timeout"} <= set(retry_on.split()[1:])
    assert "http-request disable-l7-retry if METH_POST { path_beg /events /admin/ }" in frontend
    (default_server,) = [line.split() for line in defaults if line.startswith("default-server ")]
    assert {"observe", "layer4", "mark-down"} <= set(default_server)
    assert "timeout check 2s" in defaults


def test_loopback_config_changes_only_the_docker_lines() -> None:
    text = HAPROXY_CONFIG.read_text()
    rendered = loopback_config(text, 18000, [18001, 18002])
    original_lines, rendered_lines = text.splitlines(), rendered.splitlines()
    dropped = [line for line in original_lines if line not in rendered_lines]
    added = [line for line in rendered_lines if line not in original_lines]
    docker_only = re.compile(
        r"\s*(#|bind|server-template|resolvers|nameserver|resolve_retries|timeout (resolve|retry)|hold"
        r"|accepted_payload_size)"
    )
    assert all(docker_only.match(line) for line in dropped), dropped
    assert added == [
        "    bind 127.0.0.1:18000",
        "    server api-1 127.0.0.1:18001 check",
        "    server api-2 127.0.0.1:18002 check",
        "    server live-1 127.0.0.1:18001 check",
        "    server live-2 127.0.0.1:18002 check",
    ]
    directives = "\n".join(line.split("#", 1)[0] for line in rendered_lines)
    assert "127.0.0.11" not in directives and "api:8000" not in directives and "resolve" not in directives
    for directive in (
        "retries 3",
        "option redispatch 1",
        "option httpchk GET /readyz",
        "default-server inter 1s",
    ):
        assert directive in rendered


# ----- two real apis behind the config --------------------------------------------------------------
class RedisRelay:
    """A TCP relay to the real Redis that the test can cut (for the apis, Redis is away: connections
    are closed at once) and restore."""

    def __init__(self, target: tuple[str, int] = REDIS_TARGET) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = True
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="redis-relay", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.sockets.clear()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def coldwarm_command() -> list[str]:
    script = shutil.which("coldwarm")
    return [script] if script else [sys.executable, "-m", "coldwarm"]


@dataclass
class Api:
    name: str  # the server name the loopback config gives it
    port: int
    process: subprocess.Popen[str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def recommend_count(self) -> float:
        samples = parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)
        return sum(
            value
            for (name, labels), value in samples.items()
            if name == "coldwarm_requests_total" and dict(labels).get("endpoint") == "/recommend"
        )


@dataclass
class Stack:
    apis: list[Api]
    url: str  # the proxy
    haproxy: subprocess.Popen[str]
    haproxy_log: Path
    relay: RedisRelay
    users: list[int] = field(default_factory=list)

    def log_text(self) -> str:
        return self.haproxy_log.read_text()


def stop(process: subprocess.Popen[str], sig: int = signal.SIGINT) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def wait_ready(api: Api, deadline: float) -> None:
    while True:
        assert api.process.poll() is None, api.log.read_text()[-5000:]
        try:
            if httpx.get(f"{api.url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{api.name} did not become ready:\n{api.log.read_text()[-3000:]}"
        time.sleep(0.25)


@pytest.fixture(scope="session")
def haproxy() -> str:
    """The binary; a session fixture, so that a missing one skips before the models are trained."""
    return haproxy_binary()


@pytest.fixture()
def stack(
    haproxy: str,
    serving_artifacts: ServingArtifacts,
    redis_client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
) -> Iterator[Stack]:
    binary = haproxy
    load_users(redis_client, key_prefix, serving_artifacts)
    relay = RedisRelay()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLDWARM_")}
    env.update(
        COLDWARM_ARTIFACTS_DIR=str(serving_artifacts.root),
        COLDWARM_KEY_PREFIX=key_prefix,
        COLDWARM_REDIS_URL=relay.url,
        # Two busy shared cores: no scheduling hiccup may turn into a degraded or shed answer.
        COLDWARM_REDIS_TIMEOUT_MS="2000",
        COLDWARM_MAX_QUEUE_MS="60000",
    )
    apis: list[Api] = []
    haproxy = None
    try:
        for number in (1, 2):
            port = free_port()
            log = tmp_path / f"api-{number}.log"
            extra = {"COLDWARM_BATCH_WAIT_US": str(VICTIM_BATCH_WAIT_US)} if number == 1 else {}
            process = subprocess.Popen(
                [*coldwarm_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                env={**env, **extra},
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                text=True,
            )
            apis.append(Api(f"api-{number}", port, process, log))
        deadline = time.monotonic() + STARTUP_S
        for api in apis:
            wait_ready(api, deadline)

        listen_port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(loopback_config(HAPROXY_CONFIG.read_text(), listen_port, [a.port for a in apis]))
        check = haproxy_check(config)
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy_log = tmp_path / "haproxy.log"
        haproxy = subprocess.Popen(
            [binary, "-f", str(config), "-db"],
            stdout=haproxy_log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{listen_port}"
        seen: set[str] = set()
        while seen != {"api-1", "api-2"}:
            assert haproxy.poll() is None, haproxy_log.read_text()
            assert time.monotonic() < deadline, f"the proxy did not reach both apis: {seen}"
            try:
                seen.add(httpx.get(f"{url}/readyz", timeout=5).headers.get(REPLICA_HEADER, ""))
            except httpx.TransportError:
                time.sleep(0.1)
            seen &= {"api-1", "api-2"}
        users = [int(u) for u in serving_artifacts.split.test[:50]]
        yield Stack(apis, url, haproxy, haproxy_log, relay, users)
    finally:
        if haproxy is not None:
            stop(haproxy, signal.SIGTERM)
        for api in apis:
            stop(api.process)
        relay.close()
        # Shown by pytest when the test failed: what HAProxy and the apis said last.
        for log in sorted(tmp_path.glob("*.log")):
            print(f"----- {log.name} (last lines) -----\n" + "\n".join(log.read_text().splitlines()[-25:]))


@dataclass
class Answer:
    sent: float  # monotonic
    status: int | None  # None: no HTTP answer at all (a transport error)
    replica: str
    degraded: bool | None
    error: str = ""


def request(client: httpx.Client, user: int) -> Answer:
    sent = time.monotonic()
    try:
        response = client.post("/recommend", json={"user_id": user, "k": 10})
    except httpx.TransportError as error:
        return Answer(sent, None, "", None, repr(error))
    degraded = response.json().get("degraded") if response.status_code == 200 else None
    return Answer(
        sent, response.status_code, response.headers.get(REPLICA_HEADER, ""), degraded, response.text[:200]
    )


def stream(
    url: str, users: list[int], stop_event: threading.Event, answers: list[Answer]
) -> list[threading.Thread]:
    """CLIENTS threads sending /recommend through the proxy at RATE_PER_S in all, until stop_event."""
    interval = CLIENTS / RATE_PER_S

    def run(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
            next_at = time.monotonic() + offset * interval / CLIENTS
            n = offset
            while not stop_event.is_set():
                time.sleep(max(0.0, next_at - time.monotonic()))
                answers.append(request(client, users[n % len(users)]))
                n += CLIENTS
                next_at += interval

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    return threads


# HAProxy's httplog: ... actconn/feconn/beconn/srv_conn/retries srv_queue/backend_queue "METHOD URI ..."
# (retries prefixed with "+" when the request was redispatched). Only abnormal requests are logged
# (option dontlog-normal): errors, 5xx, and every retried or redispatched one.
LOG_LINE = re.compile(
    r" api (?P<backend>[\w-]+)/(?P<server>\S+) \S+ (?P<status>\d{3}) .*"
    r" \d+/\d+/\d+/\d+/(?P<retries>\+?\d+) \d+/\d+ \"(?P<request>[^\"]*)\""
)


def logged_requests(text: str) -> list[re.Match[str]]:
    return [m for m in map(LOG_LINE.search, text.splitlines()) if m]


def test_two_apis_behind_the_compose_config(stack: Stack) -> None:
    one, two = stack.apis
    with httpx.Client(base_url=stack.url, timeout=HTTP_TIMEOUT_S) as client:
        # (a) Both serve, in turn: each replica's own counter saw exactly what the header says it answered.
        before = [api.recommend_count() for api in stack.apis]
        answers = [request(client, stack.users[n % len(stack.users)]) for n in range(40)]
        assert [a.status for a in answers] == [200] * 40, [a.error for a in answers if a.status != 200]
        by_replica = Counter(a.replica for a in answers)
        # Round robin: 20 each, unless a check took one out for a while on a starved machine.
        assert set(by_replica) == {"api-1", "api-2"} and min(by_replica.values()) >= 5, by_replica
        for api, count in zip(stack.apis, before, strict=True):
            assert api.recommend_count() - count == by_replica[api.name], api.name

        # (b) A steady stream through the proxy while api-1 is SIGKILLed.
        stop_event = threading.Event()
        stream_answers: list[Answer] = []
        threads = stream(stack.url, stack.users, stop_event, stream_answers)
        time.sleep(BEFORE_S)
        one.process.kill()
        killed_at = time.monotonic()
        one.process.wait(timeout=30)
        time.sleep(AFTER_S)
        stop_event.set()
        for thread in threads:
            thread.join(timeout=HTTP_TIMEOUT_S + 5)
        failed = [a for a in stream_answers if a.status != 200]
        retried = [m for m in logged_requests(stack.log_text()) if m["retries"].lstrip("+") != "0"]
        after = [a for a in stream_answers if a.sent > killed_at]
        version = haproxy_version()
        summary = (
            f"HAProxy {'.'.join(map(str, version))}: {len(stream_answers)} requests through the proxy "
            f"({RATE_PER_S:.0f}/s), {len(failed)} not 200; {len(retried)} retried by HAProxy "
            f"(retries {Counter(m['retries'] for m in retried)}, answered by "
            f"{Counter(m['server'] for m in retried)}); "
            f"answered by {Counter(a.replica for a in stream_answers)}; {len(after)} sent after the kill; "
            f"not 200: {[(a.status, round(a.sent - killed_at, 3)) for a in failed]} (status, sent - kill s)"
        )
        print(summary)
        # No request is lost beyond HAProxy's retry; on a HAProxy that does not retry a reset
        # connection (READ_ERROR_RETRY_SINCE), only those, at the kill.
        reset = [a for a in failed if abs(a.sent - killed_at) < KILL_WINDOW_S and a.status in (None, 502)]
        tolerated = reset if version < READ_ERROR_RETRY_SINCE else []
        assert len(tolerated) <= CLIENTS, summary
        assert failed == tolerated, f"{summary}: {[(a.status, a.error) for a in failed]}"
        assert len(stream_answers) >= RATE_PER_S * (BEFORE_S + AFTER_S) * 0.5, summary
        # The victim held requests when it died: HAProxy sent each again, to the survivor.
        assert retried and all(m["server"] == "api-2" and m["retries"].startswith("+") for m in retried), (
            summary
        )
        assert {a.replica for a in after if a.status == 200} == {"api-2"}, summary
        assert "Server api/api-1 is DOWN" in stack.log_text()

        # Afterwards every request goes to the survivor at once: no retry, no error.
        logged = len(logged_requests(stack.log_text()))
        count = two.recommend_count()
        answers = [request(client, stack.users[n % len(stack.users)]) for n in range(20)]
        assert [(a.status, a.replica) for a in answers] == [(200, "api-2")] * 20
        assert two.recommend_count() - count == 20
        time.sleep(0.5)  # HAProxy writes its log line after the answer
        assert len(logged_requests(stack.log_text())) == logged, "a request after the kill was retried"

        # Redis away: no replica is ready (/readyz 503); the live ones (backend api-live, checked on
        # /healthz) keep /recommend answering from the cold path instead of HAProxy's own 503.
        stack.relay.cut()
        deadline = time.monotonic() + 15
        answers = []
        while not answers or answers[-1].replica != "live-2":
            answers.append(request(client, stack.users[len(answers) % len(stack.users)]))
            assert time.monotonic() < deadline, "the survivor was not taken out while Redis was away"
            time.sleep(0.05)
        assert all(a.status == 200 and a.degraded for a in answers), [(a.status, a.error) for a in answers]
        assert "Server api/api-2 is DOWN" in stack.log_text()
        assert httpx.get(f"{stack.url}/readyz", timeout=10).status_code == 503
        # Redis back: the survivor is ready again, checked back in, and answers in full.
        stack.relay.restore()
        deadline = time.monotonic() + 15
        while True:
            answer = request(client, stack.users[0])
            assert answer.status == 200, answer.error
            if answer.replica == "api-2" and answer.degraded is False:
                break
            assert time.monotonic() < deadline, "the survivor did not come back after Redis returned"
            time.sleep(0.1)
        assert "Server api/api-2 is UP" in stack.log_text()
