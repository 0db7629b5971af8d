"""The user resource: events (an interaction happened), profile writes, and a read of the state."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Path, Request

from model.evaluation.protocol import user_group
from service.api.auth import ReadAccess, WriteAccess
from service.errors import documented
from service.feature_store import FeatureStoreError, UserRecord
from service.feature_store.records import EventIdConflictError
from service.schemas import EventRequest, ProfileRequest, ProfileResponse, UserState
from service.state import ServiceState, State

router = APIRouter(tags=["users"])
UserIdPath = Path(ge=0, le=2**63 - 1, description="the user's 64-bit integer id")


def unavailable(state: ServiceState, operation: str, error: FeatureStoreError) -> HTTPException:
    """Writes cannot degrade: say so, so the caller retries instead of losing the event. After a
    timeout Redis may still apply the write; an event retried with its event_id counts once."""
    state.metrics.redis_errors.labels(operation).inc()
    return HTTPException(
        503, f"feature store unavailable ({error.reason}); not acknowledged: retry (with the same event_id)"
    )


def user_state(record: UserRecord) -> UserState:
    return UserState(
        user_id=record.user_id,
        interaction_count=record.count,
        first_timestamp=record.first_ts,
        last_timestamp=record.last_ts,
        recent_items=record.actions,
        user_group=user_group(record.count),
    )


@router.post("/events", response_model=UserState, responses=documented(401, 409, 413, 422, 503))
async def record_event(body: EventRequest, state: State, request: Request, _: WriteAccess) -> UserState:
    """Adds an interaction atomically; the user's next /recommend already uses it."""
    now = int(time.time())
    timestamp = body.timestamp if body.timestamp is not None else now
    if timestamp > now + state.settings.max_event_skew_s:
        # A future (or millisecond) timestamp would make the user look "active just now" forever.
        raise HTTPException(422, f"timestamp {timestamp} is in the future: send Unix seconds, at most now")
    try:
        # Without the caller's id the store gives the event one of its own: the Redis client's retry
        # after a lost reply then counts once.
        record = await state.store.record_event(body.user_id, body.item_id, timestamp, body.event_id)
    except FeatureStoreError as error:
        raise unavailable(state, "record_event", error) from error
    except EventIdConflictError as error:
        raise HTTPException(409, str(error)) from error
    answer = user_state(record)
    request.state.user_group = answer.user_group
    return answer


@router.put(
    "/users/{user_id}/profile", response_model=ProfileResponse, responses=documented(401, 413, 422, 503)
)
async def put_profile(
    body: ProfileRequest, state: State, _: WriteAccess, user_id: int = UserIdPath
) -> ProfileResponse:
    """Sets the given profile fields; values the model never saw become out-of-vocabulary, not errors."""
    fields = {name: value for name, value in body.model_dump().items() if value is not None}
    try:
        await state.store.put_profile(user_id, fields)
        [record] = await state.store.get_users([user_id])
    except FeatureStoreError as error:
        raise unavailable(state, "put_profile", error) from error
    return ProfileResponse(user_id=user_id, profile=record.profile)


@router.get("/users/{user_id}", response_model=UserState, responses=documented(401, 422, 503))
async def get_user(state: State, _: ReadAccess, user_id: int = UserIdPath) -> UserState:
    """What the service knows of a user (an unknown user is a cold-start user with nothing recorded)."""
    try:
        [record] = await state.store.get_users([user_id])
    except FeatureStoreError as error:
        raise unavailable(state, "get_users", error) from error
    return user_state(record)
