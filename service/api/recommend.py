"""POST /recommend: top-K items for a user, from whatever the feature store knows of them now."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from model.evaluation.protocol import user_group
from service.engine import NotLoadedError, OverloadedError
from service.errors import documented
from service.feature_store import FeatureStoreError, UserRecord
from service.schemas import RecommendRequest, RecommendResponse
from service.state import ServiceState, State

router = APIRouter(tags=["recommend"])


async def read_user(state: ServiceState, user_id: int) -> tuple[UserRecord, str | None]:
    """The user's record, or an empty (cold-start) one and the reason when the store fails."""
    try:
        [record] = await state.store.get_users([user_id])
        return record, None
    except FeatureStoreError as error:
        state.metrics.redis_errors.labels("get_users").inc()
        return UserRecord.unknown(user_id), f"feature_store_{error.reason}"


def request_time(body: RecommendRequest, state: ServiceState) -> int:
    """The 'now' of the state features: the request's own time (replays, backfills), else the clock."""
    wall_clock = int(time.time())
    if body.request_time is None:
        return wall_clock
    if body.request_time > wall_clock + state.settings.max_request_time_skew_s:
        # A future "now" would shrink every user's gaps to nothing, or below zero: refuse it.
        raise HTTPException(
            422, f"request_time {body.request_time} is in the future: send Unix seconds, at most now"
        )
    return body.request_time


@router.post("/recommend", response_model=RecommendResponse, responses=documented(413, 422, 503))
async def recommend(body: RecommendRequest, state: State, request: Request) -> Response:
    started = time.perf_counter()
    now = request_time(body, state)
    record, degraded_reason = await read_user(state, body.user_id)
    features_seconds = time.perf_counter() - started
    exclude = set(body.exclude_items or ())
    if body.exclude_seen:
        exclude.update(record.actions)
    try:
        result = await state.recommender.recommend(record, now, body.k, exclude)
    except OverloadedError:
        result, degraded_reason = state.recommender.shed(body.k, exclude), "overloaded"
    except NotLoadedError as error:
        raise HTTPException(503, f"not ready: {error}") from error
    total_seconds = time.perf_counter() - started

    group = user_group(record.count)
    request.state.user_group = group
    metrics = state.metrics
    for stage, seconds in (
        ("features", features_seconds),
        ("model", result.model_seconds),
        ("search", result.search_seconds),
        ("total", total_seconds),
    ):
        metrics.stage_latency.labels(stage).observe(seconds)
    metrics.gate_cold_weight.labels(group).observe(result.gate_cold)
    if degraded_reason:
        metrics.degraded.labels(degraded_reason).inc()
    # Built as plain data and serialised by orjson: validating our own output again costs more than
    # the model. The body follows RecommendResponse, which the route declares for the OpenAPI schema.
    body_out = {
        "user_id": body.user_id,
        "items": [{"item_id": i, "score": s} for i, s in zip(result.item_ids, result.scores, strict=True)],
        "user_group": group,
        "gate": {"cold": result.gate_cold, "warm": result.gate_warm},
        "model_version": result.model_version,
        "index_version": result.index_version,
        "degraded": degraded_reason is not None,
        "degraded_reason": degraded_reason,
        "latency_ms": {
            "features": features_seconds * 1e3,
            "model": result.model_seconds * 1e3,
            "search": result.search_seconds * 1e3,
            "total": total_seconds * 1e3,
        },
    }
    return Response(orjson.dumps(body_out), media_type="application/json")
