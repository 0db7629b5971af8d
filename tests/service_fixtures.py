"""Shared fixtures of the service tests: a tiny trained Cold & Warm Net exported twice (versions A and
B, each with a flat index), the real Redis on 127.0.0.1:6379 with one key prefix per test, and a real
uvicorn server running ``create_app`` in a background thread.

Test modules register this module with ``pytest_plugins = ["service_fixtures"]`` (one registration per
session, so the session fixtures run once) and import the helpers by name. The expensive work is also
cached at module level, so that a module importing a fixture by name (which pytest registers once per
importing module) still trains the models only once per process.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import redis
import torch
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from index_builder.build import build_index_artifacts
from index_builder.settings import IndexSettings
from model.artifacts import data_fingerprint, load_artifacts
from model.data.schema import PROFILE_FIELDS, InteractionData
from model.data.split import UserSplit, split_users
from model.data.synthetic import generate_synthetic
from model.export import export_model
from model.features import FeatureEncoder
from model.nn.two_tower import TwoTowerNet
from model.settings import FeatureConfig, ModelConfig, TrainConfig
from model.train import TrainingContext, fit_cold_warm_net
from service.app import create_app
from service.engine import ServingBundle, load_bundle
from service.feature_store import KeyLayout
from service.feature_store.loader import bulk_load
from service.settings import ServiceSettings

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
# Nothing listens on port 1: connections are refused at once.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
# Generous: the machine has 2 shared cores, and the default 20 ms would turn a scheduling hiccup into
# a degraded answer in tests that assert degraded is false. The degraded path has its own test.
TEST_REDIS_TIMEOUT_MS = 2000.0
TEST_MAX_QUEUE_MS = 60_000.0

DATA_SEED = 11
N_USERS, N_ITEMS = 300, 200
# Users from 5 actions up: the API tests need users with fewer than 10 (a cold-start answer), which the
# generator's default range (20-150) has none of.
INTERACTIONS_PER_USER = (5, 120)
# Mean pooling in the warm expert, and experts that read the profile alone: these artifacts are trained
# for one epoch on tiny data, where the default attention pooling has not yet overtaken it, and the gate
# tests (test_returning_user) need a gate that already prefers the warm expert for a warm user (experts
# that read the interaction count leave the gate little to tell apart after one epoch). The defaults'
# export and parity are covered by tests/test_export.py.
MODEL_CONFIG = ModelConfig(
    embedding_dim=16,
    hidden_dim=32,
    feature_dim=8,
    n_user_groups=4,
    warm_pooling="mean",
    expert_state_input=False,
)
TRAIN_CONFIG = TrainConfig(
    epochs=1, pretrain_epochs=1, batch_size=256, shared_negatives=256, active_users=100, seed=0
)
SEED_A, SEED_B = 0, 1


# ----- model artifacts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Version:
    """One exported model: its artifacts version directory, versions, and the eager net it came from."""

    directory: Path
    model_version: str
    index_version: str
    net: TwoTowerNet


@dataclass(frozen=True)
class ServingArtifacts:
    data: InteractionData
    split: UserSplit
    encoder: FeatureEncoder  # the fitted encoder training used (the artifacts hold a saved copy)
    root: Path  # artifacts root holding both versions (LATEST names B)
    a: Version
    b: Version

    @property
    def catalog(self) -> np.ndarray:
        return self.encoder.catalog_item_ids

    @property
    def max_history(self) -> int:
        return self.encoder.config.max_history


_CACHE: dict[str, Any] = {}


def _export_version(context: TrainingContext, seed: int, root: Path) -> Version:
    trained = fit_cold_warm_net(
        context, MODEL_CONFIG, TRAIN_CONFIG.model_copy(update={"seed": seed}), progress=False
    )
    trained.net.eval()
    data = context.data
    directory = export_model(trained, root, data_fingerprint(data), data.name)
    index_dir = build_index_artifacts(directory, data=data)
    model_version = load_artifacts(directory).version
    return Version(directory, model_version, index_dir.name, trained.net)


def build_serving_artifacts(root: Path) -> ServingArtifacts:
    # One intra-op thread: on 2 shared cores more threads only fight each other (minutes instead of
    # seconds); the service's lifespan sets 1 as well.
    torch.set_num_threads(1)
    data = generate_synthetic(
        n_users=N_USERS, n_items=N_ITEMS, interactions_per_user=INTERACTIONS_PER_USER, seed=DATA_SEED
    )
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig())
    context = TrainingContext.build(data, split, encoder, TRAIN_CONFIG)
    a = _export_version(context, SEED_A, root)
    b = _export_version(context, SEED_B, root)
    assert a.model_version != b.model_version and a.index_version != b.index_version
    return ServingArtifacts(data, split, encoder, root, a, b)


@pytest.fixture(scope="session")
def serving_artifacts(tmp_path_factory: pytest.TempPathFactory) -> ServingArtifacts:
    if "artifacts" not in _CACHE:
        _CACHE["artifacts"] = build_serving_artifacts(tmp_path_factory.mktemp("service-artifacts"))
    return _CACHE["artifacts"]


@pytest.fixture(scope="session")
def bundle_a(serving_artifacts: ServingArtifacts) -> ServingBundle:
    """Version A as the service loads it (TorchScript tower, saved encoder, flat index)."""
    if "bundle_a" not in _CACHE:
        _CACHE["bundle_a"] = load_bundle(serving_artifacts.a.directory, IndexSettings(type="flat"))
    return _CACHE["bundle_a"]


def user_profile(data: InteractionData, user_id: int) -> dict[str, str]:
    """The user's non-empty profile fields, as the feature store holds them."""
    row = data.users[data.users["user_id"] == user_id]
    if row.empty:
        return {}
    values = {name: row.iloc[0][name] for name in PROFILE_FIELDS}
    return {name: str(value) for name, value in values.items() if not pd.isna(value) and str(value) != ""}


def users_by_length(data: InteractionData) -> pd.Series:
    """Interactions per user, ascending."""
    return data.interactions.groupby("user_id").size().sort_values(kind="stable")


# ----- Redis --------------------------------------------------------------------------------------
def delete_namespace(client: redis.Redis, layout: KeyLayout) -> None:
    keys = list(client.scan_iter(match=layout.pattern(), count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture()
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test alone; every key under it is deleted afterwards."""
    prefix = f"coldwarm-service-test-{uuid.uuid4().hex}"
    yield prefix
    delete_namespace(redis_client, KeyLayout(prefix))


def load_users(client: redis.Redis, prefix: str, artifacts: ServingArtifacts) -> KeyLayout:
    """Every user of the data set into ``prefix``, at the cap the service reads (the encoder's)."""
    layout = KeyLayout(prefix)
    stats = bulk_load(client, layout, artifacts.data, cap=artifacts.max_history, progress=False)
    assert stats.users == N_USERS
    return layout


def stored_actions(client: redis.Redis, layout: KeyLayout, user_id: int) -> list[int]:
    return [int(raw) for raw in client.lrange(layout.actions_key(user_id), 0, -1)]


def stored_count(client: redis.Redis, layout: KeyLayout, user_id: int) -> int:
    raw = client.hget(layout.user_key(user_id), "count")
    return 0 if raw is None else int(raw)


def service_settings(artifacts_dir: Path, key_prefix: str, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "artifacts_dir": artifacts_dir,
        "redis_url": REDIS_URL,
        "redis_timeout_ms": TEST_REDIS_TIMEOUT_MS,
        "key_prefix": key_prefix,
        "admin_token": None,
        # Generous for the same reason: tests that fire bursts assert answers that are not shed.
        "max_queue_ms": TEST_MAX_QUEUE_MS,
    }
    values.update(overrides)
    return ServiceSettings(**values)


# ----- a real server --------------------------------------------------------------------------------
@dataclass
class LiveServer:
    url: str
    client: httpx.Client
    settings: ServiceSettings
    app: FastAPI  # for tests that look inside (app.state.coldwarm once started)

    def recommend(self, **body: Any) -> httpx.Response:
        return self.client.post("/recommend", json=body)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = self.client.get("/metrics")
        assert response.status_code == 200
        return parse_metrics(response.text)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The value of one sample; 0 when the labelled child was never created (a counter never hit)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _free_socket() -> socket.socket:
    # Binding port 0 and handing the bound socket to uvicorn leaves no window for another process to
    # take the port between choosing and listening.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def live_server(
    settings: ServiceSettings, startup_timeout_s: float = 60.0, **app_kwargs: Any
) -> Iterator[LiveServer]:
    """``create_app(settings)`` served by uvicorn on a free port in a background thread."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    app = create_app(settings, **app_kwargs)
    config = uvicorn.Config(
        app=app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {startup_timeout_s}s")
            time.sleep(0.02)
        with httpx.Client(base_url=url, timeout=30.0) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            yield LiveServer(url, client, settings, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not shut down"


@contextmanager
def one_request_queued(server: LiveServer) -> Iterator[list[httpx.Response]]:
    """The model thread held busy and one /recommend queued behind it, so that the next request finds
    a queue; on exit the thread is freed and the queued request's answer is in the yielded list."""
    recommender = server.app.state.coldwarm.recommender
    free = threading.Event()
    recommender.batcher.executor.submit(free.wait)
    answers: list[httpx.Response] = []
    queued = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{server.url}/recommend", json={"user_id": 1, "k": 5}))
    )
    queued.start()
    deadline = time.monotonic() + 10
    while recommender.pending < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield answers
    finally:
        free.set()
        queued.join(timeout=10)
