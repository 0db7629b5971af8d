"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Artifacts are loaded and the feature store answers; 503 otherwise (the service still serves,
    degraded, but a load balancer should prefer a ready instance)."""
    bundle = state.recommender.bundle
    store_ok = await state.store.ping()
    body = {
        "ready": store_ok,
        "feature_store": {"kind": state.store_kind, "reachable": store_ok},
        "model_version": bundle.model_version,
        "index_version": bundle.index_version,
        "n_items": bundle.n_items,
    }
    return JSONResponse(body, status_code=200 if store_ok else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
