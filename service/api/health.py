"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import without_paths
from service.feature_store import FeatureStoreError, LoadMarker
from service.state import ServiceState, State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Artifacts are loaded and the feature store answers (a cluster: every slot served) and holds a
    completed load (its marker, when required); 503 otherwise. Without Redis, or with a Redis that lost
    its data, the service still serves, degraded, but a load balancer should prefer a ready instance;
    without artifacts it serves nothing, and the body says why."""
    recommender = state.recommender
    bundle = recommender.bundle
    feature_store: dict[str, object] = {"kind": state.store_kind}
    marker, marker_read = await read_marker(state)
    if state.store_kind == "redis-cluster":
        # One CLUSTER INFO: the state says both whether a node answers and whether every slot is served.
        feature_store["cluster_state"] = await cluster_state(state)
        store_ok = feature_store["cluster_state"] == "ok"
    else:
        # The marker's read doubles as the ping: it answered, or the store is unreachable.
        store_ok = marker_read
    watch = state.marker_watch
    # loaded: None when the marker could not be read; false only where it is required and missing.
    loaded = (marker is not None or not watch.required) if marker_read else None
    feature_store.update(
        reachable=store_ok,
        loaded=loaded,
        marker=marker.as_dict() if marker is not None else None,
        marker_required=watch.required,
    )
    ready = store_ok and loaded is True and bundle is not None
    body = {
        "ready": ready,
        "feature_store": feature_store,
        "artifacts": {
            "loaded": bundle is not None,
            "error": without_paths(recommender.load_error) if recommender.load_error else None,
        },
        "model_version": bundle.model_version if bundle else None,
        "index_version": bundle.index_version if bundle else None,
        "n_items": bundle.n_items if bundle else 0,
        "search_backend": bundle.searcher.name if bundle else None,
        # From this batch size on, the exact torch search answers instead (a flat index on the CPU).
        "exact_batch_from": bundle.exact_batch_from if bundle else None,
        "device": bundle.device if bundle else None,
        "tower_format": bundle.tower_format if bundle else None,
        "batching": {"max_batch": recommender.batcher.max_batch, "wait_us": recommender.batcher.wait_s * 1e6},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


async def read_marker(state: ServiceState) -> tuple[LoadMarker | None, bool]:
    """The store's load marker read now, and whether the read succeeded; the watch takes a successful
    read, so a probe's news reaches the requests' flag at once."""
    try:
        return await state.marker_watch.check(), True
    except FeatureStoreError:
        return None, False


async def cluster_state(state: ServiceState) -> str:
    """ "ok", "fail" (some slot is not served) or "unreachable" (no node answered in time)."""
    try:
        return await state.store.cluster_state() or "unknown"  # type: ignore[attr-defined]
    except FeatureStoreError:
        return "unreachable"


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
