"""The Redis key layout of the feature store; no other module spells a key.

Two keys per user, both carrying the user id as a hash tag (``{42}``) so that a Redis Cluster puts
them in one slot and the read pipeline and the ``record_event`` script may touch both::

    {prefix}:v{schema}:{<user_id>}:user      hash
        gender, age, occupation, zip_code   profile fields, stored as given ("" or absent = unknown)
        count                               interactions so far (all of them, not only the kept ones)
        first_ts, last_ts                   Unix seconds of the oldest / newest interaction
        event_ids                           ids of the last 8 events, newest first, space-separated
                                            (an event whose id is here is a retry, not applied again)
    {prefix}:v{schema}:{<user_id>}:actions   list of item ids, newest first, at most ``cap`` long

and one key per namespace, written by the loader once every user of a load is written::

    {prefix}:v{schema}:loaded                hash: the load marker
        version                             what was loaded (default: the data's fingerprint, as
                                            the model manifests record it)
        time                                Unix seconds when the load completed
        users                               users the load wrote

A store whose marker is missing holds no complete load: a Redis restarted without persistence, or
flushed, or being loaded for the first time. The service flags its answers ``feature_store_empty``
instead of serving every user as a new one (``marker.py``). On a Redis Cluster the marker is one key
in one slot, so it speaks for its own master only: it catches that master coming back empty (killed
and restarted without persistence, with no replica taking over), and the whole cluster being flushed or
recreated; it does not catch another master losing its data while the marker's master keeps it (that
master's users would be served as new users, unflagged). A replica taking over keeps what it had
replicated, marker included.

Numbers are decimal strings. A user with no keys is unknown: the service serves them as a cold-start
user (empty profile, no history, count 0), flagged degraded while the marker is missing. ``prefix``
separates deployments or tests sharing one server; ``schema_version`` is bumped whenever this layout
changes, so that a new service version reads a fresh, fully loaded key space instead of misreading the
old one (a fresh namespace has no marker until it is loaded). ``pattern()`` matches every key of one
(prefix, schema) pair, the marker included, for SCAN-based cleanup and inspection.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from model.data.schema import PROFILE_FIELDS

STATE_FIELDS: tuple[str, ...] = ("count", "first_ts", "last_ts")
EVENT_IDS_FIELD = "event_ids"
USER_FIELDS: tuple[str, ...] = (*PROFILE_FIELDS, *STATE_FIELDS)
MARKER_FIELDS: tuple[str, ...] = ("version", "time", "users")

# Characters SCAN's MATCH treats specially; escaped in pattern() so a prefix is always literal.
_GLOB_SPECIAL = "\\*?[]"


@dataclass(frozen=True)
class KeyLayout:
    prefix: str = "coldwarm"
    schema_version: int = 1

    def __post_init__(self) -> None:
        # A brace in the prefix would become the cluster hash tag and scatter a user's keys.
        if not self.prefix or "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"key prefix must be non-empty and free of braces, got {self.prefix!r}")
        if operator.index(self.schema_version) < 1:
            raise ValueError(f"schema_version must be >= 1, got {self.schema_version}")

    @property
    def namespace(self) -> str:
        return f"{self.prefix}:v{self.schema_version}"

    def user_key(self, user_id: int) -> str:
        """Hash of a user's profile and state fields."""
        return f"{self.namespace}:{{{as_user_id(user_id)}}}:user"

    def actions_key(self, user_id: int) -> str:
        """List of a user's recent item ids, newest first."""
        return f"{self.namespace}:{{{as_user_id(user_id)}}}:actions"

    def load_marker_key(self) -> str:
        """Hash of the last completed load (MARKER_FIELDS); no hash tag: it belongs to no user."""
        return f"{self.namespace}:loaded"

    def pattern(self) -> str:
        """SCAN MATCH pattern of every key in this layout's namespace."""
        escaped = "".join("\\" + c if c in _GLOB_SPECIAL else c for c in self.namespace)
        return f"{escaped}:*"


def as_user_id(user_id: int) -> int:
    """The canonical int of a user id; every store and key goes through here."""
    # operator.index accepts numpy integers but rejects floats and strings, so "42", 42.0 and 42
    # cannot name three different users.
    if isinstance(user_id, bool):
        raise TypeError("a user id must be an integer, not a bool")
    return operator.index(user_id)
