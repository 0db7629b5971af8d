"""Write and read tokens on a real server: without them the routes are open; with them /events and the
profile write need the write token, GET /users/{id} the read token (or the write one), /recommend
stays open, and a wrong token gets 401 without the token ever reaching the logs."""

from __future__ import annotations

import logging

import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import ServingArtifacts, live_server, service_settings  # noqa: E402

pytest_plugins = ["service_fixtures"]

WRITE, READ = "write-secret-1234", "read-secret-5678"
USER = 10**12 + 7


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_without_tokens_nothing_changes(serving_artifacts: ServingArtifacts, key_prefix: str) -> None:
    with live_server(service_settings(serving_artifacts.a.directory, key_prefix)) as server:
        client = server.client
        assert client.post("/events", json={"user_id": USER, "item_id": 3}).status_code == 200
        assert client.put(f"/users/{USER}/profile", json={"gender": "F"}).status_code == 200
        assert client.get(f"/users/{USER}").status_code == 200


def test_tokens_guard_writes_and_reads(
    serving_artifacts: ServingArtifacts, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = service_settings(serving_artifacts.a.directory, key_prefix, write_token=WRITE, read_token=READ)
    caplog.set_level(logging.DEBUG)
    with live_server(settings) as server:
        client = server.client
        event = {"user_id": USER, "item_id": 3}
        for headers in ({}, bearer("wrong"), bearer(READ), {"authorization": WRITE}):
            refused = client.post("/events", json=event, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert (
                client.put(f"/users/{USER}/profile", json={"gender": "F"}, headers=headers).status_code == 401
            )
        assert client.post("/events", json=event, headers=bearer(WRITE)).status_code == 200
        assert (
            client.put(f"/users/{USER}/profile", json={"gender": "F"}, headers=bearer(WRITE)).status_code
            == 200
        )

        assert client.get(f"/users/{USER}").status_code == 401
        assert client.get(f"/users/{USER}", headers=bearer("wrong")).status_code == 401
        for token in (READ, WRITE):
            answer = client.get(f"/users/{USER}", headers=bearer(token))
            assert answer.status_code == 200 and answer.json()["interaction_count"] == 1
        assert server.recommend(user_id=USER, k=5).status_code == 200  # open: the feed's hot path
    assert WRITE not in caplog.text and READ not in caplog.text


def test_the_write_token_guards_reads_when_no_read_token_is_set(
    serving_artifacts: ServingArtifacts, key_prefix: str
) -> None:
    settings = service_settings(serving_artifacts.a.directory, key_prefix, write_token=WRITE)
    with live_server(settings) as server:
        assert server.client.get(f"/users/{USER}").status_code == 401
        assert server.client.get(f"/users/{USER}", headers=bearer(WRITE)).status_code == 200
