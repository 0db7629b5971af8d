"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from service.feature_store.records import EVENT_ID_PATTERN, EVENT_IDS_KEPT

# Users one POST /recommend/batch may ask for: a feed backend's fan-out or precompute chunk, small
# enough that one call holds the model thread for a few milliseconds, not for seconds.
MAX_BATCH_USERS = 1000

# Ids are 64-bit integers in every feed backend we serve; reject what would overflow FAISS's int64.
UserId = Field(ge=0, le=2**63 - 1, description="the user's 64-bit integer id")


class StrictModel(BaseModel):
    # Strict: "42" or true is not a user id; a client sending them has a bug worth a 422.
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(StrictModel):
    user_id: int = UserId
    k: int = Field(50, ge=1, le=1000, description="number of items to return")
    exclude_seen: bool = Field(True, description="drop the items in the user's recent actions")
    exclude_items: list[int] | None = Field(None, max_length=10_000, description="more item ids to drop")
    request_time: int | None = Field(
        None,
        ge=0,
        description="Unix seconds: the moment the recommendation is for, used as 'now' by the state "
        "features (days since the first and the last action); for replays, backfills and shadow "
        "traffic. Default: the wall clock. Not in the future.",
    )


class ScoredItem(BaseModel):
    item_id: int
    score: float


class GateWeights(BaseModel):
    cold: float
    warm: float


class Latency(BaseModel):
    features: float
    queue: float = Field(0.0, description="waiting for the model thread (dynamic batching)")
    model: float
    search: float
    total: float


class RecommendResponse(BaseModel):
    user_id: int
    items: list[ScoredItem]
    user_group: str
    gate: GateWeights
    model_version: str
    index_version: str
    degraded: bool
    degraded_reason: str | None = None
    latency_ms: Latency


class BatchRecommendRequest(StrictModel):
    # Left to right: an entry is a RecommendRequest when it validates as one, else kept as sent, so that
    # the route answers it with its own error instead of refusing the whole batch.
    requests: list[Annotated[RecommendRequest | Any, Field(union_mode="left_to_right")]] = Field(
        min_length=1,
        max_length=MAX_BATCH_USERS,
        description=f"up to {MAX_BATCH_USERS} requests, each a /recommend body; an invalid one is answered "
        "with its own error and does not fail the others",
    )


class BatchEntryError(BaseModel):
    index: int = Field(description="position of the request in the batch")
    status: int = Field(description="the HTTP status /recommend would have answered this request with")
    message: str
    detail: Any = None


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse | BatchEntryError] = Field(
        description="one per request, in order: its answer, or its error"
    )
    batch_latency_ms: Latency


class EventRequest(StrictModel):
    user_id: int = UserId
    item_id: int = Field(ge=0, le=2**63 - 1)
    timestamp: int | None = Field(None, ge=0, description="Unix seconds; default: now")
    event_id: str | None = Field(
        None,
        pattern=EVENT_ID_PATTERN,
        description=f"idempotency key: a retry with the id of one of the user's last {EVENT_IDS_KEPT} events "
        "is not counted again (send one to retry safely after a 503 or a lost answer)",
    )


class UserState(BaseModel):
    user_id: int
    interaction_count: int
    first_timestamp: int | None
    last_timestamp: int | None
    recent_items: list[int]
    user_group: str


class ProfileRequest(StrictModel):
    gender: str | None = Field(None, max_length=64)
    age: str | None = Field(None, max_length=64)
    occupation: str | None = Field(None, max_length=64)
    zip_code: str | None = Field(None, max_length=64)


class ProfileResponse(BaseModel):
    user_id: int
    profile: dict[str, str]


class ReloadRequest(StrictModel):
    artifacts_dir: str | None = Field(
        None,
        max_length=4096,
        description="a version directory (its name, or a path) inside the configured artifacts root; "
        "default: the configured directory again (its LATEST when it is a root)",
    )


class ReloadResponse(BaseModel):
    model_version: str
    index_version: str
    n_items: int
