"""The FastAPI application: ``create_app`` wires settings, feature store, model bundle and routes.

Run it with ``coldwarm serve`` (or ``uvicorn service.app:app``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from index_builder.settings import IndexSettings
from model.artifacts import ArtifactError
from service.api import admin, health, recommend, users
from service.engine import Recommender, ServingBundle, configure_threads, load_bundle, release_memory
from service.errors import install_error_handlers
from service.feature_store import FeatureStore, KeyLayout, MemoryFeatureStore
from service.feature_store.marker import MarkerWatch
from service.metrics import ServiceMetrics
from service.middleware import BodySizeLimit, RequestCounter
from service.settings import ServiceSettings, redacted_url
from service.state import ServiceState

log = logging.getLogger(__name__)


def make_store(settings: ServiceSettings, cap: int) -> tuple[FeatureStore, str]:
    if not settings.redis_url:
        log.warning(
            "COLDWARM_REDIS_URL is not set: using the embedded in-process feature store "
            "(not shared between processes, lost on restart)"
        )
        return MemoryFeatureStore(cap=cap), "memory"
    from service.feature_store.client import create_client
    from service.feature_store.redis_store import RedisFeatureStore

    timeout_s = settings.redis_timeout_ms / 1000
    cluster = settings.redis_cluster
    client = create_client(settings.redis_url, settings.redis_max_connections, timeout_s, cluster)
    layout = KeyLayout(settings.key_prefix, settings.key_schema_version)
    kind = "redis-cluster" if cluster else "redis"
    log.info("feature store: %s at %s, keys %s", kind, redacted_url(settings.redis_url), layout.pattern())
    store = RedisFeatureStore(
        client,
        layout,
        cap=cap,
        timeout_s=timeout_s,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )
    return store, kind


def make_marker_watch(settings: ServiceSettings, store: FeatureStore) -> MarkerWatch:
    """The store's load-marker watch; the marker is required of a shared store only: the in-process one
    holds what this process put in it, and cannot lose it behind the process's back."""
    required = settings.require_feature_marker and not isinstance(store, MemoryFeatureStore)
    return MarkerWatch(store, required, settings.feature_marker_check_s)


async def load_startup_bundle(
    settings: ServiceSettings, index_settings: IndexSettings
) -> tuple[ServingBundle | None, str | None]:
    """The bundle to serve, or why there is none: the service then starts but is not ready (/readyz
    says why, /recommend answers 503) until ``/admin/reload`` loads good artifacts. Serving a damaged
    model would be worse than serving nothing, and a process that stays up can be repaired in place."""
    try:
        bundle = await asyncio.to_thread(
            load_bundle, settings.artifacts_dir, index_settings, settings.device, settings.tower_format
        )
        return bundle, None
    except (ArtifactError, OSError, ValueError, RuntimeError) as error:
        log.error("not ready: artifacts at %s refused: %s", settings.artifacts_dir, error)
        return None, str(error)


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
        serving, load_error = bundle, None
        if serving is None:
            serving, load_error = await load_startup_bundle(settings, index_settings)
        cap = serving.artifacts.encoder.config.max_history if serving else settings.history_cap
        feature_store, kind = (store, "given") if store is not None else make_store(settings, cap)
        recommender = Recommender(
            serving,
            cap,
            load_error,
            settings.max_queue_ms,
            settings.max_batch,
            settings.batch_wait_us,
            on_batch=lambda stats: metrics.batch_size.observe(stats.size),
            device=settings.device,
            tower_format=settings.tower_format,
        )
        if serving is not None:
            metrics.set_versions(
                serving.model_version,
                serving.index_version,
                serving.n_items,
                serving.searcher.name,
                serving.device,
                serving.tower_format,
            )
            log.info(
                "serving model %s, index %s (%d items)",
                serving.model_version,
                serving.index_version,
                serving.n_items,
            )
        marker_watch = make_marker_watch(settings, feature_store)
        await marker_watch.start()
        app.state.coldwarm = ServiceState(
            settings, index_settings, feature_store, kind, recommender, metrics, marker_watch
        )
        # The recommender alone holds the bundle: this frame lives as long as the app, and a reference
        # here would keep the start-up model in memory after every reload.
        del serving
        release_memory()
        try:
            yield
        finally:
            await marker_watch.stop()
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

    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Added last, so outermost: refused bodies (413) are counted too.
    app.add_middleware(RequestCounter, metrics=metrics)
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.app:app_factory``."""
    return create_app()
