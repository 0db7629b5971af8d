"""The feature store over Redis (layout in ``keys.py``), for the async service.

Every call is bounded by ``timeout_s`` and every failure to talk to Redis surfaces as one
``FeatureStoreError``, so the service can answer from a cold-start description instead of failing.
Reads are forgiving: data the store cannot parse (a non-numeric count, a key of the wrong type) counts
as missing, and the user is served with what remains.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from redis.asyncio.cluster import PipelineCommand
from redis.crc import key_slot
from redis.exceptions import RedisError

from model.data.schema import PROFILE_FIELDS
from service.feature_store.client import DEFAULT_TIMEOUT_S, AsyncClient, cluster_connections, is_cluster
from service.feature_store.errors import FeatureStoreError, as_store_error, redis_failures
from service.feature_store.keys import EVENT_IDS_FIELD, MARKER_FIELDS, KeyLayout, as_user_id
from service.feature_store.marker import LoadMarker
from service.feature_store.records import (
    DEFAULT_CAP,
    EVENT_IDS_KEPT,
    EVENT_ITEM_SEPARATOR,
    EventIdConflictError,
    UserRecord,
    check_event,
    check_event_id,
    check_profile,
)

logger = logging.getLogger(__name__)

_INTEGER = re.compile(r"-?[0-9]+")
# Ids the store gives events that came without one (the API's ids cannot contain "~").
AUTO_EVENT_ID_PREFIX = "~"
# 48 random bits: a retry must find its id among a user's last few; each of those ids is stored in the
# user's hash, 13 bytes instead of 33 for a whole uuid (about 100 bytes a user).
AUTO_EVENT_ID_HEX = 12
# The hash fields a record reads, as (name, name as redis-py returns it without decoding).
_PROFILE_KEYS = tuple((name, name.encode()) for name in PROFILE_FIELDS)
_COUNT, _FIRST_TS, _LAST_TS = (name.encode() for name in ("count", "first_ts", "last_ts"))

T = TypeVar("T")

# KEYS[1] user hash, KEYS[2] actions list; ARGV[1] item id, ARGV[2] timestamp, ARGV[3] cap, ARGV[4] event
# id ("" for none), ARGV[5] event ids kept. One script, so a concurrent reader or writer never sees the
# list and the state disagree. Numbers go back to Redis as the caller's strings or via %d: Lua's own
# number formatting may use exponents. An event id already among the user's last ones is not applied
# again: the client's one retry after a lost reply, or the caller's retry after a 503, counts once.
_RECORD_EVENT_LUA = f"""
local function as_int(value)
  if type(value) == 'string' and string.match(value, '^%-?%d+$') then
    return tonumber(value)
  end
  return nil
end
local ts = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local event_id = ARGV[4]
local seen = redis.call('HGET', KEYS[1], '{EVENT_IDS_FIELD}') or ''
local entry = event_id .. '{EVENT_ITEM_SEPARATOR}' .. ARGV[1]
if event_id ~= '' then
  local padded = ' ' .. seen .. ' '
  -- The same id for the same item (or an id kept before items were): a retry, applied once.
  local same = string.find(padded, ' ' .. entry .. ' ', 1, true)
  if same or string.find(padded, ' ' .. event_id .. ' ', 1, true) then
    return {{redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, cap - 1)}}
  end
  -- The same id for another item: a third element tells the caller.
  if string.find(padded, ' ' .. event_id .. '{EVENT_ITEM_SEPARATOR}', 1, true) then
    return {{redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, cap - 1), 1}}
  end
end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, cap - 1)
-- A damaged count restarts from the kept actions rather than failing every later event.
local count = math.max((as_int(redis.call('HGET', KEYS[1], 'count')) or 0) + 1, redis.call('LLEN', KEYS[2]))
redis.call('HSET', KEYS[1], 'count', string.format('%d', count))
local first = as_int(redis.call('HGET', KEYS[1], 'first_ts'))
if first == nil or ts < first then
  redis.call('HSET', KEYS[1], 'first_ts', ARGV[2])
end
local last = as_int(redis.call('HGET', KEYS[1], 'last_ts'))
if last == nil or ts > last then
  redis.call('HSET', KEYS[1], 'last_ts', ARGV[2])
end
if event_id ~= '' then
  local kept = {{entry}}
  for id in string.gmatch(seen, '%S+') do
    if #kept >= tonumber(ARGV[5]) then break end
    kept[#kept + 1] = id
  end
  redis.call('HSET', KEYS[1], '{EVENT_IDS_FIELD}', table.concat(kept, ' '))
end
return {{redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, cap - 1)}}
"""


class NotReplicatedError(RedisError):
    """WAIT returned fewer replicas than asked for: the write is not acknowledged."""


class RedisFeatureStore:
    """User records in Redis, or in a Redis Cluster, through the caller's client (and its connections).

    On a cluster every operation on one user stays in the user's slot (both keys carry the user id as
    a hash tag): the event script is routed by its keys, and a user's MULTI read by its slot. A read of
    many users runs one MULTI per slot, concurrently, and puts the records back in the order asked.
    """

    def __init__(
        self,
        client: AsyncClient,
        layout: KeyLayout | None = None,
        cap: int = DEFAULT_CAP,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 50,
    ) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.client = client
        self.layout = layout or KeyLayout()
        self.cap = cap
        self.timeout_s = timeout_s
        # WAIT after each event: it is acknowledged only once this many replicas have it.
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self.cluster = is_cluster(client)
        self._failures = redis_failures()
        # A cluster client has no blocking pool: beyond max_connections calls to one node it raises,
        # and a burst of new connections made it drop in-flight ones (whose retries then applied
        # events twice). Callers beyond the limit wait here instead, within the call's timeout.
        self._in_flight = asyncio.Semaphore(cluster_connections(client)) if self.cluster else None
        # A cluster client discovers the slot map on its first command; concurrent first commands
        # raced each other and broke connections in use (a burst of 200 events: 11-69 failed, some
        # applied twice). The map is read once, by the first caller, before any command is sent.
        self._slot_map_read = asyncio.Lock() if self.cluster else None
        self._slot_map_known = self._slot_map_read_before = False
        self._record_event = client.register_script(_RECORD_EVENT_LUA)

    async def get_users(self, user_ids: Sequence[int]) -> list[UserRecord]:
        """Records in the order asked, unknown users as ``UserRecord.unknown``; one round trip (per slot
        on a cluster)."""
        if not len(user_ids):
            return []
        ids = [as_user_id(u) for u in user_ids]
        read = self._read_by_slot(ids) if self.cluster else self._read(ids)
        replies = await self._bounded("get_users", read)
        return [
            parse_record(user_id, replies[2 * row], replies[2 * row + 1]) for row, user_id in enumerate(ids)
        ]

    async def _read_by_slot(self, user_ids: list[int]) -> list[Any]:
        """``_read``'s replies, from one MULTI per slot (a MULTI cannot span slots on a cluster)."""
        rows_by_slot: dict[int, list[int]] = {}
        for row, user_id in enumerate(user_ids):
            rows_by_slot.setdefault(key_slot(self.layout.user_key(user_id).encode()), []).append(row)
        groups = list(rows_by_slot.values())
        parts = await asyncio.gather(
            *(self._read([user_ids[row] for row in rows]) for rows in groups), return_exceptions=True
        )
        # Every slot's read is awaited (no error left unretrieved), then the first failure is the call's.
        failure = next((part for part in parts if isinstance(part, BaseException)), None)
        if failure is not None:
            raise failure
        replies: list[Any] = [None] * (2 * len(user_ids))
        for rows, part in zip(groups, parts, strict=True):
            for at, row in enumerate(rows):
                replies[2 * row], replies[2 * row + 1] = part[2 * at], part[2 * at + 1]
        return replies

    async def _read(self, user_ids: list[int]) -> list[Any]:
        layout, last = self.layout, self.cap - 1
        # MULTI/EXEC: a user's hash and list are read at one instant, never across a concurrent event
        # (the record_event script is atomic, but two separate reads could straddle it).
        async with self.client.pipeline(transaction=True) as pipe:
            for user_id in user_ids:
                pipe.hgetall(layout.user_key(user_id))
                pipe.lrange(layout.actions_key(user_id), 0, last)
            # Per-command errors (a key of the wrong type) come back as values, so one damaged
            # user does not fail the whole batch; lost connections still raise.
            return await pipe.execute(raise_on_error=False)

    async def record_event(
        self, user_id: int, item_id: int, timestamp: int, event_id: str | None = None
    ) -> UserRecord:
        """Appends one interaction atomically and returns the user's new record."""
        user_id, item_id, timestamp = check_event(user_id, item_id, timestamp)
        # An event without the caller's id gets one of ours: redis-py re-sends a command once when its
        # connection breaks, and the first send may already have run; the script applies an id once.
        event_id = check_event_id(event_id) or f"{AUTO_EVENT_ID_PREFIX}{uuid.uuid4().hex[:AUTO_EVENT_ID_HEX]}"
        args = [item_id, timestamp, self.cap, event_id, EVENT_IDS_KEPT]
        keys = [self.layout.user_key(user_id), self.layout.actions_key(user_id)]
        write = (
            self._write_and_wait(keys, args)
            if self.wait_replicas
            else self._record_event(keys=keys, args=args)
        )
        reply = await self._bounded("record_event", write)
        if len(reply) > 2:
            raise EventIdConflictError(user_id, event_id, item_id)
        fields, actions = reply[0], reply[1]
        return parse_record(user_id, fields, actions)

    async def _write_and_wait(self, keys: list[str], args: list[Any]) -> Any:
        """The event script, then WAIT on the same connection (WAIT counts the replicas that have its
        own connection's writes); fewer than ``wait_replicas`` within the timeout is a failure: the
        event is applied on the master but not acknowledged, and the caller's retry with its event id
        counts once."""
        script = ("EVAL", _RECORD_EVENT_LUA, 2, *keys, *args)
        wait = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
        if self.cluster:
            # One connection to the keys' master: redis-py's cluster pipeline cannot route a keyless WAIT.
            commands = [PipelineCommand(0, *script), PipelineCommand(1, *wait)]
            await self.client.get_node_from_key(keys[0]).execute_pipeline(commands)
            reply, acked = (command.result for command in commands)
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command(*script)
                pipe.execute_command(*wait)
                reply, acked = await pipe.execute(raise_on_error=False)
        for result in (reply, acked):
            if isinstance(result, BaseException):
                # A master that moved (a failover) answers MOVED: read the slot map again next time.
                self._slot_map_known = False
                raise result
        if int(acked) < self.wait_replicas:
            raise NotReplicatedError(
                f"{acked} of {self.wait_replicas} replicas acknowledged within {self.wait_timeout_ms} ms"
            )
        return reply

    async def put_profile(self, user_id: int, fields: Mapping[str, str]) -> None:
        """Sets the given profile fields, leaving the others and the user's state untouched."""
        profile = check_profile(fields)
        if not profile:
            return
        key = self.layout.user_key(user_id)
        await self._bounded("put_profile", self.client.hset(key, mapping=profile))

    async def ping(self) -> bool:
        """True when Redis answers within the timeout (on a cluster: when the cluster says its state
        is ok, i.e. every slot is served); never raises, for health checks."""
        try:
            if self.cluster:
                return await self.cluster_state() == "ok"
            return bool(await self._bounded("ping", self.client.ping()))
        except FeatureStoreError:
            return False

    async def load_marker(self) -> LoadMarker | None:
        """The loader's marker (one HGETALL, within the timeout); None when the key does not exist."""
        fields = await self._bounded("load_marker", self.client.hgetall(self.layout.load_marker_key()))
        return parse_marker(fields)

    async def cluster_state(self) -> str | None:
        """CLUSTER INFO's cluster_state ("ok" or "fail") as a node the client knows reports it; None for
        a single Redis."""
        if not self.cluster:
            return None
        info = await self._bounded("cluster_info", self.client.cluster_info())
        return str(_as_text(info.get("cluster_state", "unknown")))

    async def _read_slot_map(self) -> None:
        assert self._slot_map_read is not None
        async with self._slot_map_read:
            if self._slot_map_known:
                return
            if self._slot_map_read_before:
                await self.client.nodes_manager.initialize()  # again: a master moved
            else:
                await self.client.initialize()
            self._slot_map_known = self._slot_map_read_before = True

    async def _bounded(self, operation: str, call: Coroutine[Any, Any, T]) -> T:
        """Awaits ``call`` within ``timeout_s``, any failure to talk to Redis as a FeatureStoreError.

        A plain coroutine rather than an ``@asynccontextmanager``: that one's generator cost a few µs
        per read, a sizeable share of a single-user read (bench/store_read.py).
        """
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._in_flight is None:
                    return await call
                if not self._slot_map_known:
                    try:
                        await self._read_slot_map()
                    except BaseException:
                        call.close()  # never sent: no "coroutine was never awaited" warning
                        raise
                async with self._in_flight:
                    return await call
        except TimeoutError as exc:
            raise as_store_error(operation, exc, self.timeout_s) from exc
        except self._failures as exc:
            raise as_store_error(operation, exc, self.timeout_s) from exc


def parse_record(user_id: int, fields: Any, actions: Any) -> UserRecord:
    """A record from HGETALL and LRANGE replies (dict or flat list, bytes or str, or an error).

    Only the fields a record holds are decoded, and an all-digit actions list (the usual one) is
    converted in one go; anything else takes the per-value path, with the same rules.
    """
    mapping = _as_mapping(user_id, fields)
    items = _as_list(user_id, actions)
    if not mapping and not items:
        return UserRecord.unknown(user_id)
    if mapping and type(next(iter(mapping))) is bytes:
        get = mapping.get
        profile = {}
        for name, raw_name in _PROFILE_KEYS:
            value = get(raw_name)
            if value is not None and (text := _as_text(value)):
                profile[name] = text
        count, first_ts, last_ts = _as_int(get(_COUNT)), _as_int(get(_FIRST_TS)), _as_int(get(_LAST_TS))
    else:
        text = {_as_text(key): value for key, value in mapping.items()}
        profile = {name: _as_text(text[name]) for name in PROFILE_FIELDS if _as_text(text.get(name, ""))}
        count, first_ts, last_ts = (_as_int(text.get(name)) for name in ("count", "first_ts", "last_ts"))
    return UserRecord(
        user_id=user_id,
        profile=profile,
        actions=_as_actions(items),
        count=count if count is not None and count >= 0 else 0,
        first_ts=first_ts,
        last_ts=last_ts,
        found=True,
    )


def _as_mapping(user_id: int, reply: Any) -> dict[Any, Any]:
    """The hash as returned (keys and values not decoded), or {} when unreadable."""
    if isinstance(reply, dict):
        return reply
    if isinstance(reply, list | tuple):  # HGETALL inside a script replies with a flat list
        return dict(zip(reply[::2], reply[1::2], strict=False))
    if isinstance(reply, Exception):
        logger.warning("user %s: unreadable user hash, treated as missing: %s", user_id, reply)
    else:
        logger.warning("user %s: unexpected user hash reply %r, treated as missing", user_id, reply)
    return {}


def _as_list(user_id: int, reply: Any) -> list[Any] | tuple[Any, ...]:
    if isinstance(reply, list | tuple):
        return reply
    if isinstance(reply, Exception):
        logger.warning("user %s: unreadable actions list, treated as empty: %s", user_id, reply)
    else:
        logger.warning("user %s: unexpected actions reply %r, treated as empty", user_id, reply)
    return []


def _as_actions(items: list[Any] | tuple[Any, ...]) -> list[int]:
    """Item ids of the list's well-formed, non-negative entries, in order."""
    if not items:
        return []
    try:
        joined: bytes | str = b"".join(items)
    except TypeError:
        try:  # a client that decodes responses
            joined = "".join(items)
        except TypeError:
            joined = ""
    # Only ASCII digits (str.isdigit alone accepts other scripts' digits): every entry is a
    # non-negative integer, unless one is empty or too long for int().
    if joined.isascii() and joined.isdigit():
        try:
            return list(map(int, items))
        except (ValueError, TypeError):
            pass
    return [item for item in (_as_int(raw) for raw in items) if item is not None and item >= 0]


def parse_marker(fields: Any) -> LoadMarker | None:
    """The load marker from an HGETALL reply (bytes or str), None when the hash does not exist; ``time``
    and ``users`` are None when unreadable (the marker still counts as present)."""
    if not fields:
        return None
    text = {_as_text(name): value for name, value in fields.items()}
    version, loaded_at, users = (text.get(name) for name in MARKER_FIELDS)
    text_version = _as_text(version) if version is not None else ""
    return LoadMarker(version=text_version, time=_as_count(loaded_at), users=_as_count(users))


def _as_count(value: Any) -> int | None:
    """A non-negative integer field (a time, a number of users), None when absent, malformed or negative."""
    number = _as_int(value)
    return number if number is not None and number >= 0 else None


def _as_text(value: Any) -> str:
    # Clients may or may not decode responses; values are stored as given, so never fail on bytes.
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _as_int(value: Any) -> int | None:
    """An integer field, or None when absent or malformed (same rule as the Lua script's)."""
    if value is None:
        return None
    if type(value) is not bytes or not value.isdigit():  # bytes.isdigit: ASCII digits only
        value = _as_text(value)
        if not _INTEGER.fullmatch(value):
            return None
    try:
        return int(value)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return None
