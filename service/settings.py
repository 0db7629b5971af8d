"""Service configuration: ``COLDWARM_``-prefixed environment variables.

The index search parameters (nprobe, efSearch) are ``IndexSettings`` (``COLDWARM_INDEX_*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.feature_store.records import DEFAULT_CAP


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COLDWARM_", env_nested_delimiter="__", extra="ignore")

    artifacts_dir: Path = Field(Path("artifacts"), description="artifacts root (with LATEST) or version dir")
    redis_url: str | None = Field(None, description="e.g. redis://127.0.0.1:6379/0; unset: in-process store")
    redis_cluster: bool = Field(
        False,
        description="COLDWARM_REDIS_URL names a node of a Redis Cluster: the store uses redis-py's "
        "RedisCluster (one MULTI per slot, scripts routed by their keys)",
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="replicas that must have an event (Redis WAIT) before /events acknowledges it; 0: "
        "acknowledged once the master has it",
    )
    redis_wait_timeout_ms: int = Field(
        50, ge=1, description="how long an event waits for those replicas before it is answered 503"
    )
    redis_timeout_ms: float = Field(
        100.0,
        gt=0,
        description="per-call Redis budget before degrading (includes waiting for the event loop)",
    )
    max_event_skew_s: int = Field(
        86_400, ge=0, description="how far in the future an event timestamp may lie"
    )
    max_request_time_skew_s: int = Field(
        60, ge=0, description="how far ahead of the wall clock a /recommend request_time may lie (clock skew)"
    )
    redis_max_connections: int = Field(64, ge=1)
    require_feature_marker: bool = Field(
        True,
        description="a Redis store must hold the marker `coldwarm load-features` writes after a load: "
        "without it (a Redis restarted without persistence, flushed, never loaded) answers are flagged "
        "degraded (feature_store_empty) and /readyz is 503; off for deployments that start from an "
        "empty store on purpose. The in-process store never needs one",
    )
    feature_marker_check_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="seconds between two reads of the load marker (in the background: requests read a "
        "flag); answers may go out unflagged for this long after the store lost its data",
    )
    key_prefix: str = "coldwarm"
    key_schema_version: int = 1
    access_log: bool = Field(
        True,
        description="uvicorn's access log, one line per request on stderr; off where a load balancer or "
        "the /metrics counters already account for the requests, and its cost on the event loop is not "
        "wanted (`coldwarm serve`)",
    )
    torch_threads: int = Field(1, ge=1, description="intra-op threads of the user tower")
    faiss_threads: int = Field(1, ge=1, description="OpenMP threads of one search; more hurts latency")
    # SecretStr: the token never appears in a repr, a log line or a traceback of the settings.
    admin_token: SecretStr | None = Field(None, description="bearer token of /admin/*; unset disables them")
    write_token: SecretStr | None = Field(
        None, description="bearer token of POST /events and the profile write; unset: open"
    )
    read_token: SecretStr | None = Field(
        None,
        description="bearer token of GET /users/{id} (the write token works too); unset: the write "
        "token guards it when set, else open",
    )
    history_cap: int = Field(
        DEFAULT_CAP,
        ge=1,
        description="actions kept per user when no model could be loaded at start-up (else the model's)",
    )
    max_body_bytes: int = Field(
        256 * 1024, ge=1024, description="larger request bodies are refused with 413 before being read"
    )
    max_queue_ms: float = Field(
        25.0,
        ge=0,
        description="expected wait for the model beyond which /recommend sheds load (a degraded answer)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the user tower runs (auto: CUDA when torch sees a GPU); the search follows "
        "COLDWARM_INDEX_SEARCH_BACKEND",
    )
    tower_format: Literal["auto", "torchscript", "aoti"] = Field(
        "auto",
        description="auto: the artifacts' AOTInductor package for this device when one loads and agrees "
        "with TorchScript (faster), else TorchScript; aoti: the package or refuse the artifacts",
    )
    max_batch: int = Field(
        64,
        ge=1,
        description="requests computed in one model call, at most (1: no batching); whatever waits when "
        "the model thread frees up is taken, up to this many",
    )
    batch_wait_us: float = Field(
        0.0,
        ge=0,
        le=1_000_000,
        description="microseconds the model thread waits for more requests before a batch that is not "
        "full; 0 takes what is there (adds no latency at low load)",
    )


def redacted_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages: in the user part
    (redis://user:secret@host) and in the query (redis://host/0?password=secret), the two places
    redis-py reads one from."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = f"{parts.username}:" if parts.username else ":"
        host = parts.hostname or ""
        parts = parts._replace(netloc=f"{user}***@{host}" + (f":{parts.port}" if parts.port else ""))
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(name.lower() == "password" for name, _ in pairs):
            hidden = [(name, "***" if name.lower() == "password" else value) for name, value in pairs]
            parts = parts._replace(query=urlencode(hidden, safe="*"))
    return urlunsplit(parts)
