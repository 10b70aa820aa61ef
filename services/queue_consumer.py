"""The queue consumer reads `requests` in a consumer group, routes entries and writes results.

`QueueConsumer` has no Ray in it: the router call is an injected coroutine function, as
are the Redis client, the clock and `sleep`, so tests drive it against a real Redis and a
real router without waiting out intervals. `services.queue_worker` runs one per replica.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from monitoring.logging import RateLimitedWarning, get_logger
from services.codec import RequestError, error_payload
from services.queue import (
    REASON_INVALID,
    REASON_MAX_DELIVERIES,
    REASON_PAYLOAD_LOST,
    QueueStreams,
    dead_letter_fields,
    decode_payload,
    ensure_group,
    finish_entry,
    parse_autoclaim_reply,
    response_fields,
)
from services.settings import QueueSettings

__all__ = ["QueueConsumer"]

_INITIAL_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 5.0
# Seconds a last-error record outlives its entry's last failure. It is far longer than any
# claim interval, so the record still exists when the entry is dead-lettered.
_LAST_ERROR_TTL_S = 24 * 3600

Route = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class QueueConsumer:
    """One consumer of the `workers` group: at-least-once intake, exactly-once results.

    Algorithm, repeated until `stop()`:

    1. Every `reclaim_interval_s`, XAUTOCLAIM entries idle for `claim_idle_ms` (left by
       dead or stuck consumers, or by failed attempts), following the cursor until 0-0.
       An entry delivered more than `max_deliveries` times goes to `dead` with its last
       error. An entry whose payload was trimmed or deleted is dead-lettered as
       `payload_lost`. The others are processed like new entries.
    2. XREADGROUP up to `batch_size` new entries, blocking up to `block_ms`.
    3. Route every entry of the batch concurrently through `route(document)`.
    4. Finish each entry with one script: write the response to `results` (or the dead
       letter to `dead`), then XACK and XDEL the request entry. The script writes only
       while the entry is still pending, so a redelivered entry is answered at most once.

    Failure modes: a `RequestError` from decoding or from the router (malformed msgpack,
    wrong shape or dtype, unknown field, oversize) dead-letters the entry at once. Any
    other routing failure or timeout leaves the entry pending, records the error, and the
    entry is retried after `claim_idle_ms`. Redis errors (including a restart) are logged
    rate-limited and retried with backoff from 0.1 s to 5 s; a missing group is recreated.
    Cancelling `run()` mid-batch loses nothing: the batch stays pending and is reclaimed.

    The caller runs `run()` as a task and calls `stop()` then awaits the task to stop
    after the current batch. Not thread-safe; one event loop owns an instance.
    """

    def __init__(
        self,
        client,
        streams: QueueStreams,
        route: Route,
        consumer_name: str,
        config: QueueSettings,
        block_ms: int,
        max_body_bytes: int,
        metrics=None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.streams = streams
        self.route = route
        self.name = consumer_name
        self.config = config
        self.block_ms = block_ms
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.log = get_logger("queue_consumer", consumer=consumer_name, stream=streams.requests)
        self._warnings = RateLimitedWarning(interval_s=30.0, clock=clock)
        self._stopping = asyncio.Event()
        self._group_ready = False

    def stop(self) -> None:
        """Ask `run()` to return after the current batch."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until `stop()`. Every failure is logged and retried, and the loop keeps running."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self.log.info("consumer_started", group=self.streams.group)
        backoff_s = _INITIAL_BACKOFF_S
        next_reclaim = self.clock()
        try:
            while not self._stopping.is_set():
                try:
                    if not self._group_ready:
                        if await ensure_group(self.client, self.streams):
                            self.log.info("group_created", group=self.streams.group)
                        self._group_ready = True
                    if self.clock() >= next_reclaim:
                        await self.reclaim_once()
                        next_reclaim = self.clock() + self.config.reclaim_interval_s
                    await self.read_once()
                    backoff_s = _INITIAL_BACKOFF_S
                    continue
                except ResponseError as error:
                    if "NOGROUP" in str(error):
                        # The stream or group vanished, e.g. Redis restarted without persistence.
                        self.log.warning("group_missing", group=self.streams.group, error=str(error))
                        self._group_ready = False
                        continue
                    self._warnings.warn(self.log, "redis_command_failed", error=str(error), retry_in_s=backoff_s)
                except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                    self._warnings.warn(self.log, "redis_unavailable", error=repr(error), retry_in_s=backoff_s)
                except Exception as error:  # noqa: BLE001 - the loop must outlive any bug in one pass
                    self.log.exception("consumer_pass_failed", error=repr(error), retry_in_s=backoff_s)
                await self.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
        finally:
            self.log.info("consumer_stopped")

    # --- one pass ------------------------------------------------------------------------

    async def read_once(self) -> int:
        """Read and process one batch of new entries, and return how many were read."""
        replies = await self.client.xreadgroup(
            self.streams.group, self.name, {self.streams.requests: ">"},
            count=self.config.batch_size, block=self.block_ms,
        )
        entries = [(_text(entry_id), fields) for _, stream_entries in replies or [] for entry_id, fields in stream_entries]
        await self._process_all([(entry_id, fields, 1) for entry_id, fields in entries])
        return len(entries)

    async def reclaim_once(self) -> int:
        """Claim idle entries of any consumer, following the XAUTOCLAIM cursor until 0-0.

        Returns the number of entries claimed (processed, dead-lettered or lost).
        """
        claimed = 0
        cursor = "0-0"
        while True:
            reply = await self.client.xautoclaim(
                self.streams.requests, self.streams.group, self.name, self.config.claim_idle_ms,
                start_id=cursor, count=self.config.batch_size,
            )
            page = parse_autoclaim_reply(reply)
            claimed += await self._handle_claimed_page(cursor, page)
            if page.next_cursor == "0-0":
                break
            cursor = page.next_cursor
        await self._report_backlog()
        if claimed:
            self.log.info("entries_reclaimed", count=claimed)
        return claimed

    async def _handle_claimed_page(self, cursor: str, page) -> int:
        lost_ids = list(page.deleted_ids)
        work: list[tuple[str, dict, int]] = []
        if page.entries or page.nil_entries:
            pending = await self._pending_owned(cursor, page.next_cursor)
            deliveries = {entry["message_id"]: entry["times_delivered"] for entry in pending}
            live_ids = {entry_id for entry_id, _ in page.entries}
            if page.nil_entries:
                # Redis 6.2 names no id for a deleted entry: find our pending ids in the page
                # range that are not among the live entries and whose payload is gone.
                lost_ids += await self._missing_payload_ids([i for i in deliveries if i not in live_ids])
            for entry_id, fields in page.entries:
                work.append((entry_id, fields, deliveries.get(entry_id, 1)))

        for entry_id in lost_ids:
            error = RequestError(410, "payload_lost", f"stream entry {entry_id} was trimmed or deleted before "
                                 "it was answered; send the request again", field="payload")
            # Redis 7 has already removed `deleted_ids` from the pending list.
            await self._dead_letter(entry_id, REASON_PAYLOAD_LOST, error, deliveries=0, request_id=None,
                                    payload=None, require_pending=entry_id not in page.deleted_ids)

        fresh = []
        for entry_id, fields, count in work:
            if count > self.config.max_deliveries:
                await self._dead_letter(entry_id, REASON_MAX_DELIVERIES, await self._last_error(entry_id, count),
                                        deliveries=count, request_id=_text(fields.get(b"request_id")),
                                        payload=fields.get(b"payload"))
            else:
                fresh.append((entry_id, fields, count))
        self._count("reclaimed", len(fresh))
        await self._process_all(fresh)
        return len(lost_ids) + len(work)

    async def _pending_owned(self, cursor: str, next_cursor: str) -> list[dict[str, Any]]:
        upper = "+" if next_cursor == "0-0" else f"({next_cursor}"
        # One XAUTOCLAIM call scans at most 10 x COUNT pending entries (Redis 6.2 and 7), so
        # the page range [cursor, next_cursor) contains no more than that.
        pending = await self.client.xpending_range(
            self.streams.requests, self.streams.group, min=cursor, max=upper,
            count=10 * self.config.batch_size + 100, consumername=self.name,
        )
        for entry in pending:
            entry["message_id"] = _text(entry["message_id"])
        return pending

    async def _missing_payload_ids(self, candidates: list[str]) -> list[str]:
        missing = []
        for entry_id in candidates:
            if not await self.client.xrange(self.streams.requests, entry_id, entry_id, count=1):
                missing.append(entry_id)
        return missing

    async def _last_error(self, entry_id: str, deliveries: int) -> RequestError:
        recorded = await self.client.hget(self.streams.last_errors, entry_id)
        if recorded is not None:
            body = msgpack.unpackb(recorded, raw=False)["error"]
            return RequestError(503, body["code"], f"delivered {deliveries} times; last error: {body['message']}",
                                field=body.get("field"))
        return RequestError(503, "max_deliveries", f"delivered {deliveries} times without a result "
                            f"(limit {self.config.max_deliveries}); no error was recorded")

    # --- one entry -----------------------------------------------------------------------

    async def _process_all(self, work: list[tuple[str, dict, int]]) -> None:
        if not work:
            return
        outcomes = await asyncio.gather(*(self._process(*item) for item in work), return_exceptions=True)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            # Entries whose finishing step failed stay pending and are reclaimed later.
            raise failures[0]

    async def _process(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        payload = fields.get(b"payload")
        request_id = _text(fields.get(b"request_id"))
        log = self.log.bind(stream_id=entry_id, request_id=request_id)
        try:
            document = decode_payload(payload, self.max_body_bytes)
            if isinstance(document, dict):
                # Without a request_id, the entry id becomes the request_id of the result.
                document.setdefault("request_id", request_id or entry_id)
                if isinstance(document["request_id"], str):
                    request_id = document["request_id"]
            response = await asyncio.wait_for(self.route(document), self.config.route_timeout_s)
        except RequestError as error:
            error = getattr(error, "cause", error)  # Ray wraps exceptions raised in a replica
            log.warning("request_rejected", code=error.code, field=error.field, message=error.message)
            await self._dead_letter(entry_id, REASON_INVALID, error, deliveries, request_id, payload)
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a routing failure leaves the entry for a retry
            message = (f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)[:500]
            self._warnings.warn(log, "route_failed", error=message, deliveries=deliveries)
            await self._record_error(entry_id, RequestError(503, "unavailable", message))
            self._count("retry")
            return

        written = await finish_entry(self.client, self.streams, entry_id, self.streams.results,
                                     response_fields(response["request_id"], response),
                                     self.config.results_max_length)
        self._count("answered" if written else "duplicate")

    async def _dead_letter(self, entry_id: str, reason: str, error: RequestError, deliveries: int,
                           request_id: str | None, payload: bytes | None, require_pending: bool = True) -> None:
        fields = dead_letter_fields(entry_id, reason, error, deliveries, request_id, payload)
        written = await finish_entry(self.client, self.streams, entry_id, self.streams.dead, fields,
                                     self.config.dead_max_length, require_pending=require_pending)
        if written:
            self.log.warning("dead_lettered", stream_id=entry_id, request_id=request_id, reason=reason,
                             code=error.code, deliveries=deliveries)
            self._count("dead_lettered")
            if self.metrics is not None:
                self.metrics.dead_letters.inc(1, tags={"reason": reason})
        else:
            self._count("duplicate")

    async def _record_error(self, entry_id: str, error: RequestError) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.streams.last_errors, entry_id, msgpack.packb(error_payload(error), use_bin_type=True))
            pipe.expire(self.streams.last_errors, _LAST_ERROR_TTL_S)
            await pipe.execute()

    # --- metrics -------------------------------------------------------------------------

    def _count(self, outcome: str, value: int = 1) -> None:
        if self.metrics is not None and value:
            self.metrics.messages.inc(value, tags={"outcome": outcome})

    async def _report_backlog(self) -> None:
        if self.metrics is not None:
            self.metrics.backlog.set(await self.client.xlen(self.streams.requests))


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
