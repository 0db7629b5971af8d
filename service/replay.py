"""Replays evaluation points through the HTTP API of a running service, to measure what it serves.

The offline evaluation scores a user "as known at the request time" straight from the data; the service
learns of a user only through its API. Replaying each protocol point the way a client would (profile,
then one event per history interaction with its own timestamp, then ``/recommend``) and scoring the
answers with the protocol's own metric code makes served quality a measured figure (shared/DESIGN.md,
"Request time"): any difference between the two is a difference in what the service computes.

Each point gets a fresh user id (``base_user_id + point index``): the same real user at several h must
not share state, since the store keeps every event it was sent. Each replayed state is queried in one or
more *modes*: ``data_time`` sends the point's request time as the request's "now"; ``wall_clock`` sends
none, so the service uses its clock, as live traffic does.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from model.data.schema import InteractionData
from model.evaluation.metrics import EMPTY_SLOT
from model.evaluation.protocol import EvalPoint, catalog_indices
from service.feature_store.records import iter_records

DATA_TIME = "data_time"
WALL_CLOCK = "wall_clock"
MODES: tuple[str, ...] = (DATA_TIME, WALL_CLOCK)
DEFAULT_K = 100
DEFAULT_CONCURRENCY = 4
DEFAULT_BASE_USER_ID = 10**12  # far above any real data set's ids: replay users never meet real ones


class ReplayError(RuntimeError):
    """The service refused a request (non-200, with its body), or does not hold what was sent to it.

    Either makes the replay's figures meaningless, so the replay stops at the first one instead of
    counting it: a served metric averaged over answers that never came would flatter the service.
    """


@dataclass(frozen=True)
class ServedAnswer:
    """One ``/recommend`` answer, as far as the evaluation needs it."""

    item_ids: list[int]
    scores: list[float]
    gate: tuple[float, float]  # (cold, warm)
    degraded_reason: str | None
    model_version: str
    index_version: str


@dataclass
class ServedRanking:
    """Every point's answer in one mode, as arrays aligned with the points (row i = point i)."""

    mode: str
    item_ids: np.ndarray  # int64 (n, k): served item ids, best first; -1 past the end of a short answer
    ranked: np.ndarray  # int64 (n, k): the same as protocol catalog indices, EMPTY_SLOT padded
    scores: np.ndarray  # float64 (n, k): served scores; NaN past the end
    gates: np.ndarray  # float64 (n, 2): gate weights [cold, warm]
    degraded: int  # answers flagged degraded (shed, feature store trouble): not the model's answer
    degraded_reasons: dict[str, int] = field(default_factory=dict)
    model_versions: list[str] = field(default_factory=list)  # distinct, sorted
    index_versions: list[str] = field(default_factory=list)


@dataclass
class ReplayResult:
    points: list[EvalPoint]
    modes: dict[str, ServedRanking]
    base_user_id: int
    k: int
    requests: dict[str, int]  # 200 answers per route; a non-200 raises ReplayError, so none is counted
    seconds: float


# ----- requests --------------------------------------------------------------------------------------
def stored_profiles(data: InteractionData, user_ids: Sequence[int]) -> dict[int, dict[str, str]]:
    """Each user's profile as the feature store holds it (the bulk loader's own translation), built
    once, so that replaying thousands of points does not search the user table per point."""
    return {record.user_id: record.profile for record in iter_records(data, np.unique(user_ids), cap=1)}


def event_id(index: int) -> str:
    """Deterministic per history position: a retried or repeated replay counts each event once."""
    return f"replay-{index}"


def recommend_body(user_id: int, point: EvalPoint, k: int, mode: str) -> dict[str, Any]:
    """The /recommend request of one point in one mode.

    ``exclude_items`` carries the whole history: the protocol excludes all h items, while the store
    keeps (and ``exclude_seen`` drops) only the most recent ones, up to its cap.
    """
    body: dict[str, Any] = {
        "user_id": user_id,
        "k": k,
        "exclude_seen": True,
        "exclude_items": [int(i) for i in point.history_item_ids],
    }
    if mode == DATA_TIME:
        body["request_time"] = int(point.request_time)
    elif mode != WALL_CLOCK:
        raise ValueError(f"unknown replay mode {mode!r}; expected one of {MODES}")
    return body


async def call(client: httpx.AsyncClient, method: str, path: str, body: Any = None) -> Any:
    """One request; its JSON answer, or a ReplayError with the status and body of a non-200."""
    response = await client.request(method, path, json=body)
    if response.status_code != 200:
        raise ReplayError(f"{method} {path} answered {response.status_code}: {response.text}")
    return response.json()


def check_state(state: Mapping[str, Any], user_id: int, point: EvalPoint) -> None:
    """The store must hold the point's history and nothing else: a user id used before (another run
    against the same service and key prefix) or a lost event would replay a different user."""
    history = [int(i) for i in point.history_item_ids[::-1]]  # newest first, as the store keeps them
    recent = [int(i) for i in state.get("recent_items", [])]
    count = state.get("interaction_count")
    if count != point.h or recent != history[: len(recent)] or (point.h > 0 and not recent):
        raise ReplayError(
            f"user {user_id} (point user {point.user_id}, h={point.h}): the service holds "
            f"{count} interactions, recent {recent[:5]}..., expected {point.h}, recent {history[:5]}...; "
            "was this user id replayed before? pass another base_user_id"
        )


async def write_user(
    client: httpx.AsyncClient, user_id: int, point: EvalPoint, profile: Mapping[str, str]
) -> None:
    """The user as the service learns of them: a profile write, then the h events in order.

    Events go one after the other: the store orders a user's actions by arrival.
    """
    if profile:
        await call(client, "PUT", f"/users/{user_id}/profile", dict(profile))
    state: Any = None
    for index, (item, stamp) in enumerate(zip(point.history_item_ids, point.history_timestamps, strict=True)):
        body = {
            "user_id": user_id,
            "item_id": int(item),
            "timestamp": int(stamp),
            "event_id": event_id(index),
        }
        state = await call(client, "POST", "/events", body)
    if state is None:  # h = 0: no event answer to check, so ask
        state = await call(client, "GET", f"/users/{user_id}")
    check_state(state, user_id, point)


def parse_answer(answer: Mapping[str, Any]) -> ServedAnswer:
    items = answer["items"]
    return ServedAnswer(
        item_ids=[int(item["item_id"]) for item in items],
        scores=[float(item["score"]) for item in items],
        gate=(float(answer["gate"]["cold"]), float(answer["gate"]["warm"])),
        degraded_reason=(answer.get("degraded_reason") or "unknown") if answer.get("degraded") else None,
        model_version=str(answer.get("model_version", "")),
        index_version=str(answer.get("index_version", "")),
    )


async def replay_point(
    client: httpx.AsyncClient,
    user_id: int,
    point: EvalPoint,
    profile: Mapping[str, str],
    k: int,
    modes: Sequence[str],
) -> dict[str, ServedAnswer]:
    """Writes one point's user, then asks for recommendations once per mode (the state is the same)."""
    await write_user(client, user_id, point, profile)
    answers = {}
    for mode in modes:
        answers[mode] = parse_answer(
            await call(client, "POST", "/recommend", recommend_body(user_id, point, k, mode))
        )
    return answers


# ----- the replay ------------------------------------------------------------------------------------
async def replay_points(
    base_url: str,
    points: Sequence[EvalPoint],
    data: InteractionData,
    catalog_item_ids: np.ndarray,
    *,
    modes: Sequence[str] = MODES,
    k: int = DEFAULT_K,
    base_user_id: int = DEFAULT_BASE_USER_ID,
    concurrency: int = DEFAULT_CONCURRENCY,
    expected_model_version: str | None = None,
    timeout_s: float = 30.0,
    progress: bool = False,
) -> ReplayResult:
    """Replays every point through the service at ``base_url`` (at most ``concurrency`` points in
    flight) and collects its answers per mode.

    ``data`` is the data set the points come from (their profiles), ``catalog_item_ids`` the protocol's
    sorted catalog the answers are mapped onto. User ids ``base_user_id .. base_user_id + len(points)
    - 1`` are written to the service's feature store: use a key prefix of the replay's own, or ids no
    one else uses. With ``expected_model_version`` an answer from any other model raises: comparing
    the offline figures of one model with the answers of another measures nothing.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:  # before any write, not after a replay's worth of events
        raise ValueError(f"unknown replay modes {unknown}; expected some of {MODES}")
    profiles = stored_profiles(data, [point.user_id for point in points])
    answers: list[dict[str, ServedAnswer] | None] = [None] * len(points)
    requests: Counter[str] = Counter()
    bar = _progress_bar(len(points), progress)
    pending = iter(range(len(points)))
    started = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        # Workers pull the next point when done: bounded concurrency without a task per point.
        for index in pending:
            point = points[index]
            answers[index] = await replay_point(
                client, base_user_id + index, point, profiles.get(point.user_id, {}), k, modes
            )
            if expected_model_version is not None:
                _check_version(answers[index], expected_model_version)
            requests["PUT /users/{id}/profile"] += 1 if profiles.get(point.user_id) else 0
            requests["POST /events"] += point.h
            requests["GET /users/{id}"] += 0 if point.h else 1
            requests["POST /recommend"] += len(modes)
            if bar is not None:
                bar.update(1)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    try:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client,
            asyncio.TaskGroup() as group,
        ):
            for _ in range(min(concurrency, len(points))):
                group.create_task(worker(client))
    except ExceptionGroup as errors:
        # One failure cancels the other workers; report that failure, not the group around it.
        raise errors.exceptions[0] from None
    finally:
        if bar is not None:
            bar.close()
    done = [a for a in answers if a is not None]
    assert len(done) == len(points), "every worker finished without error, so every point has answers"
    return ReplayResult(
        points=list(points),
        modes={mode: rankings(mode, [a[mode] for a in done], catalog_item_ids, k) for mode in modes},
        base_user_id=base_user_id,
        k=k,
        requests={route: n for route, n in requests.items() if n},
        seconds=time.perf_counter() - started,
    )


def _check_version(answers: Mapping[str, ServedAnswer], expected: str) -> None:
    for mode, answer in answers.items():
        if answer.model_version != expected:
            raise ReplayError(
                f"{mode}: the service answered with model {answer.model_version}, not {expected}"
            )


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="replay", unit="point", file=sys.stderr, leave=False)


def rankings(
    mode: str, answers: Sequence[ServedAnswer], catalog_item_ids: np.ndarray, k: int
) -> ServedRanking:
    """The answers of one mode as padded arrays; items outside the catalog become EMPTY_SLOT (no hit)."""
    n = len(answers)
    item_ids = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), np.nan, dtype=np.float64)
    for row, answer in enumerate(answers):
        served = answer.item_ids[:k]
        item_ids[row, : len(served)] = served
        scores[row, : len(served)] = answer.scores[:k]
    catalog_item_ids = np.asarray(catalog_item_ids, dtype=np.int64)
    ranked = np.where(
        item_ids >= 0, catalog_indices(catalog_item_ids, item_ids.reshape(-1)).reshape(n, k), EMPTY_SLOT
    )
    reasons = Counter(a.degraded_reason for a in answers if a.degraded_reason is not None)
    return ServedRanking(
        mode=mode,
        item_ids=item_ids,
        ranked=ranked.astype(np.int64),
        scores=scores,
        gates=np.array([a.gate for a in answers], dtype=np.float64).reshape(n, 2),
        degraded=sum(reasons.values()),
        degraded_reasons=dict(reasons),
        model_versions=sorted({a.model_version for a in answers}),
        index_versions=sorted({a.index_version for a in answers}),
    )
