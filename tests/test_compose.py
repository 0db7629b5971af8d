"""The compose stack (docker-compose.yml, docker/), checked without a Docker engine.

- the compose file is validated by real Compose implementations (`docker compose` v2 and Debian's
  `docker-compose` v1, each skipped when absent; .ci/install-system-deps installs both), and its structure
  asserted in Python: services, depends_on conditions, healthchecks, ports, volumes, the gpu profile, and
  the load balancer `lb` in front of the api replicas (its HAProxy config is checked and run by
  tests/test_load_balancer.py);
- the Dockerfiles are linted by hadolint (when installed) and by the checks below: multi-stage, pinned
  base tags, non-root numeric USER, HEALTHCHECK on /readyz, entrypoint `coldwarm`, one faiss wheel (never
  faiss-gpu-cu12), the runtime dependencies only;
- the Prometheus config passes `promtool check config`; every metric name the Grafana dashboard queries is
  one the service exports (tests/test_prometheus.py runs the queries against a real Prometheus);
- docker/trainer.sh's decisions (train, skip, build the index, load features) with a stub `coldwarm`;
- the trainer's and the api's commands, read from docker-compose.yml and the Dockerfile, run in order on
  this machine (container paths -> tmp, redis -> the local Redis with a key prefix of its own, data ->
  synthetic:300 with a tiny model), then POST /recommend against the api they started.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis_cluster import cluster_tools_missing, free_ports

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERFILE_GPU = ROOT / "docker" / "Dockerfile.gpu"
TRAINER_SCRIPT = ROOT / "docker" / "trainer.sh"
CLUSTER_INIT_SCRIPT = ROOT / "docker" / "redis-cluster-init.sh"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
HAPROXY_CONFIG = ROOT / "docker" / "haproxy" / "haproxy.cfg"
GRAFANA_DIR = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "coldwarm.json"
COMPOSE_V2_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")

DEFAULT_SERVICES = {"redis", "trainer", "api", "lb", "prometheus", "grafana"}
GPU_SERVICES = {"trainer-gpu", "api-gpu"}
CLUSTER_NODES = [f"redis-node-{i}" for i in range(1, 7)]
CLUSTER_SERVICES = {*CLUSTER_NODES, "redis-cluster-init"}
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# A tiny model: the offline job takes seconds on two shared cores. One intra-op thread: torch's default
# (one per core) fights whatever else runs on them, 40x slower here.
TINY_TRAINING = {
    "COLDWARM_TRAIN__TORCH_THREADS": "1",
    "COLDWARM_TRAIN__EPOCHS": "1",
    "COLDWARM_TRAIN__PRETRAIN_EPOCHS": "1",
    "COLDWARM_TRAIN__BATCH_SIZE": "256",
    "COLDWARM_MODEL__EMBEDDING_DIM": "16",
    "COLDWARM_MODEL__HIDDEN_DIM": "32",
}
TEST_DATA = "synthetic:300"


# ----- reading the files ----------------------------------------------------------------------------
def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)-([^}]*))?\})")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's interpolation of ${VAR}, ${VAR:-default}, ${VAR-default} and $$ (all this file uses)."""

    def replace(match: re.Match[str]) -> str:
        name, colon, default = match.groups()
        if name is None:
            return "$"
        value = variables.get(name)
        if default is None:
            return value or ""
        if value is None or (colon and value == ""):
            return default
        return value

    result = _VARIABLE.sub(replace, text)
    assert "${" not in result, f"interpolation this test does not know: {text!r}"
    return result


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        return {pair[0]: (pair[1] if len(pair) == 2 else None) for pair in pairs}
    return {key: (None if value is None else str(value)) for key, value in env.items()}


def volume_mounts(service: dict[str, Any], variables: dict[str, str]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume, interpolated."""
    mounts = []
    for spec in service.get("volumes", []):
        assert isinstance(spec, str), f"long-syntax volume {spec!r}: extend this test"
        parts = interpolate(spec, variables).split(":")
        mounts.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return mounts


def healthcheck_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped (parser directives
    and `# hadolint ignore=` comments included)."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, f"{path}: a continuation line ends the file"
    return instructions


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage; stage 0 holds the ARGs before the first FROM."""
    result: list[list[tuple[str, str]]] = [[]]
    for instruction in dockerfile_instructions(path):
        if instruction[0] == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def global_args(path: Path) -> dict[str, str]:
    args = {}
    for keyword, arguments in stages(path)[0]:
        assert keyword == "ARG", f"{path}: {keyword} before the first FROM"
        name, _, default = arguments.partition("=")
        args[name] = default
    return args


def base_images(path: Path) -> list[str]:
    args = global_args(path)
    images = []
    for stage in stages(path)[1:]:
        image = stage[0][1].split()[0]
        images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image))
    return images


def runtime_stage(path: Path) -> list[tuple[str, str]]:
    return stages(path)[-1]


def last(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [arguments for key, arguments in stage if key == keyword]
    assert values, f"no {keyword} in the stage"
    return values[-1]


def image_environment(path: Path) -> dict[str, str]:
    env = {}
    for keyword, arguments in runtime_stage(path):
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def installed_script(path: Path, target: str) -> Path:
    """The repository file a Dockerfile's COPY installs at ``target``."""
    for keyword, arguments in runtime_stage(path):
        if keyword == "COPY":
            words = [w for w in arguments.split() if not w.startswith("--")]
            if words[-1] == target:
                assert len(words) == 2, arguments
                return ROOT / words[0]
    raise AssertionError(f"{path} installs nothing at {target}")


def dashboard_queries(node: Any = None) -> list[str]:
    """Every PromQL string of the Grafana dashboard: panel targets and the template variables' queries."""
    if node is None:
        node = json.loads(DASHBOARD.read_text())
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                found.append(value["query"])
            else:
                found += dashboard_queries(value)
    elif isinstance(node, list):
        for value in node:
            found += dashboard_queries(value)
    return found


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bcoldwarm_[A-Za-z0-9_]*[A-Za-z0-9]\b", expr))


def exported_metric_names() -> set[str]:
    """Every series name a ServiceMetrics registry exposes, as prometheus_client spells them: counters
    get _total (and _created), histograms _bucket/_sum/_count (and _created), Info gets _info."""
    from service.metrics import ServiceMetrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names = set()
    for family in ServiceMetrics().registry.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- Compose implementations ----------------------------------------------------------------------
def compose_implementations() -> list[Any]:
    found = []
    docker = shutil.which("docker")
    v2 = None
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        v2 = [docker, "compose"]
    elif os.access(COMPOSE_V2_PLUGIN, os.X_OK):
        v2 = [str(COMPOSE_V2_PLUGIN)]  # the plugin binary runs standalone as well
    found.append(
        pytest.param(v2, id="compose-v2")
        if v2
        else pytest.param(None, id="compose-v2", marks=pytest.mark.skip(reason="no Docker Compose v2"))
    )
    v1 = shutil.which("docker-compose")
    found.append(
        pytest.param([v1], id="docker-compose")
        if v1
        else pytest.param(
            None,
            id="docker-compose",
            marks=pytest.mark.skip(reason="no docker-compose (.ci/install-system-deps)"),
        )
    )
    return found


def run_compose(
    command: list[str], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("COLDWARM_", "COMPOSE_"))}
    return subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", compose_implementations())
def test_compose_file_is_valid(command: list[str]) -> None:
    for args in (["config", "-q"], ["--profile", "gpu", "config", "-q"]):
        result = run_compose(command, *args)
        assert result.returncode == 0, f"{' '.join(args)}:\n{result.stderr}"
        # Every variable has a default: nothing is interpolated to an unintended blank.
        assert "is not set" not in result.stderr, result.stderr


def test_compose_v2_resolves_profiles_and_variables() -> None:
    """What `docker compose` v2 makes of the file: the gpu pair only under its profile, the defaults, and
    COLDWARM_DATA_DIR turning the data volume into a bind mount."""
    v2 = compose_implementations()[0].values[0]
    if v2 is None:
        pytest.skip("no Docker Compose v2 (.ci/install-system-deps installs it)")

    def resolved(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        result = run_compose(v2, *args, "config", "--format", "json", env=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    plain = resolved()
    assert set(plain["services"]) == DEFAULT_SERVICES
    assert set(resolved("--profile", "gpu")["services"]) == DEFAULT_SERVICES | GPU_SERVICES
    trainer = plain["services"]["trainer"]
    assert trainer["environment"]["COLDWARM_DATA"] == "synthetic"
    assert trainer["environment"]["COLDWARM_RETRAIN"] == "0"
    assert plain["services"]["redis"]["command"] == ["redis-server", "--save", "", "--appendonly", "no"]
    # One host port for the api, whatever its --scale: the balancer's; the replicas publish none.
    assert "ports" not in plain["services"]["api"]
    assert {(p["target"], str(p["published"])) for p in plain["services"]["lb"]["ports"]} == {(8000, "8000")}
    published = [str(p["published"]) for s in plain["services"].values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), f"a host port bound twice: {published}"
    moved = resolved(env={"COLDWARM_API_PORT": "9000"})["services"]
    assert {(p["target"], str(p["published"])) for p in moved["lb"]["ports"]} == {(8000, "9000")}
    data_mount = next(v for v in trainer["volumes"] if v["target"] == "/var/lib/coldwarm/data")
    assert data_mount["type"] == "volume"

    custom = resolved(env={"COLDWARM_DATA_DIR": "./my-data", "COLDWARM_DATA": "/var/lib/coldwarm/data/r.csv"})
    trainer = custom["services"]["trainer"]
    data_mount = next(v for v in trainer["volumes"] if v["target"] == "/var/lib/coldwarm/data")
    assert data_mount["type"] == "bind" and data_mount["source"] == str(ROOT / "my-data")
    assert trainer["environment"]["COLDWARM_DATA"] == "/var/lib/coldwarm/data/r.csv"


# ----- structure ------------------------------------------------------------------------------------
def test_services_and_profiles() -> None:
    declared = services()
    assert set(declared) == DEFAULT_SERVICES | GPU_SERVICES | CLUSTER_SERVICES
    for name in DEFAULT_SERVICES:
        assert "profiles" not in declared[name], f"{name} must start with a plain `docker compose up`"
    for name in GPU_SERVICES:
        assert declared[name]["profiles"] == ["gpu"]
    for name in CLUSTER_SERVICES:
        assert declared[name]["profiles"] == ["cluster"]
    for name, service in declared.items():
        if "build" not in service:  # third-party images: a pinned version tag, never latest
            image = service["image"]
            assert re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", image), f"{name}: unpinned image {image!r}"


def test_redis_service() -> None:
    redis_service = services()["redis"]
    assert redis_service["image"].startswith("redis:7")
    assert healthcheck_command(redis_service) == ["redis-cli", "ping"]
    command = [interpolate(word, {}) for word in redis_service["command"]]
    assert command == ["redis-server", "--save", "", "--appendonly", "no"], (
        "persistence must be off by default"
    )
    on = [interpolate(word, {"COLDWARM_REDIS_PERSISTENCE": "yes"}) for word in redis_service["command"]]
    assert on[-2:] == ["--appendonly", "yes"]


def test_trainer_service() -> None:
    trainer = services()["trainer"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile"
    assert trainer["restart"] == "no", "a one-shot job"
    assert trainer["healthcheck"] == {"disable": True}, "the image's api HEALTHCHECK does not apply"
    assert trainer["depends_on"] == {"redis": {"condition": "service_healthy"}}
    env = environment(trainer)
    assert interpolate(env["COLDWARM_DATA"], {}) == "synthetic"
    assert interpolate(env["COLDWARM_RETRAIN"], {}) == "0"
    assert interpolate(env["COLDWARM_REDIS_URL"], {}) == "redis://redis:6379/0"
    assert interpolate(env["COLDWARM_REDIS_CLUSTER"], {}) == "false"
    for name in TINY_TRAINING:  # passed through from the shell, so a small run needs no compose edit
        assert name in env and env[name] is None, name
    # The entrypoint is docker/trainer.sh, as both images install it.
    (entrypoint,) = trainer["entrypoint"]
    for dockerfile in (DOCKERFILE, DOCKERFILE_GPU):
        assert installed_script(dockerfile, entrypoint) == TRAINER_SCRIPT
    targets = {target: (source, mode) for source, target, mode in volume_mounts(trainer, {})}
    assert targets[env["COLDWARM_ARTIFACTS_DIR"]] == ("artifacts", "rw")
    assert targets["/var/lib/coldwarm/data"] == ("data", "rw")
    assert env["COLDWARM_RUN_DIR"].startswith("/var/lib/coldwarm/runs/")
    assert env["COLDWARM_CACHE_DIR"].startswith("/var/lib/coldwarm/data/")


def test_api_service() -> None:
    declared = services()
    api = declared["api"]
    assert api["command"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert last(runtime_stage(DOCKERFILE), "ENTRYPOINT") == '["coldwarm"]'
    assert api["depends_on"] == {
        "trainer": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
    }
    assert "/readyz" in " ".join(healthcheck_command(api))
    # No host port: `--scale api=3` binds nothing three times; lb publishes the one port (test_lb_service).
    assert "ports" not in api
    assert [str(port) for port in api.get("expose", ["8000"])] == ["8000"]
    # It serves what the trainer exported: the same volume, read-only, at the same path.
    trainer_env, api_env = environment(declared["trainer"]), environment(api)
    assert api_env["COLDWARM_ARTIFACTS_DIR"] == trainer_env["COLDWARM_ARTIFACTS_DIR"]
    assert api_env["COLDWARM_REDIS_URL"] == trainer_env["COLDWARM_REDIS_URL"]
    assert api_env["COLDWARM_KEY_PREFIX"] == trainer_env["COLDWARM_KEY_PREFIX"]
    assert volume_mounts(api, {}) == [("artifacts", api_env["COLDWARM_ARTIFACTS_DIR"], "ro")]
    assert interpolate(api_env["COLDWARM_ADMIN_TOKEN"], {}) == "", "admin endpoints off unless a token is set"


def test_lb_service() -> None:
    """HAProxy publishes the api's port and balances over every replica of `api` (the config's checks,
    and the config run in front of two real apis, are tests/test_load_balancer.py)."""
    declared = services()
    lb = declared["lb"]
    assert re.fullmatch(r"haproxy:2\.6(\.\d+)?(-alpine)?", lb["image"]), (
        "the branch Debian 12's haproxy checks in CI (`haproxy -c`)"
    )
    assert "build" not in lb and "profiles" not in lb
    mounts = {target: (source, mode) for source, target, mode in volume_mounts(lb, {})}
    assert mounts == {"/usr/local/etc/haproxy/haproxy.cfg": ("./docker/haproxy/haproxy.cfg", "ro")}
    assert (ROOT / mounts["/usr/local/etc/haproxy/haproxy.cfg"][0]).resolve() == HAPROXY_CONFIG
    # The api's host port, the variable included, now belongs to the balancer.
    assert [interpolate(p, {}) for p in lb["ports"]] == ["8000:8000"]
    assert [interpolate(p, {"COLDWARM_API_PORT": "9000"}) for p in lb["ports"]] == ["9000:8000"]
    assert lb["depends_on"] == {"api": {"condition": "service_started"}}
    assert lb["restart"] == "unless-stopped"
    # Healthy while a replica answers /readyz through it; busybox wget is the alpine image's client.
    check = healthcheck_command(lb)
    assert check[0] == "wget" and check[-1] == "http://127.0.0.1:8000/readyz"

    # The config listens on the port the compose file publishes, and resolves the api service by name
    # through Docker's embedded DNS, at the port the api serves on.
    config = [line.split() for line in HAPROXY_CONFIG.read_text().splitlines() if line.split()]
    config = [words for words in config if not words[0].startswith("#")]
    (bind,) = [words for words in config if words[0] == "bind"]
    container_port = lb["ports"][0].rsplit(":", 1)[1]
    assert bind[1] in (f":{container_port}", f"*:{container_port}", f"0.0.0.0:{container_port}")
    assert ["nameserver", "docker", "127.0.0.11:53"] in config
    templates = [words for words in config if words[0] == "server-template"]
    assert templates and all(words[3] == "api:8000" for words in templates)
    assert "8000" in declared["api"]["command"]


def test_prometheus_and_grafana_services() -> None:
    declared = services()
    prometheus = declared["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {target: (source, mode) for source, target, mode in volume_mounts(prometheus, {})}
    assert mounts[config_file] == ("./docker/prometheus/prometheus.yml", "ro")
    assert [interpolate(p, {}) for p in prometheus["ports"]] == ["9090:9090"]

    grafana = declared["grafana"]
    mounts = {source: target for source, target, _ in volume_mounts(grafana, {})}
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "coldwarm.yml").read_text())
    (dashboards,) = provider["providers"]
    assert mounts["./docker/grafana/dashboards"] == dashboards["options"]["path"]
    env = environment(grafana)
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboards["options"]["path"] + "/" + DASHBOARD.name
    assert [interpolate(p, {}) for p in grafana["ports"]] == ["3000:3000"]


def test_gpu_profile() -> None:
    declared = services()
    for name in GPU_SERVICES:
        service = declared[name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    trainer, api = declared["trainer-gpu"], declared["api-gpu"]
    assert trainer["entrypoint"] == declared["trainer"]["entrypoint"]
    assert api["command"] == declared["api"]["command"]
    assert api["depends_on"] == {
        "trainer-gpu": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
    }
    # Its own artifacts (the CPU pair runs beside it) and its own host port.
    artifacts = environment(api)["COLDWARM_ARTIFACTS_DIR"]
    trainer_volume = {t: s for s, t, _ in volume_mounts(trainer, {})}[artifacts]
    assert volume_mounts(api, {}) == [(trainer_volume, artifacts, "ro")]
    assert trainer_volume != "artifacts"
    assert [interpolate(p, {}) for p in api["ports"]] == ["8001:8000"]
    # The GPU api runs the tower and the search on the GPU, and says so if it cannot.
    assert environment(api)["COLDWARM_DEVICE"] == "cuda"
    assert "COLDWARM_DEVICE" not in environment(declared["api"])


def test_named_volumes() -> None:
    compose = load_compose()
    declared = set(compose["volumes"])
    assert {"data", "artifacts"} <= declared
    used = set()
    for service in compose["services"].values():
        for source, _, _ in volume_mounts(service, {}):
            if not source.startswith((".", "/", "~")):
                used.add(source)
    assert used == declared, "every named volume declared, every declared one used"


# ----- the cluster profile ---------------------------------------------------------------------------
def cluster_node_command(node: dict[str, Any], variables: dict[str, str]) -> list[str]:
    """The redis-server argument list a node's `sh -c` runs, with `$(hostname)` as the shell gives it."""
    shell, flag, script = node["command"]
    assert (shell, flag) == ("sh", "-c")
    words = shlex.split(interpolate(script, variables).replace("$(hostname)", node["hostname"]))
    assert words[:2] == ["exec", "docker-entrypoint.sh"], "the image's entrypoint keeps its user and defaults"
    return words[2:]


def test_cluster_profile_services() -> None:
    declared = services()
    init = declared["redis-cluster-init"]
    for name in CLUSTER_NODES:
        node = declared[name]
        assert node["hostname"] == name, "a node announces its service name, which Docker's DNS resolves"
        command = cluster_node_command(node, {})
        options = dict(zip(command[1::2], command[2::2], strict=True))
        assert command[0] == "redis-server"
        assert options["--cluster-announce-hostname"] == name
        assert options["--cluster-preferred-endpoint-type"] == "hostname"
        assert options["--cluster-enabled"] == "yes"
        assert options["--cluster-node-timeout"] == "5000"
        assert options["--appendonly"] == "no", "persistence off by default, as for the single Redis"
        assert healthcheck_command(node) == ["redis-cli", "ping"]
        assert init["depends_on"][name] == {"condition": "service_healthy"}
    on = cluster_node_command(declared["redis-node-1"], {"COLDWARM_REDIS_PERSISTENCE": "yes"})
    assert on[on.index("--appendonly") + 1] == "yes"
    env = environment(init)
    assert env["COLDWARM_CLUSTER_NODES"].split() == [f"{name}:6379" for name in CLUSTER_NODES]
    assert init["restart"] == "no", "a one-shot job"
    assert volume_mounts(init, {}) == [("./docker/redis-cluster-init.sh", init["entrypoint"][-1], "ro")]
    # The trainer and the api reach the cluster by the same two settings.
    for name in ("trainer", "api"):
        cluster = {"COLDWARM_REDIS_URL": "redis://redis-node-1:6379/0", "COLDWARM_REDIS_CLUSTER": "true"}
        env = environment(declared[name])
        assert interpolate(env["COLDWARM_REDIS_URL"], cluster) == cluster["COLDWARM_REDIS_URL"]
        assert interpolate(env["COLDWARM_REDIS_CLUSTER"], cluster) == "true"


def test_cluster_profile_forms_a_cluster_on_loopback(tmp_path: Path) -> None:
    """The nodes' own redis-server options and the init script, run without Docker: six nodes on
    loopback ports (named localhost, as the compose nodes are named by their service), formed once,
    and a second run leaves the formed cluster alone."""
    missing = cluster_tools_missing()
    if missing:
        pytest.skip(missing)
    ports = free_ports(6)
    processes = []
    try:
        for port in ports:
            node = {**services()["redis-node-1"], "hostname": "localhost"}
            options = cluster_node_command(node, {})
            (tmp_path / str(port)).mkdir()
            loopback = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path / str(port))]
            processes.append(subprocess.Popen([*options, *loopback], stdout=subprocess.DEVNULL))
        env = {
            **os.environ,
            "COLDWARM_CLUSTER_NODES": " ".join(f"localhost:{port}" for port in ports),
            "COLDWARM_CLUSTER_WAIT_S": "30",
        }
        init = ["sh", str(CLUSTER_INIT_SCRIPT)]
        first = subprocess.run(init, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "cluster ok" in first.stderr
        roles = [redis.Redis(port=port).execute_command("ROLE")[0] for port in ports]
        assert sorted(roles) == [b"master"] * 3 + [b"slave"] * 3
        slots = redis.Redis(port=ports[0]).execute_command("CLUSTER SLOTS")
        assert {node[0] for slot in slots for node in slot[2:]} == {b"localhost"}, "hostnames, not addresses"
        again = subprocess.run(init, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already formed" in again.stderr
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


# ----- Dockerfiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_hadolint(path: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (.ci/install-system-deps installs it from PyPI)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_dockerfile_conventions(path: Path) -> None:
    images = base_images(path)
    assert len(images) >= 2, "multi-stage: a build stage and a runtime stage"
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base {image}"
    runtime = runtime_stage(path)
    user = last(runtime, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"runtime USER must be a non-root numeric id, got {user!r}"
    healthcheck = last(runtime, "HEALTHCHECK")
    assert "CMD" in healthcheck and "/readyz" in healthcheck and "curl" not in healthcheck
    assert last(runtime, "ENTRYPOINT") == '["coldwarm"]'
    assert "8000" in last(runtime, "EXPOSE")
    # Only the build stage installs: the runtime stage copies its virtual environment.
    assert not any(k == "RUN" and "pip install" in a for k, a in runtime)
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    instructions = "\n".join(arguments for _, arguments in dockerfile_instructions(path))
    assert "faiss-gpu-cu12" not in instructions, "no sm_90 code in that wheel: Meta's faiss-gpu instead"
    assert "[dev" not in instructions and ",dev" not in instructions, "runtime dependencies only"
    # The HEALTHCHECK's python one-liner is valid Python.
    command = json.loads(healthcheck[healthcheck.index("[") :])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")


def test_cpu_dockerfile_installs_cpu_torch_and_faiss_cpu() -> None:
    text = DOCKERFILE.read_text()
    assert global_args(DOCKERFILE)["PYTHON_IMAGE"].startswith("python:3.11")
    args = [a for k, a in dockerfile_instructions(DOCKERFILE) if k == "ARG"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    assert "TORCH_VERSION=2.13.0" in args
    assert 'pip install --no-cache-dir ".[serve]"' in text
    assert "faiss-gpu" not in text


def test_gpu_dockerfile_swaps_faiss_cpu_for_faiss_gpu() -> None:
    text = DOCKERFILE_GPU.read_text()
    assert re.fullmatch(
        r"nvidia/cuda:12\.\d+(\.\d+)?-runtime-ubuntu\d\d\.04", base_images(DOCKERFILE_GPU)[-1]
    )
    args = dict(
        a.split("=", 1) for k, a in dockerfile_instructions(DOCKERFILE_GPU) if k == "ARG" and "=" in a
    )
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["TORCH_INDEX_URL"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["FAISS_GPU_VERSION"])
    assert '"faiss-gpu==${FAISS_GPU_VERSION}"' in text
    assert "--exclude faiss-cpu" in text and "pip install --no-cache-dir --no-deps ." in text
    # The requirements that go in instead of the project's own resolution: no faiss-cpu, serve, no dev.
    result = subprocess.run(
        [sys.executable, "docker/project_requirements.py", "--extra", "serve", "--exclude", "faiss-cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    names = {re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower() for line in result.stdout.split()}
    assert "faiss-cpu" not in names and not any(n.startswith("faiss") for n in names)
    assert {"torch", "numpy", "fastapi", "uvicorn", "redis", "prometheus-client"} <= names
    assert "pytest" not in names and "ruff" not in names


def test_dockerignore_keeps_the_context_small_and_complete() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "extend ignored() for exceptions"

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            for prefix in prefixes:
                if fnmatch.fnmatchcase(prefix, pattern) or (
                    pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.split("/")[-1], bare)
                ):
                    return True
        return False

    for excluded in (".venv", ".git", "artifacts", "runs", "cache", "data", "tests/test_compose.py", "x.pt"):
        assert ignored(excluded), excluded
    for path in (DOCKERFILE, DOCKERFILE_GPU):
        for keyword, arguments in dockerfile_instructions(path):
            if keyword == "COPY" and "--from=" not in arguments:
                for source in [w for w in arguments.split() if not w.startswith("--")][:-1]:
                    assert (ROOT / source).exists(), source
                    assert not ignored(source), f"{path.name} copies {source}, which .dockerignore drops"


SHELL_SCRIPTS = [TRAINER_SCRIPT, CLUSTER_INIT_SCRIPT, ROOT / ".ci" / "install-system-deps"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (.ci/install-system-deps installs it)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ----- Prometheus and Grafana -----------------------------------------------------------------------
def api_scrape_job(config: dict[str, Any]) -> dict[str, Any]:
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "coldwarm-api"]
    return job


def test_promtool_check_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; .ci/install-system-deps)")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_api() -> None:
    job = api_scrape_job(yaml.safe_load(PROMETHEUS_CONFIG.read_text()))
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    assert discovery["type"] == "A" and discovery["port"] == 8000
    # The api services' names, each resolving to all of its replicas.
    assert set(discovery["names"]) == {"api", "api-gpu"}
    for name in discovery["names"]:
        assert "8000" in services()[name]["command"]


def test_grafana_datasource_points_at_the_stack_prometheus() -> None:
    provisioned = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (datasource,) = provisioned["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = set(re.findall(r'"uid":\s*"([^"]+)"', json.dumps([dashboard["panels"], dashboard["templating"]])))
    assert uids == {datasource["uid"]}, "every panel and variable uses the provisioned datasource"


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_metric_names()
    assert {
        "coldwarm_requests_total",
        "coldwarm_stage_latency_seconds_bucket",
        "coldwarm_serving_info",
    } <= exported
    queries = dashboard_queries()
    used = set().union(*(metric_names(q) for q in queries))
    assert used, "the dashboard queries no coldwarm metric"
    assert used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"
    # The panels the stack promises.
    required = {
        "coldwarm_requests_total",  # requests per second
        "coldwarm_stage_latency_seconds_bucket",  # latency per stage, p50/p99
        "coldwarm_degraded_answers_total",  # degraded rate
        "coldwarm_gate_cold_weight_bucket",  # gate weights by user group
        "coldwarm_serving_info",  # model and index version
        "coldwarm_index_items",  # index size
    }
    assert required <= used, sorted(required - used)
    joined = "\n".join(queries)
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, stage)" in joined
    assert "by (user_group)" in joined


def test_dashboard_panels_have_unique_ids_and_fit_the_grid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["targets"], panel["title"]


# ----- docker/trainer.sh: its decisions, with a stub coldwarm ---------------------------------------
STUB_COLDWARM = """#!/bin/sh
echo "coldwarm $*" >> "$CALLS"
if [ "$1" = run ]; then
    mkdir -p "$COLDWARM_ARTIFACTS_DIR/m1/index/i1" && echo m1 > "$COLDWARM_ARTIFACTS_DIR/LATEST"
    echo i1 > "$COLDWARM_ARTIFACTS_DIR/m1/index/LATEST"
elif [ "$1" = build-index ]; then
    echo i2 > "$COLDWARM_ARTIFACTS_DIR/m1/index/LATEST"
fi
"""
# The script asks Python (the image's venv) whether Redis holds the namespace; the stub answers
# $FEATURES ("empty" or "loaded"), or fails as an unreachable Redis would when it is "down".
STUB_PYTHON = """#!/bin/sh
cat > /dev/null
if [ "$FEATURES" = down ]; then echo "redis.exceptions.ConnectionError" >&2; exit 1; fi
echo "$FEATURES"
"""


@pytest.fixture()
def stub_trainer(tmp_path: Path) -> Any:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("coldwarm", STUB_COLDWARM), ("python", STUB_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    base = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CALLS": str(calls),
        "COLDWARM_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "COLDWARM_RUN_DIR": str(tmp_path / "runs" / "latest"),
        "COLDWARM_CACHE_DIR": str(tmp_path / "cache"),
        "COLDWARM_REDIS_URL": "redis://redis:6379/0",
        "COLDWARM_DATA": "synthetic",
        "FEATURES": "loaded",
    }

    def run(**overrides: str) -> tuple[int, list[str]]:
        calls.write_text("")
        env = {**base, **overrides}
        env = {k: v for k, v in env.items() if v != "<unset>"}
        result = subprocess.run(
            ["sh", str(TRAINER_SCRIPT)], env=env, capture_output=True, text=True, timeout=30
        )
        return result.returncode, calls.read_text().splitlines()

    return run


def test_trainer_script_trains_once_and_then_skips(stub_trainer: Any) -> None:
    code, calls = stub_trainer()
    assert code == 0
    assert calls[0].startswith("coldwarm run --data synthetic --run-dir ") and calls[0].endswith(
        " --no-serve"
    )
    assert calls[1:] == ["coldwarm load-features --data synthetic"], "features after every training"
    # A restart: artifacts complete and Redis holding the features -> nothing at all.
    assert stub_trainer() == (0, [])
    # Redis restarted without persistence: the features only.
    assert stub_trainer(FEATURES="empty") == (0, ["coldwarm load-features --data synthetic"])
    assert stub_trainer(COLDWARM_RELOAD_FEATURES="true") == (0, ["coldwarm load-features --data synthetic"])
    # COLDWARM_RETRAIN=1: the whole job again.
    code, calls = stub_trainer(COLDWARM_RETRAIN="1")
    assert code == 0 and [c.split(" --run-dir")[0] for c in calls] == [
        "coldwarm run --data synthetic",
        "coldwarm load-features --data synthetic",
    ]


def test_trainer_script_builds_a_missing_index(stub_trainer: Any, tmp_path: Path) -> None:
    stub_trainer()
    (tmp_path / "artifacts" / "m1" / "index" / "LATEST").unlink()
    assert stub_trainer() == (0, ["coldwarm build-index --data synthetic"])
    assert stub_trainer() == (0, [])


def test_trainer_script_data_options(stub_trainer: Any, tmp_path: Path) -> None:
    code, calls = stub_trainer(COLDWARM_DATA="movielens-1m")
    ml = f"{tmp_path / 'cache'}/ml-1m"
    assert code == 0 and calls[0] == "coldwarm data fetch movielens-1m"
    assert calls[1].startswith(f"coldwarm run --data {ml} --run-dir")
    assert calls[2] == f"coldwarm load-features --data {ml}"

    shutil.rmtree(tmp_path / "artifacts")
    code, calls = stub_trainer(
        COLDWARM_DATA="/d/r.csv",
        COLDWARM_USERS_FILE="/d/u.csv",
        COLDWARM_ITEMS_FILE="",
        COLDWARM_EVAL_MODELS="ease",
    )
    assert code == 0
    assert calls[0].startswith("coldwarm run --data /d/r.csv --users /d/u.csv --run-dir ")
    assert calls[0].endswith(" --models ease --no-serve")
    assert calls[1] == "coldwarm load-features --data /d/r.csv --users /d/u.csv"


def test_trainer_script_fails_when_redis_is_down(stub_trainer: Any) -> None:
    stub_trainer()
    code, calls = stub_trainer(FEATURES="down")
    assert code != 0 and calls == [], "an unreachable Redis must fail the job, not skip the features"
    # Without COLDWARM_REDIS_URL there is nothing to load (and nothing to ask).
    assert stub_trainer(FEATURES="down", COLDWARM_REDIS_URL="<unset>") == (0, [])


# ----- the trainer and api commands of docker-compose.yml, run here ---------------------------------
def test_redis_command_runs_with_the_redis_client_server(tmp_path: Path) -> None:
    """The compose redis command, default and with persistence on, on a local redis-server."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no redis-server binary")
    for variables, appendonly in (({}, "no"), ({"COLDWARM_REDIS_PERSISTENCE": "yes"}, "yes")):
        command = [interpolate(word, variables) for word in services()["redis"]["command"]]
        port = free_port()
        data = tmp_path / appendonly
        data.mkdir()
        process = subprocess.Popen(
            [server, *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
            assert client.config_get("appendonly") == {"appendonly": appendonly}
            assert client.config_get("save") == {"save": ""}
            client.close()
        finally:
            process.terminate()
            process.wait(timeout=10)


class Container:
    """One compose service's process as it would run in its container, translated to this machine:
    its volumes are directories under ``root`` (shared by services mounting the same volume), the image's
    WORKDIR a directory of its own, the image's venv this interpreter's, redis:6379 the local Redis."""

    def __init__(self, name: str, root: Path, variables: dict[str, str]) -> None:
        self.service = services()[name]
        self.dockerfile = ROOT / self.service["build"]["dockerfile"]
        self.variables = variables
        self.paths = {
            target: root / "volumes" / source for source, target, _ in volume_mounts(self.service, variables)
        }
        workdir = last(runtime_stage(self.dockerfile), "WORKDIR")
        self.paths.setdefault(workdir, root / f"workdir-{name}")
        for path in self.paths.values():
            path.mkdir(parents=True, exist_ok=True)
        self.workdir = self.paths[workdir]

    def local(self, value: str) -> str:
        for target in sorted(self.paths, key=len, reverse=True):
            if value == target or value.startswith(target + "/"):
                return str(self.paths[target]) + value[len(target) :]
        return value.replace("redis://redis:6379", f"redis://{REDIS_HOST}:{REDIS_PORT}")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLDWARM_")}
        for name, value in image_environment(self.dockerfile).items():
            if name != "PATH":
                env[name] = self.local(value)
        for name, value in environment(self.service).items():
            if value is None:  # passed through from the shell, when set there
                if name in self.variables:
                    env[name] = self.variables[name]
            else:
                env[name] = self.local(interpolate(value, self.variables))
        # The image puts its venv first on PATH; here that is the venv running the tests.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        return env

    def command(self) -> list[str]:
        """entrypoint + command, compose's over the image's, with installed scripts mapped to the repo's."""
        runtime = runtime_stage(self.dockerfile)
        entrypoint = self.service.get("entrypoint") or json.loads(last(runtime, "ENTRYPOINT"))
        command = self.service.get("command") or json.loads(last(runtime, "CMD"))
        if "entrypoint" in self.service and "command" not in self.service:
            command = []  # compose: a service's entrypoint drops the image's CMD
        words = [interpolate(word, self.variables) for word in [*entrypoint, *command]]
        if words[0].startswith("/"):
            words = ["sh", str(installed_script(self.dockerfile, words[0])), *words[1:]]
        return [self.local(word) for word in words]


@pytest.mark.slow
def test_trainer_then_api_commands_from_compose(tmp_path: Path, redis_client: redis.Redis) -> None:
    from model.data.loading import load_dataset
    from service.feature_store import KeyLayout

    prefix = f"coldwarm-compose-test-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    # The variables an operator would set in the shell (or .env) for a small run.
    variables = {
        "COLDWARM_DATA": TEST_DATA,
        "COLDWARM_KEY_PREFIX": prefix,
        "COLDWARM_ADMIN_TOKEN": token,
        "COLDWARM_REDIS_TIMEOUT_MS": "2000",  # two busy shared cores: no scheduling hiccup may degrade
        **TINY_TRAINING,
    }
    layout = KeyLayout(prefix)
    api_process = None
    try:
        trainer = Container("trainer", tmp_path, variables)
        env = trainer.env()
        assert env["COLDWARM_REDIS_URL"] == f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
        artifacts = Path(env["COLDWARM_ARTIFACTS_DIR"])
        assert artifacts.is_relative_to(tmp_path)

        result = subprocess.run(
            trainer.command(), cwd=trainer.workdir, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-5000:]
        version = (artifacts / "LATEST").read_text().strip()
        assert (artifacts / version / "index" / "LATEST").is_file()
        assert (Path(env["COLDWARM_RUN_DIR"]) / "report" / "report.json").is_file()
        data = load_dataset(TEST_DATA)
        user_keys = [
            k for k in redis_client.scan_iter(match=layout.pattern(), count=1000) if k.endswith(b":user")
        ]
        assert len(user_keys) == data.users["user_id"].nunique()

        # A restart of the stack: the trainer finds the artifacts and the features, and trains nothing.
        again = subprocess.run(
            trainer.command(), cwd=trainer.workdir, env=env, capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0, again.stderr[-5000:]
        assert "not retraining" in again.stderr and "not reloading" in again.stderr, again.stderr
        assert (artifacts / "LATEST").read_text().strip() == version
        assert "training on" not in again.stderr

        # The api, on a free loopback port instead of 0.0.0.0:8000.
        api = Container("api", tmp_path, variables)
        port = free_port()
        command = api.command()
        assert command[:2] == ["coldwarm", "serve"]
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(port)
        api_env = api.env()
        assert api_env["COLDWARM_ARTIFACTS_DIR"] == str(artifacts), "the api serves the trainer's volume"
        api_log = (tmp_path / "api.log").open("w")
        api_process = subprocess.Popen(
            command, cwd=api.workdir, env=api_env, stdout=api_log, stderr=subprocess.STDOUT, text=True
        )
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert api_process.poll() is None, (tmp_path / "api.log").read_text()[-5000:]
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the api did not become ready"
                time.sleep(0.25)
            ready = client.get("/readyz").json()
            assert ready["model_version"] == version and ready["feature_store"]["kind"] == "redis"

            # The compose healthcheck command, pointed at this port, passes.
            check = [word.replace(":8000/", f":{port}/") for word in healthcheck_command(api.service)]
            assert subprocess.run(check, env=api_env, timeout=30).returncode == 0

            user_id = int(data.users["user_id"].iloc[0])
            response = client.post("/recommend", json={"user_id": user_id, "k": 10})
            assert response.status_code == 200, response.text
            answer = response.json()
            assert len(answer["items"]) == 10 and answer["degraded"] is False
            assert answer["model_version"] == version

            # The README's hot reload, with the token compose passes to the api.
            reload = client.post("/admin/reload", headers={"Authorization": f"Bearer {token}"})
            assert reload.status_code == 200 and reload.json()["model_version"] == version
        api_process.send_signal(signal.SIGTERM)
        # docker stop: uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
        assert api_process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Finished server process" in (tmp_path / "api.log").read_text()
    finally:
        if api_process is not None and api_process.poll() is None:
            api_process.kill()
            api_process.wait(timeout=30)
        keys = list(redis_client.scan_iter(match=layout.pattern(), count=1000))
        if keys:
            redis_client.delete(*keys)
