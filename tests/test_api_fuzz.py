"""Bad input, the whole HTTP API: property-based fuzzing from the service's own OpenAPI document
(schemathesis), and the explicit limits one by one.

Everything runs against a real uvicorn server over ``create_app`` with the real Redis on 127.0.0.1:6379
(every user of the data set bulk-loaded under a key prefix of this module's own). The contract checked
for every request, valid or not:

* never a 5xx (Redis is up and the artifacts are good, so nothing may fail on the server's side);
* every 4xx is JSON with a non-empty string ``message`` naming the problem;
* data that breaks the schema is refused (schemathesis' ``negative_data_rejection``);
* 2xx bodies keep the documented response schema.

The generation is derandomized (fixed seeds), so a run in CI sends the same requests every time.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.errors import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    negative_data_rejection,
    response_schema_conformance,
)

from service.feature_store import KeyLayout  # noqa: E402

# Asserts in the shared helpers get pytest's messages too (they are imported before pytest_plugins).
pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    LiveServer,
    ServingArtifacts,
    delete_namespace,
    live_server,
    load_users,
    service_settings,
)

# The shared fixtures (serving_artifacts; redis_client from conftest.py).
pytest_plugins = ["service_fixtures"]

ADMIN_TOKEN = "fuzz-admin-token"
BEARER = {"authorization": f"Bearer {ADMIN_TOKEN}"}
DEFAULT_BODY_LIMIT = 256 * 1024  # ServiceSettings.max_body_bytes' default
SMALL_BODY_LIMIT = 4096
MAX_USER_ID = 2**63 - 1

# Every operation of the API; the schema must list exactly these (a new route gets fuzzed, or this fails).
OPERATIONS = (
    "POST /recommend",
    "POST /recommend/batch",
    "POST /events",
    "PUT /users/{user_id}/profile",
    "GET /users/{user_id}",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "POST /admin/reload",
)
# Operations without parameters or body have nothing to negate: positive generation only.
WITHOUT_INPUT = {"GET /healthz", "GET /readyz", "GET /metrics"}
# Examples per operation and generation mode: ~50 keeps the module well under a minute on 2 cores.
MAX_EXAMPLES = 50
RELOAD_MAX_EXAMPLES = 25  # a reload that succeeds loads a model: the slowest request of the API


# ----- checks ---------------------------------------------------------------------------------------
def client_errors_name_the_problem(ctx: Any, response: Any, case: Any) -> None:
    """Every 4xx is JSON carrying a non-empty string ``message``."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), (
        f"{response.status_code} with content-type {content_type!r}: {response.content[:200]!r}"
    )
    try:
        body = json.loads(response.content)
    except ValueError as error:
        raise AssertionError(
            f"{response.status_code} body is not JSON ({error}): {response.content[:200]!r}"
        ) from None
    message = body.get("message") if isinstance(body, dict) else None
    assert isinstance(message, str) and message.strip(), (
        f"{response.status_code} without a non-empty string 'message': {body!r}"
    )
    return None


def success_bodies_keep_the_schema(ctx: Any, response: Any, case: Any) -> None:
    """The documented response schema, for 2xx answers only: the 4xx bodies are this service's
    ``{"message", "detail"}`` (which FastAPI's generated 422 schema does not describe), checked above."""
    if 200 <= response.status_code < 300:
        return response_schema_conformance(ctx, response, case)
    return None


CHECKS = [
    not_a_server_error,
    client_errors_name_the_problem,
    negative_data_rejection,
    success_bodies_keep_the_schema,
]


# ----- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """One key prefix for the module (one server for all the fuzzing); deleted afterwards."""
    prefix = f"coldwarm-fuzz-test-{uuid.uuid4().hex}"
    yield prefix
    delete_namespace(redis_client, KeyLayout(prefix))


@pytest.fixture(scope="module")
def server(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, fuzz_prefix: str
) -> Iterator[LiveServer]:
    """Version A with the admin endpoints on, every user loaded, the default body limit."""
    load_users(redis_client, fuzz_prefix, serving_artifacts)
    settings = service_settings(serving_artifacts.a.directory, fuzz_prefix, admin_token=ADMIN_TOKEN)
    assert settings.max_body_bytes == DEFAULT_BODY_LIMIT
    with live_server(settings) as live:
        yield live


@pytest.fixture(scope="module")
def small_server(serving_artifacts: ServingArtifacts, fuzz_prefix: str) -> Iterator[LiveServer]:
    """The same, with a body limit of a few KiB."""
    settings = service_settings(
        serving_artifacts.a.directory, fuzz_prefix, admin_token=ADMIN_TOKEN, max_body_bytes=SMALL_BODY_LIMIT
    )
    with live_server(settings) as live:
        yield live


@pytest.fixture(scope="module")
def api_schema(server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.fixture(scope="module")
def session() -> Iterator[Any]:
    import requests

    with requests.Session() as value:
        yield value


def operation(schema: Any, label: str) -> Any:
    found = schema.find_operation_by_label(label)
    assert found is not None, f"{label} is not in the OpenAPI document"
    return found


def send(case: Any, server: LiveServer, session: Any, checks: list, headers: dict | None = None) -> Any:
    response = case.call(base_url=server.url, session=session, headers=headers, timeout=30)
    case.validate_response(response, checks=checks, headers=headers)
    return response


def run_fuzz(strategy: Any, max_examples: int, body: Callable[[Any], None]) -> None:
    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
        print_blob=False,
    )
    @hypothesis.given(case=strategy)
    def fuzz(case: Any) -> None:
        body(case)

    fuzz()


# ----- fuzzing ----------------------------------------------------------------------------------------
def test_the_schema_lists_every_operation(api_schema: Any) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


FUZZ_CASES = [
    pytest.param(label, mode, id=f"{label}-{mode.value}")
    for label in OPERATIONS
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or label not in WITHOUT_INPUT
]


@pytest.mark.parametrize(("label", "mode"), FUZZ_CASES)
def test_fuzz(api_schema: Any, server: LiveServer, session: Any, label: str, mode: GenerationMode) -> None:
    """Generated requests, valid and not; /admin/reload here without the token (its header fuzzed)."""
    strategy = operation(api_schema, label).as_strategy(generation_mode=mode)
    examples = RELOAD_MAX_EXAMPLES if label == "POST /admin/reload" else MAX_EXAMPLES
    if label in WITHOUT_INPUT:
        examples = 5  # nothing to vary: the same request, a few times
    run_fuzz(strategy, examples, lambda case: send(case, server, session, CHECKS))


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_fuzz_reload_with_the_token(
    api_schema: Any, server: LiveServer, session: Any, mode: GenerationMode
) -> None:
    """Authorised reloads of fuzzed ``artifacts_dir`` values: the configured directory again is a 200,
    anything else a 4xx (outside the root, not artifacts), never a 5xx."""
    strategy = operation(api_schema, "POST /admin/reload").as_strategy(
        generation_mode=mode, headers=dict(BEARER)
    )
    run_fuzz(strategy, RELOAD_MAX_EXAMPLES, lambda case: send(case, server, session, CHECKS))


@pytest.mark.parametrize("label", OPERATIONS)
def test_coverage_cases(api_schema: Any, server: LiveServer, session: Any, label: str) -> None:
    """Schemathesis' deterministic boundary cases (limits, missing and extra fields, wrong types, other
    methods); /admin/reload once as generated and once with the token. Every failure is collected."""
    op = operation(api_schema, label)
    config = api_schema.config.generation_for(operation=op, phase="coverage")
    cases = list(
        api_schema.iter_coverage_cases(op, generation_modes=list(GenerationMode), generation_config=config)
    )
    assert cases, label
    variants: list[tuple[dict | None, list]] = [(None, CHECKS)]
    if label == "POST /admin/reload":
        # The token replaces whatever the case sends, so a case whose only invalid part was its header
        # becomes valid: negative_data_rejection does not apply to this variant.
        variants.append((dict(BEARER), [not_a_server_error, client_errors_name_the_problem]))
    failures = []
    for headers, checks in variants:
        for case in cases:
            try:
                send(case, server, session, checks, headers)
            except FailureGroup as error:
                failures.append(str(error))
    assert not failures, f"{len(failures)} of {len(cases) * len(variants)} cases failed:\n" + "\n".join(
        failures
    )


def test_reload_of_every_path_inside_the_root_is_2xx_or_a_json_4xx(
    server: LiveServer, serving_artifacts: ServingArtifacts
) -> None:
    """Every file and directory under the artifacts root (by name and by absolute path), and a few
    spellings that leave it or cannot be paths: a 200 or a 422 with a message, never a 5xx."""
    root = serving_artifacts.root
    entries = sorted(root.rglob("*"))
    candidates = [str(path.relative_to(root)) for path in entries] + [str(path) for path in entries]
    candidates += ["", ".", "..", "/", "/etc", "/dev/null", "~", "a\x00b", "x" * 4096, "LATEST/.."]
    client = server.client
    statuses = {}
    for candidate in candidates:
        content = json.dumps({"artifacts_dir": candidate})
        headers = {"content-type": "application/json", **BEARER}
        response = client.post("/admin/reload", content=content, headers=headers)
        assert response.status_code in (200, 422), (candidate, response.status_code, response.text)
        if response.status_code == 422:
            assert response.json()["message"], candidate
        statuses[candidate] = response.status_code
    # Both versions, by name and by path, were loaded: the walk reached the success path too.
    for version in (serving_artifacts.a, serving_artifacts.b):
        assert statuses[version.directory.name] == statuses[str(version.directory)] == 200
    # Back to the configured version for whatever runs next.
    response = client.post("/admin/reload", headers=BEARER)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == serving_artifacts.a.model_version


@pytest.mark.parametrize(
    ("method", "path", "content"),
    [
        ("POST", "/recommend", '{"user_id": "\\ud800"}'),
        ("POST", "/recommend", '{"user_id": 1, "\\ud800": 1}'),
        ("POST", "/events", '{"user_id": 1, "item_id": "\\udfff"}'),
        ("PUT", "/users/1/profile", '{"gender": "\\udc80"}'),
        ("POST", "/admin/reload", '{"artifacts_dir": "\\udc80"}'),
    ],
    ids=["recommend-user_id", "recommend-extra-key", "events-item_id", "profile-gender", "reload"],
)
def test_lone_surrogates_in_json_strings_are_422_json(
    server: LiveServer, method: str, path: str, content: str
) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); Python decodes it into a str that cannot be
    encoded as UTF-8 again, so the 422 must not echo it back verbatim."""
    headers = {"content-type": "application/json", **BEARER}
    response = one_off_request(server, method, path, content=content, headers=headers)
    assert_json_error(response, 422)


# ----- explicit limits ------------------------------------------------------------------------------
def assert_json_error(response: httpx.Response, status: int, *names: str) -> str:
    """``status`` with a JSON body whose message mentions each of ``names``; the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    message = response.json()["message"]
    assert isinstance(message, str) and message.strip(), response.text
    for name in names:
        assert name in message, (name, message)
    return message


def one_off_request(server: LiveServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """On a connection of its own: a server that fails a request closes its connection, which would
    otherwise surface as a reset in whichever test sends next on the shared client."""
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        return client.request(method, path, **kwargs)


def raw_exchange(url: str, head: str, body: bytes = b"", timeout_s: float = 10.0) -> tuple[int, dict, bytes]:
    """One request written byte by byte (for headers httpx would not send); the status, headers and
    body of the answer. Times out, rather than hangs, when the server waits for more input."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer: {received!r}"
            received += chunk
        raw_head, _, content = received.partition(b"\r\n\r\n")
        status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(content) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed in the middle of the answer"
            content += chunk
    return int(status_line.split()[1]), headers, content


BODY_ROUTES = [
    ("POST", "/recommend"),
    ("POST", "/events"),
    ("PUT", "/users/7/profile"),
    ("POST", "/admin/reload"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_a_body_over_the_limit_is_413_json(server: LiveServer, method: str, path: str) -> None:
    body = b'{"user_id": 1, "pad": "' + b"x" * (300 * 1024) + b'"}'
    assert len(body) > DEFAULT_BODY_LIMIT
    response = server.client.request(
        method, path, content=body, headers={"content-type": "application/json", **BEARER}
    )
    assert_json_error(response, 413, str(DEFAULT_BODY_LIMIT))


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_a_declared_length_over_the_limit_is_refused_before_the_body_arrives(
    server: LiveServer, method: str, path: str
) -> None:
    """Content-Length says 1 GB and 13 bytes follow: the answer comes at once, without waiting for the
    rest (the read would time out otherwise)."""
    head = (
        f"{method} {path} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
        f"Authorization: Bearer {ADMIN_TOKEN}\nContent-Length: {10**9}\n"
    )
    started = time.monotonic()
    status, headers, content = raw_exchange(server.url, head, b'{"user_id": 1')
    assert time.monotonic() - started < 5.0
    assert status == 413, content
    assert headers["content-type"].startswith("application/json")
    assert str(DEFAULT_BODY_LIMIT) in json.loads(content)["message"]


def test_a_chunked_body_over_the_limit_is_413_json(server: LiveServer) -> None:
    """No Content-Length (chunked transfer encoding): counted as it arrives, cut off at the limit."""

    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": 1, "exclude_items": ['
        for _ in range(40):
            yield b"1," * 4096
        yield b"1]}"

    response = server.client.post(
        "/recommend", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_json_error(response, 413, str(DEFAULT_BODY_LIMIT))


def test_the_limit_is_inclusive(small_server: LiveServer) -> None:
    """A body of exactly max_body_bytes is read (JSON may carry trailing whitespace); one byte more is not."""
    base = json.dumps({"user_id": 1, "k": 5}).encode()
    exact = base + b" " * (SMALL_BODY_LIMIT - len(base))
    headers = {"content-type": "application/json"}
    response = small_server.client.post("/recommend", content=exact, headers=headers)
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 5
    response = small_server.client.post("/recommend", content=exact + b" ", headers=headers)
    assert_json_error(response, 413, str(SMALL_BODY_LIMIT))


@pytest.mark.parametrize(
    "limit", [DEFAULT_BODY_LIMIT, SMALL_BODY_LIMIT], ids=["default-limit", "small-limit"]
)
def test_exclude_items_over_its_maximum_length(
    server: LiveServer, small_server: LiveServer, limit: int
) -> None:
    """10001 exclude_items: 422 naming the field where the body fits the limit, 413 where it does not."""
    live = server if limit == DEFAULT_BODY_LIMIT else small_server
    body = json.dumps({"user_id": 1, "exclude_items": list(range(10_001))}).encode()
    response = live.client.post("/recommend", content=body, headers={"content-type": "application/json"})
    if len(body) > limit:
        assert_json_error(response, 413, str(limit))
    else:
        assert_json_error(response, 422, "body.exclude_items")
    # 10000 is allowed (where the body fits).
    fits = json.dumps({"user_id": 1, "k": 3, "exclude_items": list(range(10_000))}).encode()
    response = live.client.post("/recommend", content=fits, headers={"content-type": "application/json"})
    assert response.status_code == (200 if len(fits) <= limit else 413), response.text


def test_both_limits_are_exercised() -> None:
    """The parametrisation above covers a 422 and a 413: the body sizes fall on both sides."""
    size = len(json.dumps({"user_id": 1, "exclude_items": list(range(10_001))}).encode())
    assert SMALL_BODY_LIMIT < size <= DEFAULT_BODY_LIMIT


@pytest.mark.parametrize("k", [0, 1001, -1, "10", 2.5, True, None])
def test_k_out_of_range_or_not_an_integer_is_422_naming_k(server: LiveServer, k: Any) -> None:
    response = server.client.post("/recommend", json={"user_id": 1, "k": k})
    assert_json_error(response, 422, "body.k")


BAD_USER_IDS = [-1, MAX_USER_ID + 1, 2**64, "42", 4.5, 1.0, True, None, [1], {"id": 1}]


@pytest.mark.parametrize("user_id", BAD_USER_IDS, ids=repr)
@pytest.mark.parametrize("path", ["/recommend", "/events"])
def test_bad_user_ids_in_bodies_are_422_naming_user_id(server: LiveServer, path: str, user_id: Any) -> None:
    response = server.client.post(path, json={"user_id": user_id, "item_id": 1})
    assert_json_error(response, 422, "body.user_id")


def test_user_id_bounds_are_inclusive(server: LiveServer) -> None:
    for user_id in (0, MAX_USER_ID):
        response = server.client.post("/recommend", json={"user_id": user_id, "k": 2})
        assert response.status_code == 200, response.text
        assert server.client.get(f"/users/{user_id}").status_code == 200


@pytest.mark.parametrize("user_id", ["abc", "-1", str(MAX_USER_ID + 1), "4.5", "1e3", "0x10", "%20"])
def test_bad_user_ids_in_paths_are_422_naming_user_id(server: LiveServer, user_id: str) -> None:
    assert_json_error(server.client.get(f"/users/{user_id}"), 422, "path.user_id")
    response = server.client.put(f"/users/{user_id}/profile", json={"age": "25"})
    assert_json_error(response, 422, "path.user_id")


@pytest.mark.parametrize(
    "content",
    [
        b'{"user_id": 1,',
        b"{'user_id': 1}",
        b'{"user_id": 1}}',
        b"\xff\xfe{}",
        b"NaN",
        b'{"user_id": NaN}',
    ],
    ids=repr,
)
def test_invalid_json_is_422_with_a_message(server: LiveServer, content: bytes) -> None:
    headers = {"content-type": "application/json"}
    response = one_off_request(server, "POST", "/recommend", content=content, headers=headers)
    assert_json_error(response, 422)


def test_a_body_that_is_not_utf8_is_400_with_a_message(server: LiveServer) -> None:
    """FastAPI fails to decode it before validation starts: a 400, still JSON with a message."""
    headers = {"content-type": "application/json"}
    response = one_off_request(server, "POST", "/recommend", content=b'{"user_id": "\xc0"}', headers=headers)
    assert_json_error(response, 400)


@pytest.mark.parametrize("path", ["/nope", "/recommend/extra", "/users", "/users/1/history", "/admin"])
def test_unknown_routes_are_404_json(server: LiveServer, path: str) -> None:
    assert_json_error(server.client.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/recommend", "POST"),
        ("PUT", "/recommend", "POST"),
        ("GET", "/events", "POST"),
        ("DELETE", "/users/1", "GET"),
        ("POST", "/users/1/profile", "PUT"),
        ("POST", "/healthz", "GET"),
        ("GET", "/admin/reload", "POST"),
    ],
)
def test_wrong_methods_are_405_json(server: LiveServer, method: str, path: str, allowed: str) -> None:
    response = server.client.request(method, path)
    assert_json_error(response, 405)
    assert allowed in response.headers["allow"]


def test_readyz_is_ready_with_redis_up(server: LiveServer) -> None:
    response = server.client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["ready"] is True
