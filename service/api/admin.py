"""POST /admin/reload: load a new artifacts directory, warm it, swap model and index together."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException

from model.artifacts import ArtifactError
from service.api.auth import bearer_matches, configured, refuse
from service.engine import resolve_reload_dir
from service.errors import documented
from service.schemas import ReloadRequest, ReloadResponse
from service.state import ServiceState, State

router = APIRouter(prefix="/admin", tags=["admin"])


def check_token(state: ServiceState, authorization: str | None) -> None:
    secret = state.settings.admin_token
    if secret is None or not configured(secret):
        raise HTTPException(404, "admin endpoints are disabled: set COLDWARM_ADMIN_TOKEN to enable them")
    if not bearer_matches(authorization, secret):
        raise refuse()


@router.post("/reload", response_model=ReloadResponse, responses=documented(401, 404, 413, 422))
async def reload(
    state: State, body: ReloadRequest | None = None, authorization: Annotated[str | None, Header()] = None
) -> ReloadResponse:
    """Refuses a broken directory with 422 and keeps serving the old version."""
    check_token(state, authorization)
    requested = body.artifacts_dir if body else None
    try:
        directory = resolve_reload_dir(state.settings.artifacts_dir, requested)
    except ValueError as error:
        state.metrics.reloads.labels("refused").inc()
        raise HTTPException(422, f"reload refused, still serving the previous version: {error}") from error
    try:
        bundle = await state.recommender.reload(directory, state.index_settings)
    except (ArtifactError, OSError, ValueError, RuntimeError) as error:
        state.metrics.reloads.labels("refused").inc()
        raise HTTPException(422, f"reload refused, still serving the previous version: {error}") from error
    state.metrics.reloads.labels("ok").inc()
    state.metrics.set_versions(
        bundle.model_version,
        bundle.index_version,
        bundle.n_items,
        bundle.searcher.name,
        bundle.device,
        bundle.tower_format,
    )
    return ReloadResponse(
        model_version=bundle.model_version, index_version=bundle.index_version, n_items=bundle.n_items
    )
