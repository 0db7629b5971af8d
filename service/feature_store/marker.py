"""The load marker: what tells a store that holds a completed load from one that lost it.

A Redis killed and restarted without persistence comes back empty, and an empty store answers every
read: each user is unknown, so each is served as a new, cold-start user, and nothing in the answers
says so. ``loader.bulk_load`` writes a marker (``keys.KeyLayout.load_marker_key``) once every user of a
load is written; a store that should hold users (``COLDWARM_REQUIRE_FEATURE_MARKER``) but has no marker
is treated as empty: its answers are flagged ``degraded_reason: "feature_store_empty"`` and ``/readyz``
is not ready.

``MarkerWatch`` reads the marker every ``COLDWARM_FEATURE_MARKER_CHECK_S`` in the background, so that
the request path reads a flag and never Redis. The flag is as old as the last read: for up to one
interval after a restart, answers may still go out unflagged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from service.feature_store.errors import FeatureStoreError
from service.feature_store.keys import MARKER_FIELDS

if TYPE_CHECKING:
    from service.feature_store import FeatureStore

log = logging.getLogger(__name__)

# The degraded reason of an answer from a store without its marker.
FEATURE_STORE_EMPTY = "feature_store_empty"
_VERSION, _TIME, _USERS = MARKER_FIELDS


@dataclass(frozen=True)
class LoadMarker:
    """One completed load: what was loaded, when (Unix seconds) and how many users it wrote. ``time``
    and ``users`` are None when the stored values are unreadable: the marker still counts as present."""

    version: str
    time: int | None
    users: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def marker_fields(marker: LoadMarker) -> dict[str, str]:
    """The marker hash as the layout stores it (decimal strings)."""
    return {_VERSION: marker.version, _TIME: str(marker.time), _USERS: str(marker.users)}


class MarkerWatch:
    """Whether the store holds a completed load, as last read.

    ``empty`` is the flag the request path reads: true only when the marker is required and a read
    succeeded and found none. A failed read changes nothing: while the store is unreachable, reads fail
    with their own reason (``feature_store_unavailable``/``_timeout``), and the last known answer stands.
    """

    def __init__(self, store: FeatureStore, required: bool, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.store, self.required, self.interval_s = store, required, interval_s
        self.marker: LoadMarker | None = None
        self.empty = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def observe(self, marker: LoadMarker | None) -> None:
        """Takes one successful read of the marker (the watch's own or /readyz's)."""
        empty = self.required and marker is None
        if empty and not self.empty:
            log.warning(
                "the feature store has no load marker: it lost its data or was never loaded; answers are "
                "flagged %r until `coldwarm load-features` has run",
                FEATURE_STORE_EMPTY,
            )
        elif self.empty and not empty:
            log.info("the feature store's load marker is back (%s): answers are no longer flagged", marker)
        self.marker, self.empty = marker, empty

    async def check(self) -> LoadMarker | None:
        """Reads the marker once and takes it; a FeatureStoreError propagates (nothing is taken)."""
        marker = await self.store.load_marker()
        self.observe(marker)
        return marker

    async def start(self) -> None:
        """A first read before serving (so that the first answers are flagged right), then one every
        ``interval_s`` in the background; nothing to watch when the marker is not required."""
        if not self.required or self._task is not None:
            return
        self._stopping.clear()
        await self._check_quietly()
        self._task = asyncio.create_task(self._run(), name="feature-store-marker-watch")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        # The flag as well as the cancel: redis-py (8.1, Python 3.11) was seen to return a reply to a
        # command cancelled while it was answered, swallowing the cancellation; a loop on "while True"
        # then went on forever and the app never finished shutting down.
        while not self._stopping.is_set():
            await asyncio.sleep(self.interval_s)
            await self._check_quietly()

    async def _check_quietly(self) -> None:
        try:
            await self.check()
        except FeatureStoreError as error:
            # The request path counts and reports an unreachable store itself; here it only means no news.
            log.debug("load marker not read: %s", error)
        except Exception:
            # A bug must not end the watch for good, leaving the flag stuck at its last value.
            log.exception("load marker check failed")
