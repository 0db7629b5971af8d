"""What every route needs, attached to the app at start-up and handed out as a typed dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from index_builder.settings import IndexSettings
from service.engine import Recommender
from service.feature_store import FeatureStore
from service.feature_store.marker import MarkerWatch
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings


@dataclass
class ServiceState:
    settings: ServiceSettings
    index_settings: IndexSettings
    store: FeatureStore
    store_kind: str
    recommender: Recommender
    metrics: ServiceMetrics
    marker_watch: MarkerWatch  # whether the store holds a completed load: a flag, for the request path


async def get_state(request: Request) -> ServiceState:
    # async: a plain def dependency would cost every request a hop through the thread pool.
    return request.app.state.coldwarm


State = Annotated[ServiceState, Depends(get_state)]
