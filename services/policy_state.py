"""Routing-policy state in Redis, and the cache every router replica follows.

Keys, under `<prefix>supervisor:`:

- `state` (hash): `state` (moe, canary, dense, paused), `moe_weight` (0..1),
  `version` (increases by one per change), the supervisor's bookkeeping (failed
  windows, when the state began, the state before a pause) and `updated_at`.
- `events` (stream): one entry per change with `time`, `actor` (api or automatic),
  `from`, `to`, `moe_weight`, `version`, `reason` and `metrics` (JSON).
- `policy` (pub/sub channel): the new version after each change.

`PolicyStore.transition` changes the state, appends the event and publishes in one Lua
script, guarded by the version the caller read, so two writers can never both apply a
change computed from the same old state.

A request goes to the mixture when `route_fraction(request_id) < moe_weight`. The
fraction is the first 8 bytes of sha256(request_id) read as a number in [0, 1), so a
retried request with the same id takes the same path under the same weight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from monitoring.logging import RateLimitedWarning, get_logger

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_STATES",
    "PolicyCache",
    "PolicySnapshot",
    "PolicyStore",
    "SupervisorKeys",
    "TransitionConflict",
    "route_fraction",
]

POLICY_STATES = ("moe", "canary", "dense", "paused")


def route_fraction(request_id: str) -> float:
    """Map a request id to [0, 1) deterministically (first 8 bytes of its sha256)."""
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class SupervisorKeys:
    """Redis key names of the supervisor's state, events, quality records and predictions."""

    prefix: str

    @property
    def state(self) -> str:
        return f"{self.prefix}supervisor:state"

    @property
    def events(self) -> str:
        return f"{self.prefix}supervisor:events"

    @property
    def channel(self) -> str:
        return f"{self.prefix}supervisor:policy"

    @property
    def quality(self) -> str:
        return f"{self.prefix}supervisor:quality"

    @property
    def window(self) -> str:
        return f"{self.prefix}supervisor:window"

    def prediction(self, request_id: str) -> str:
        return f"{self.prefix}supervisor:prediction:{request_id}"


@dataclass(frozen=True)
class PolicySnapshot:
    """The routing policy and the supervisor's bookkeeping, as stored in the state hash."""

    state: str = "moe"
    moe_weight: float = 1.0
    version: int = 0
    failed_windows: int = 0  # consecutive failed windows in the current state
    passed_windows: int = 0  # consecutive passed windows in the current canary step
    state_since: float = 0.0  # supervisor clock time when the state began
    paused_from: str = ""  # the state before `paused`
    updated_at: float = 0.0  # unix time of the last change

    def sends_to_moe(self, request_id: str) -> bool:
        """Return whether this request goes to the mixture under this policy."""
        if self.moe_weight >= 1.0:
            return True
        if self.moe_weight <= 0.0:
            return False
        return route_fraction(request_id) < self.moe_weight

    def to_fields(self) -> dict[str, str]:
        return {name: str(value) for name, value in self.__dict__.items()}

    @classmethod
    def from_fields(cls, fields: dict[bytes | str, bytes | str]) -> PolicySnapshot:
        """Parse a state hash; a missing hash is the default policy (everything to the mixture)."""
        decoded = {_text(key): _text(value) for key, value in fields.items()}
        if not decoded:
            return DEFAULT_POLICY
        return cls(
            state=decoded.get("state", "moe"),
            moe_weight=float(decoded.get("moe_weight", 1.0)),
            version=int(decoded.get("version", 0)),
            failed_windows=int(decoded.get("failed_windows", 0)),
            passed_windows=int(decoded.get("passed_windows", 0)),
            state_since=float(decoded.get("state_since", 0.0)),
            paused_from=decoded.get("paused_from", ""),
            updated_at=float(decoded.get("updated_at", 0.0)),
        )


DEFAULT_POLICY = PolicySnapshot()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class TransitionConflict(RuntimeError):
    """Another writer changed the policy after the caller read it; read again and retry."""


# KEYS: state hash, events stream. ARGV: expected version, channel, max events, event field
# count, event fields..., state fields... Returns 1 when applied, 0 on a version mismatch.
_TRANSITION_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'version')
if (current or '0') ~= ARGV[1] then
  return 0
end
local event_count = tonumber(ARGV[4])
local event = {}
for i = 5, 4 + event_count do
  event[#event + 1] = ARGV[i]
end
local state = {}
for i = 5 + event_count, #ARGV do
  state[#state + 1] = ARGV[i]
end
if #state > 0 then
  redis.call('HSET', KEYS[1], unpack(state))
end
if event_count > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(event))
  redis.call('PUBLISH', ARGV[2], redis.call('HGET', KEYS[1], 'version') or '0')
end
return 1
"""


@dataclass
class Event:
    """One policy change, as appended to the events stream."""

    time: float
    actor: str  # "api" or "automatic"
    from_state: str
    to_state: str
    moe_weight: float
    version: int
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_fields(self) -> list[str]:
        pairs = {"time": repr(self.time), "actor": self.actor, "from": self.from_state, "to": self.to_state,
                 "moe_weight": repr(self.moe_weight), "version": str(self.version), "reason": self.reason,
                 "metrics": json.dumps(self.metrics, sort_keys=True)}
        return [item for pair in pairs.items() for item in pair]

    @staticmethod
    def decode(entry_id: bytes | str, fields: dict[bytes | str, bytes | str]) -> dict[str, Any]:
        decoded = {_text(key): _text(value) for key, value in fields.items()}
        return {
            "id": _text(entry_id),
            "time": float(decoded.get("time", 0.0)),
            "actor": decoded.get("actor", ""),
            "from": decoded.get("from", ""),
            "to": decoded.get("to", ""),
            "moe_percent": round(float(decoded.get("moe_weight", 0.0)) * 100.0, 3),
            "policy_version": int(decoded.get("version", 0)),
            "reason": decoded.get("reason", ""),
            "metrics": json.loads(decoded.get("metrics") or "{}"),
        }


class PolicyStore:
    """Reads and changes the policy state in Redis with an asyncio client.

    Safe for several processes: every change is a compare-and-set on `version`.
    """

    def __init__(self, redis, keys: SupervisorKeys, max_events: int = 10_000) -> None:
        self.redis = redis
        self.keys = keys
        self.max_events = max_events
        self._script = redis.register_script(_TRANSITION_SCRIPT)

    async def read(self) -> PolicySnapshot:
        return PolicySnapshot.from_fields(await self.redis.hgetall(self.keys.state))

    async def save_bookkeeping(self, expected: PolicySnapshot, updated: PolicySnapshot) -> bool:
        """Store counters (failed and passed windows) without a new version, event or notification."""
        applied = await self._script(keys=[self.keys.state, self.keys.events],
                                     args=[str(expected.version), self.keys.channel, str(self.max_events), "0",
                                           *_flatten(replace(updated, version=expected.version).to_fields())])
        return bool(applied)

    async def transition(self, expected: PolicySnapshot, state: str, moe_weight: float, actor: str, reason: str,
                         now: float, metrics: dict[str, Any] | None = None, paused_from: str | None = None
                         ) -> tuple[PolicySnapshot, dict[str, Any]]:
        """Move to `state` with `moe_weight`, append the event and notify routers, atomically.

        Raises:
            TransitionConflict: the stored version is no longer `expected.version`.
        """
        if state not in POLICY_STATES:
            raise ValueError(f"state must be one of {list(POLICY_STATES)}, got {state!r}")
        updated = PolicySnapshot(
            state=state,
            moe_weight=round(min(max(moe_weight, 0.0), 1.0), 6),
            version=expected.version + 1,
            failed_windows=0,
            passed_windows=0,
            state_since=now,
            paused_from=expected.paused_from if paused_from is None else paused_from,
            updated_at=time.time(),
        )
        event = Event(time=updated.updated_at, actor=actor, from_state=expected.state, to_state=state,
                      moe_weight=updated.moe_weight, version=updated.version, reason=reason, metrics=metrics or {})
        event_fields = event.to_fields()
        applied = await self._script(
            keys=[self.keys.state, self.keys.events],
            args=[str(expected.version), self.keys.channel, str(self.max_events), str(len(event_fields)),
                  *event_fields, *_flatten(updated.to_fields())],
        )
        if not applied:
            raise TransitionConflict(f"policy changed after version {expected.version} was read")
        return updated, Event.decode("", dict(zip(event_fields[::2], event_fields[1::2])))

    async def events(self, limit: int) -> list[dict[str, Any]]:
        """Return the newest `limit` events, oldest first."""
        entries = await self.redis.xrevrange(self.keys.events, count=limit)
        return [Event.decode(entry_id, fields) for entry_id, fields in reversed(entries)]


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


class PolicyCache:
    """A router replica's local copy of the policy, so that no request waits on Redis.

    A background task subscribes to the policy channel and re-reads the state hash on
    every notification and at least every `poll_interval_s`, so a missed notification
    costs at most one poll interval. While Redis is unreachable the cache keeps the
    last policy it read (the default, everything to the mixture, before the first
    read), logs a rate-limited warning, and re-subscribes when Redis returns.

    Call `start()` from the replica's event loop and `stop()` when the replica stops.
    """

    def __init__(self, redis, keys: SupervisorKeys, poll_interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.keys = keys
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.snapshot = DEFAULT_POLICY
        self.last_refresh: float | None = None  # clock time of the last successful read
        self.log = get_logger("policy_cache")
        self._warnings = RateLimitedWarning(interval_s=30.0, clock=clock)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def refresh(self) -> PolicySnapshot:
        """Re-read the state hash now; keeps the old snapshot if Redis fails (and re-raises)."""
        snapshot = PolicySnapshot.from_fields(await self.redis.hgetall(self.keys.state))
        if snapshot.version != self.snapshot.version or snapshot.moe_weight != self.snapshot.moe_weight:
            self.log.info("policy_changed", state=snapshot.state, moe_weight=snapshot.moe_weight,
                          policy_version=snapshot.version, previous_version=self.snapshot.version)
        self.snapshot = snapshot
        self.last_refresh = self.clock()
        return snapshot

    async def _follow(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.channel)
                # Read only after the server confirmed the subscription, so no change made
                # after this read can go unnoticed until the next poll.
                confirmation = await pubsub.get_message(timeout=self.poll_interval_s)
                if confirmation is None or confirmation["type"] != "subscribe":
                    raise TimeoutError(f"no subscription confirmation within {self.poll_interval_s} s")
                await self.refresh()
                while True:
                    # A notification or the poll interval, whichever comes first, triggers a re-read.
                    await pubsub.get_message(timeout=self.poll_interval_s)
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the loop must outlive Redis outages
                self._warnings.warn(self.log, "policy_refresh_failed", error=repr(error),
                                    policy_version=self.snapshot.version,
                                    retry_in_s=self.poll_interval_s)
                await asyncio.sleep(self.poll_interval_s)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001 - the connection may already be gone
                    pass
