"""POST /recommend and POST /recommend/batch: top-K items for users, from what the store knows of them now.

Both run the same steps: read the users' records (one store call), turn each request into a
``RecommendQuery``, hand the queries to the recommender (batched on its model thread), and answer
each with its items, gate and latencies. An overload, a store failure or a store that lost its data
(no load marker) degrades answers; it never fails them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydantic import ValidationError

from model.evaluation.protocol import user_group
from service.engine import NotLoadedError, OverloadedError, Recommendation, RecommendQuery
from service.errors import documented, render_error, validation_detail, validation_message, without_paths
from service.feature_store import FeatureStoreError, UserRecord
from service.feature_store.marker import FEATURE_STORE_EMPTY
from service.metrics import ServiceMetrics
from service.schemas import BatchRecommendRequest, BatchRecommendResponse, RecommendRequest, RecommendResponse
from service.state import ServiceState, State

router = APIRouter(tags=["recommend"])
log = logging.getLogger(__name__)


class EntryError(Exception):
    """One request of a batch cannot be answered; the others can."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail if detail is not None else message


@dataclass(frozen=True)
class Served:
    """One answered request: what the body and the metrics are built from."""

    user_id: int
    record: UserRecord
    result: Recommendation
    degraded_reason: str | None


async def read_users(state: ServiceState, user_ids: Sequence[int]) -> tuple[list[UserRecord], str | None]:
    """The users' records (one store call), or empty (cold-start) ones and the reason when the store fails;
    records read from a store that lost its data come with the reason "feature_store_empty"."""
    try:
        records = await state.store.get_users(user_ids)
    except FeatureStoreError as error:
        state.metrics.redis_errors.labels("get_users").inc()
        return [UserRecord.unknown(u) for u in user_ids], f"feature_store_{error.reason}"
    # A flag the marker watch keeps, not a read of the marker: requests cost no extra round trip.
    return records, FEATURE_STORE_EMPTY if state.marker_watch.empty else None


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


def query_of(body: RecommendRequest, record: UserRecord, now: int) -> RecommendQuery:
    exclude = set(body.exclude_items or ())
    if body.exclude_seen:
        exclude.update(record.actions)
    return RecommendQuery(record, now, body.k, exclude)


async def serve(
    state: ServiceState,
    bodies: Sequence[RecommendRequest],
    nows: Sequence[int],
    records: Sequence[UserRecord],
    store_reason: str | None,
) -> list[Served | BaseException]:
    """Each request's answer from the model, or its shed (cold-start) answer when the model is
    overloaded, or the error computing it raised."""
    queries = [query_of(body, record, now) for body, record, now in zip(bodies, records, nows, strict=True)]
    recommender = state.recommender
    try:
        outcomes = await recommender.recommend_many(queries)
    except OverloadedError:
        shed = [recommender.shed(q.k, q.exclude) for q in queries]
        return [
            Served(b.user_id, r, result, "overloaded")
            for b, r, result in zip(bodies, records, shed, strict=True)
        ]
    except NotLoadedError as error:
        raise HTTPException(503, f"not ready: {without_paths(str(error))}") from error
    return [
        outcome if isinstance(outcome, BaseException) else Served(body.user_id, record, outcome, store_reason)
        for body, record, outcome in zip(bodies, records, outcomes, strict=True)
    ]


def observe(metrics: ServiceMetrics, served: Served, stages: dict[str, float] | None) -> None:
    if stages is not None:
        for stage, seconds in stages.items():
            metrics.stage(stage).observe(seconds)
    metrics.gate(user_group(served.record.count)).observe(served.result.gate_cold)
    if served.degraded_reason:
        metrics.degraded.labels(served.degraded_reason).inc()


def stage_seconds(result: Recommendation, features_seconds: float, total_seconds: float) -> dict[str, float]:
    return {
        "features": features_seconds,
        "queue": result.queue_seconds,
        "model": result.model_seconds,
        "search": result.search_seconds,
        "total": total_seconds,
    }


def answer_body(served: Served, latency: dict[str, float]) -> dict[str, Any]:
    # Built as plain data and serialised by orjson: validating our own output again costs more than
    # the model. The body follows RecommendResponse, which the routes declare for the OpenAPI schema.
    result = served.result
    return {
        "user_id": served.user_id,
        "items": [{"item_id": i, "score": s} for i, s in zip(result.item_ids, result.scores, strict=True)],
        "user_group": user_group(served.record.count),
        "gate": {"cold": result.gate_cold, "warm": result.gate_warm},
        "model_version": result.model_version,
        "index_version": result.index_version,
        "degraded": served.degraded_reason is not None,
        "degraded_reason": served.degraded_reason,
        "latency_ms": {stage: seconds * 1e3 for stage, seconds in latency.items()},
    }


@router.post("/recommend", response_model=RecommendResponse, responses=documented(413, 422, 503))
async def recommend(body: RecommendRequest, state: State, request: Request) -> Response:
    started = time.perf_counter()
    now = request_time(body, state)
    [record], store_reason = await read_users(state, [body.user_id])
    features_seconds = time.perf_counter() - started
    [served] = await serve(state, [body], [now], [record], store_reason)
    if isinstance(served, BaseException):
        raise served
    stages = stage_seconds(served.result, features_seconds, time.perf_counter() - started)
    request.state.user_group = user_group(record.count)
    observe(state.metrics, served, stages)
    return Response(orjson.dumps(answer_body(served, stages)), media_type="application/json")


def entry_body(index: int, error: EntryError) -> dict[str, Any]:
    return {"index": index, "status": error.status, "message": error.message, "detail": error.detail}


def parse_entry(entry: Any, state: ServiceState) -> tuple[RecommendRequest, int]:
    """A batch entry as a /recommend body and its 'now', or the EntryError /recommend would answer."""
    try:
        body = entry if isinstance(entry, RecommendRequest) else RecommendRequest.model_validate(entry)
    except ValidationError as error:
        errors = [dict(e) for e in error.errors()]
        raise EntryError(422, validation_message(errors), validation_detail(errors)) from error
    try:
        return body, request_time(body, state)
    except HTTPException as error:
        raise EntryError(error.status_code, str(error.detail)) from error


@router.post("/recommend/batch", response_model=BatchRecommendResponse, responses=documented(413, 422, 503))
async def recommend_batch(batch: BatchRecommendRequest, state: State) -> Response:
    """Many users in one call (a feed backend's fan-out or precompute): one store read and one model
    batch for all. Each result is the answer /recommend would give, or that request's own error."""
    started = time.perf_counter()
    results: list[dict[str, Any] | None] = [None] * len(batch.requests)
    valid: list[tuple[int, RecommendRequest, int]] = []
    for index, entry in enumerate(batch.requests):
        try:
            valid.append((index, *parse_entry(entry, state)))
        except EntryError as error:
            results[index] = entry_body(index, error)
    batch_stages = {"features": 0.0, "queue": 0.0, "model": 0.0, "search": 0.0}
    if valid:
        bodies = [body for _, body, _ in valid]
        records, store_reason = await read_users(state, [body.user_id for body in bodies])
        features_seconds = time.perf_counter() - started
        outcomes = await serve(state, bodies, [now for _, _, now in valid], records, store_reason)
        total_seconds = time.perf_counter() - started
        for (index, _, _), served in zip(valid, outcomes, strict=True):
            if isinstance(served, BaseException):
                log.error("batch entry %d failed", index, exc_info=served)
                results[index] = entry_body(index, EntryError(500, "internal error computing this answer"))
                continue
            stages = stage_seconds(served.result, features_seconds, total_seconds)
            observe(state.metrics, served, None)
            results[index] = answer_body(served, stages)
            batch_stages = {stage: max(batch_stages[stage], stages[stage]) for stage in batch_stages}
    out = {
        "results": results,
        "batch_latency_ms": {
            **{stage: seconds * 1e3 for stage, seconds in batch_stages.items()},
            "total": (time.perf_counter() - started) * 1e3,
        },
    }
    try:
        return Response(orjson.dumps(out), media_type="application/json")
    except orjson.JSONEncodeError:  # an entry's error names a field the client spelt with a lone surrogate
        return Response(render_error(out), media_type="application/json")
