"""A user who comes back after a long pause is served as the active user they are, not as a new one.

Through the real service (uvicorn, real Redis): a long history is replayed as /events with its own
timestamps, then /recommend is asked at the moment of the user's next interaction (the evaluation's
"now"), a year after their last action, and at today's wall clock (decades after the synthetic data).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    LiveServer,
    ServingArtifacts,
    live_server,
    service_settings,
    user_profile,
    users_by_length,
)

pytest_plugins = ["service_fixtures"]

YEAR_S = 365 * 86_400
HISTORY = 60  # more than the 50 actions the store keeps: an active user
NEW_USER = 10**12


@pytest.fixture()
def server(
    serving_artifacts: ServingArtifacts, key_prefix: str, redis_client: redis.Redis
) -> Iterator[LiveServer]:
    # Users are built through the API (profile, then events): a store that starts empty on purpose.
    settings = service_settings(serving_artifacts.a.directory, key_prefix, require_feature_marker=False)
    with live_server(settings) as live:
        yield live


def replay_history(server: LiveServer, artifacts: ServingArtifacts, user_id: int, n: int) -> np.ndarray:
    """Profile and the first ``n`` interactions through the API; returns the user's timestamps."""
    rows = artifacts.data.interactions[artifacts.data.interactions["user_id"] == user_id]
    items, stamps = rows["item_id"].to_numpy(np.int64), rows["timestamp"].to_numpy(np.int64)
    put = server.client.put(f"/users/{user_id}/profile", json=user_profile(artifacts.data, user_id))
    assert put.status_code == 200, put.text
    for i in range(n):
        answer = server.client.post(
            "/events",
            json={
                "user_id": user_id,
                "item_id": int(items[i]),
                "timestamp": int(stamps[i]),
                "event_id": f"e{i}",
            },
        )
        assert answer.status_code == 200, answer.text
    assert answer.json()["user_group"] == "active"
    return stamps


def cold_weight(server: LiveServer, user_id: int, request_time: int | None = None) -> float:
    body: dict = {"user_id": user_id, "k": 10}
    if request_time is not None:
        body["request_time"] = request_time
    answer = server.recommend(**body)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    assert payload["degraded"] is False
    assert payload["gate"]["cold"] + payload["gate"]["warm"] == pytest.approx(1.0, abs=1e-5)
    return float(payload["gate"]["cold"])


def test_a_user_returning_after_a_year_keeps_a_warm_gate(
    server: LiveServer, serving_artifacts: ServingArtifacts
) -> None:
    lengths = users_by_length(serving_artifacts.data)
    user_id = int(lengths[lengths > HISTORY].index[-1])
    stamps = replay_history(server, serving_artifacts, user_id, HISTORY)
    at_next_interaction = cold_weight(server, user_id, int(stamps[HISTORY]))
    after_a_year = cold_weight(server, user_id, int(stamps[HISTORY - 1]) + YEAR_S)
    today = cold_weight(server, user_id)  # the wall clock: decades after the synthetic data
    new_user = cold_weight(server, NEW_USER)
    assert at_next_interaction < 0.5, at_next_interaction  # the trained gate favours the warm expert
    for returning in (after_a_year, today):
        assert returning < 0.5, (returning, at_next_interaction)
        # Nearer to the same user at data time than to a brand-new user.
        assert abs(returning - at_next_interaction) < abs(returning - new_user), (
            returning,
            at_next_interaction,
            new_user,
        )
