"""The FastAPI application: ``create_app`` wires settings, feature store, model bundle and routes.

Run it with ``coldwarm serve`` (or ``uvicorn service.app:app``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from index_builder.settings import IndexSettings
from service.api import admin, health, recommend, users
from service.engine import Recommender, ServingBundle, configure_threads, load_bundle
from service.feature_store import FeatureStore, KeyLayout, MemoryFeatureStore
from service.metrics import ServiceMetrics
from service.middleware import RequestCounter
from service.settings import ServiceSettings
from service.state import ServiceState

log = logging.getLogger(__name__)


def make_store(settings: ServiceSettings, cap: int) -> tuple[FeatureStore, str]:
    if not settings.redis_url:
        log.warning(
            "COLDWARM_REDIS_URL is not set: using the embedded in-process feature store "
            "(not shared between processes, lost on restart)"
        )
        return MemoryFeatureStore(cap=cap), "memory"
    from service.feature_store.redis_store import RedisFeatureStore, create_client

    timeout_s = settings.redis_timeout_ms / 1000
    client = create_client(settings.redis_url, settings.redis_max_connections, timeout_s)
    layout = KeyLayout(settings.key_prefix, settings.key_schema_version)
    log.info("feature store: Redis at %s, keys %s", settings.redis_url, layout.pattern())
    return RedisFeatureStore(client, layout, cap=cap, timeout_s=timeout_s), "redis"


def validation_message(error: RequestValidationError) -> str:
    """One line naming each bad field, e.g. "body.k: Input should be less than or equal to 1000"."""
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{field}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(
    settings: ServiceSettings | None = None,
    store: FeatureStore | None = None,
    bundle: ServingBundle | None = None,
) -> FastAPI:
    """An app over ``settings``; ``store`` and ``bundle`` replace what the settings would load."""
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_threads(settings.torch_threads, settings.faiss_threads)
        index_settings = IndexSettings()
        serving = bundle or await asyncio.to_thread(load_bundle, settings.artifacts_dir, index_settings)
        cap = serving.artifacts.encoder.config.max_history
        feature_store, kind = (store, "given") if store is not None else make_store(settings, cap)
        recommender = Recommender(serving)
        metrics.set_versions(serving.model_version, serving.index_version, serving.n_items)
        app.state.coldwarm = ServiceState(settings, index_settings, feature_store, kind, recommender, metrics)
        log.info(
            "serving model %s, index %s (%d items)",
            serving.model_version,
            serving.index_version,
            serving.n_items,
        )
        try:
            yield
        finally:
            recommender.close()
            client = getattr(feature_store, "client", None)
            if client is not None and store is None:
                await client.aclose()

    app = FastAPI(
        title="coldwarm",
        description="Cold-start-aware retrieval: POST /recommend for top-K items.",
        version="0.1.0",
        lifespan=lifespan,
    )
    for module in (recommend, users, health, admin):
        app.include_router(module.router)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        detail = jsonable_encoder(error.errors())
        return JSONResponse({"message": validation_message(error), "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Every error body carries "message", whatever raised it.
        return JSONResponse(
            {"message": str(error.detail), "detail": error.detail},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    app.add_middleware(RequestCounter, metrics=metrics)
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.app:app_factory``."""
    return create_app()
