"""Redis Streams queue: stream names, producer, result reader and the atomic finishing step.

Producers add entries to `<prefix>requests` with the fields `payload` (msgpack of the
`/v1/predict` body, including `request_id`) and `request_id`. Workers read them through
the consumer group `workers` (see `services.queue_consumer`), write each response to
`<prefix>results` (`request_id`, `payload` = msgpack of the HTTP response body) or a dead
letter to `<prefix>dead`, and then acknowledge and delete the request entry.

Because a finished entry is deleted, the length of `requests` is the backlog
(undelivered plus pending entries). The producer uses it as the bound: an entry is added
only while the stream is shorter than `max_length`, so unprocessed work is never trimmed.

Python client:

    client = create_async_client(settings.redis)
    streams = QueueStreams.from_prefix(settings.redis.key_prefix)
    report = await submit_and_wait(client, streams, rows, labels=labels, max_length=10_000)
    print(report.to_dict())  # {"sent", "answered", "dead_lettered", "lost", "accuracy"}
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from services.codec import MSGPACK, RequestError, decode_tensor, encode_body, encode_tensor, error_payload

__all__ = [
    "GROUP",
    "REASON_INVALID",
    "REASON_MAX_DELIVERIES",
    "REASON_PAYLOAD_LOST",
    "AutoclaimPage",
    "QueueFullError",
    "QueueResults",
    "QueueStreams",
    "SubmitReport",
    "dead_letter_fields",
    "decode_payload",
    "ensure_group",
    "finish_entry",
    "parse_autoclaim_reply",
    "response_fields",
    "stream_end_id",
    "submit_and_wait",
    "submit_requests",
    "wait_for_results",
]

GROUP = "workers"

# Dead-letter reasons.
REASON_INVALID = "invalid_request"
REASON_MAX_DELIVERIES = "max_deliveries"
REASON_PAYLOAD_LOST = "payload_lost"

# KEYS[1] = requests stream, ARGV[1] = max length, ARGV[2..] = field, value pairs.
# Checking the length and adding in one script keeps concurrent producers under the bound.
_ADD_BOUNDED = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return false
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""

# KEYS[1] = requests stream, KEYS[2] = output stream (results or dead), KEYS[3] = last-error hash.
# ARGV[1] = group, ARGV[2] = request entry id, ARGV[3] = "1" to require that the entry is
# still pending, ARGV[4] = approximate max length of the output stream, ARGV[5..] = fields.
# The output entry is written first, then the request entry is acknowledged and deleted,
# all in one script. A second finisher of the same entry (a redelivery) finds it no longer
# pending and writes nothing, so each request entry yields at most one output entry.
_FINISH = """
if ARGV[3] == '1' then
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
  if #pending == 0 then
    return false
  end
end
local output_id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return output_id
"""


class QueueFullError(RuntimeError):
    """The requests stream stayed at its maximum length for longer than the producer waits."""


@dataclass(frozen=True)
class QueueStreams:
    """Key names of the queue under one key prefix.

    NOTE: the finishing script touches `requests`, `results`, `dead` and `last_errors` in
    one call, so on Redis Cluster they need one hash slot (e.g. the prefix `{switchyard}:`).
    """

    requests: str
    results: str
    dead: str
    last_errors: str
    group: str = GROUP

    @classmethod
    def from_prefix(cls, prefix: str) -> QueueStreams:
        return cls(
            requests=f"{prefix}requests",
            results=f"{prefix}results",
            dead=f"{prefix}dead",
            last_errors=f"{prefix}queue:last_error",
        )


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


async def ensure_group(client, streams: QueueStreams) -> bool:
    """Create the consumer group and the stream unless the group exists. Returns True when created.

    The group starts at id 0, so entries added before any worker started are delivered too.
    That never repeats work because finished entries are deleted from the stream.
    """
    from redis.exceptions import ResponseError

    try:
        await client.xgroup_create(streams.requests, streams.group, id="0", mkstream=True)
    except ResponseError as error:
        if "BUSYGROUP" in str(error):
            return False
        raise
    return True


async def stream_end_id(client, stream: str) -> str:
    """Id of the last entry of `stream`, or "0-0" when it is empty or missing."""
    last = await client.xrevrange(stream, "+", "-", count=1)
    return _text(last[0][0]) if last else "0-0"


# --- producer --------------------------------------------------------------------------


async def submit_requests(
    client,
    streams: QueueStreams,
    documents: Sequence[dict[str, Any]],
    max_length: int,
    full_timeout_s: float = 30.0,
    chunk_size: int = 256,
    on_sent: Callable[[int], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Add each document (a `/v1/predict` body with `request_id`) to the requests stream.

    While the stream contains `max_length` entries, the producer backs off (50 ms doubling to
    1 s) and retries the entries that did not fit. Returns the entry ids in document order.

    Raises:
        ValueError: a document has no string `request_id`.
        QueueFullError: the stream stayed full for `full_timeout_s` seconds; the entries
            added before that stay in the stream and will be answered.
    """
    script = client.register_script(_ADD_BOUNDED)
    encoded: list[tuple[str, bytes]] = []
    for index, document in enumerate(documents):
        request_id = document.get("request_id")
        if not isinstance(request_id, str):
            raise ValueError(f"documents[{index}] has no string request_id; the results stream is keyed by it")
        encoded.append((request_id, msgpack.packb(document, default=_pack_numpy, use_bin_type=True)))

    entry_ids: list[str | None] = [None] * len(encoded)
    waiting = list(range(len(encoded)))
    backoff_s = 0.05
    full_since: float | None = None
    while waiting:
        not_added: list[int] = []
        for start in range(0, len(waiting), chunk_size):
            chunk = waiting[start : start + chunk_size]
            async with client.pipeline(transaction=False) as pipe:
                for index in chunk:
                    request_id, payload = encoded[index]
                    await script(keys=[streams.requests],
                                 args=[max_length, "payload", payload, "request_id", request_id], client=pipe)
                replies = await pipe.execute()
            for index, reply in zip(chunk, replies):
                if reply is None:
                    not_added.append(index)
                else:
                    entry_ids[index] = _text(reply)
            added = len(chunk) - sum(1 for reply in replies if reply is None)
            if on_sent is not None and added:
                on_sent(added)
        if not not_added:
            break
        if len(not_added) < len(waiting):
            full_since, backoff_s = None, 0.05  # progress was made; restart the wait
        full_since = clock() if full_since is None else full_since
        if clock() - full_since >= full_timeout_s:
            raise QueueFullError(
                f"stream {streams.requests} stayed at its max length of {max_length} entries for "
                f"{full_timeout_s:.0f} s, and {len(not_added)} of {len(encoded)} requests were not added; "
                "start more queue workers, retry later or raise queue.max_length"
            )
        await sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 1.0)
        waiting = not_added
    return [entry_id for entry_id in entry_ids if entry_id is not None]


def _pack_numpy(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return encode_tensor(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} as msgpack")


# --- result reader ---------------------------------------------------------------------


@dataclass
class QueueResults:
    """Responses and dead letters of one submission, keyed by request_id."""

    answered: dict[str, dict[str, Any]] = field(default_factory=dict)
    dead: dict[str, dict[str, Any]] = field(default_factory=dict)


async def wait_for_results(
    client,
    streams: QueueStreams,
    request_ids: set[str],
    start_ids: dict[str, str],
    timeout_s: float,
    block_ms: int = 1000,
    on_done: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> QueueResults:
    """Read `results` and `dead` after `start_ids` until every request id appears or time runs out.

    `start_ids` maps both stream names to the last id before submission (`stream_end_id`).
    Entries of other request ids are skipped. A response's `outputs` is decoded into a
    numpy array; a dead letter's `error` into SPEC's error object.
    """
    results = QueueResults()
    cursors = {streams.results: start_ids[streams.results], streams.dead: start_ids[streams.dead]}
    deadline = clock() + timeout_s
    while len(results.answered) + len(results.dead) < len(request_ids):
        remaining_ms = int((deadline - clock()) * 1000)
        if remaining_ms <= 0:
            break
        replies = await client.xread(cursors, count=512, block=max(1, min(block_ms, remaining_ms)))
        for stream_name, entries in replies or []:
            stream = _text(stream_name)
            for entry_id, fields in entries:
                cursors[stream] = _text(entry_id)
                request_id = _text(fields.get(b"request_id"))
                if request_id not in request_ids or request_id in results.answered or request_id in results.dead:
                    continue
                if stream == streams.results:
                    results.answered[request_id] = _decode_response(fields[b"payload"])
                else:
                    results.dead[request_id] = _decode_dead_letter(fields)
                if on_done is not None:
                    on_done(1)
    return results


def _decode_response(payload: bytes) -> dict[str, Any]:
    response = msgpack.unpackb(payload, raw=False)
    response["outputs"] = decode_tensor(response["outputs"], "outputs")
    return response


def _decode_dead_letter(fields: dict[bytes, bytes]) -> dict[str, Any]:
    return {
        "reason": _text(fields.get(b"reason")),
        "error": msgpack.unpackb(fields[b"error"], raw=False) if b"error" in fields else None,
        "deliveries": int(fields.get(b"deliveries", b"0")),
        "stream_id": _text(fields.get(b"stream_id")),
    }


# --- submission with report ------------------------------------------------------------


@dataclass
class SubmitReport:
    """Outcome of `submit_and_wait`, where `lost` = sent - answered - dead_lettered."""

    sent: int
    answered: int
    dead_lettered: int
    accuracy: float | None
    results: QueueResults

    @property
    def lost(self) -> int:
        return self.sent - self.answered - self.dead_lettered

    def to_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "answered": self.answered, "dead_lettered": self.dead_lettered,
                "lost": self.lost, "accuracy": self.accuracy}


async def submit_and_wait(
    client,
    streams: QueueStreams,
    rows: np.ndarray,
    labels: np.ndarray | None = None,
    max_length: int = 10_000,
    timeout_s: float = 120.0,
    full_timeout_s: float = 30.0,
    block_ms: int = 1000,
    on_sent: Callable[[int], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> SubmitReport:
    """Send each row of `rows` [N, D] as one request and wait up to `timeout_s` for every result.

    Accuracy is the share of sent rows whose prediction equals the label (unanswered rows
    count as wrong), or None without labels or when no row was answered.

    Raises:
        QueueFullError: as `submit_requests`.
    """
    run_id = uuid.uuid4().hex[:12]
    documents = [{"inputs": encode_tensor(rows[index : index + 1]), "request_id": f"submit-{run_id}-{index}"}
                 for index in range(len(rows))]
    start_ids = {streams.results: await stream_end_id(client, streams.results),
                 streams.dead: await stream_end_id(client, streams.dead)}
    await submit_requests(client, streams, documents, max_length, full_timeout_s=full_timeout_s, on_sent=on_sent)
    request_ids = {document["request_id"] for document in documents}
    results = await wait_for_results(client, streams, request_ids, start_ids, timeout_s, block_ms=block_ms,
                                     on_done=on_done)

    accuracy = None
    if labels is not None and len(rows) and results.answered:
        correct = sum(
            int(results.answered[document["request_id"]]["predictions"][0] == int(label))
            for document, label in zip(documents, labels)
            if document["request_id"] in results.answered
        )
        accuracy = round(correct / len(rows), 4)
    return SubmitReport(sent=len(documents), answered=len(results.answered), dead_lettered=len(results.dead),
                        accuracy=accuracy, results=results)


# --- worker side helpers ---------------------------------------------------------------


def decode_payload(payload: bytes | None, max_body_bytes: int) -> Any:
    """Unpack a request entry's msgpack payload with the same limits as an HTTP body.

    Raises:
        RequestError: 400 when the field is missing or not msgpack, 413 when over the limit.
    """
    if payload is None:
        raise RequestError(400, "missing_field", "the stream entry has no 'payload' field; "
                           "add the msgpack request body as 'payload'", field="payload")
    if len(payload) > max_body_bytes:
        raise RequestError(413, "body_too_large", f"payload has {len(payload)} bytes, the limit is "
                           f"{max_body_bytes}; send fewer rows per request", field="payload")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=max_body_bytes,
                               max_str_len=64 * 1024, max_array_len=max_body_bytes, max_map_len=64, max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as error:
        detail = str(error) or type(error).__name__
        raise RequestError(400, "malformed_body", f"payload is not valid msgpack ({detail}); "
                           "send the /v1/predict body packed with msgpack", field="payload") from None


async def finish_entry(
    client,
    streams: QueueStreams,
    entry_id: str,
    output_stream: str,
    fields: dict[str, Any],
    max_length: int,
    require_pending: bool = True,
) -> str | None:
    """Write one output entry, then acknowledge and delete the request entry, atomically.

    Returns the output entry's id, or None when the request entry was no longer pending
    (another consumer already finished it) and nothing was written.
    """
    arguments: list[Any] = [streams.group, entry_id, "1" if require_pending else "0", max_length]
    for name, value in fields.items():
        arguments.extend((name, value))
    reply = await client.eval(_FINISH, 3, streams.requests, output_stream, streams.last_errors, *arguments)
    return _text(reply)


def response_fields(request_id: str, response: dict[str, Any]) -> dict[str, Any]:
    """Fields of a results entry: the request id and the msgpack HTTP response body."""
    return {"request_id": request_id, "payload": encode_body(response, MSGPACK)}


def dead_letter_fields(entry_id: str, reason: str, error: RequestError, deliveries: int,
                       request_id: str | None, payload: bytes | None) -> dict[str, Any]:
    """Fields of a dead entry. `request_id` and `payload` are included only when known."""
    fields: dict[str, Any] = {
        "reason": reason,
        "error": msgpack.packb(error_payload(error), use_bin_type=True),
        "deliveries": deliveries,
        "stream_id": entry_id,
    }
    if request_id is not None:
        fields["request_id"] = request_id
    if payload is not None:
        fields["payload"] = payload
    return fields


@dataclass(frozen=True)
class AutoclaimPage:
    """One XAUTOCLAIM reply: the next cursor, live entries, and what Redis reports as deleted.

    Redis 6.2 returns a deleted entry as nil among the entries (its id is not given), so
    only their number is known (`nil_entries`). Redis 7 removes deleted entries from the
    pending list itself and returns their ids as a third element (`deleted_ids`).
    """

    next_cursor: str
    entries: list[tuple[str, dict[bytes, bytes]]]
    nil_entries: int
    deleted_ids: list[str]


def parse_autoclaim_reply(reply: Sequence[Any]) -> AutoclaimPage:
    """Parse an XAUTOCLAIM reply of two (Redis 6.2) or three (Redis 7+) elements, raw or from redis-py."""
    if len(reply) not in (2, 3):
        raise ValueError(f"XAUTOCLAIM reply has {len(reply)} elements, expected 2 or 3")
    entries: list[tuple[str, dict[bytes, bytes]]] = []
    nil_entries = 0
    for item in reply[1] or []:
        if item is None or item[1] is None:
            nil_entries += 1
            continue
        # A raw reply contains a flat field list, and redis-py's parsed reply a dict.
        entry_id, values = item[0], item[1]
        fields = values if isinstance(values, dict) else dict(zip(values[::2], values[1::2]))
        entries.append((_text(entry_id), fields))
    deleted = [_text(entry_id) for entry_id in (reply[2] or [])] if len(reply) == 3 else []
    return AutoclaimPage(next_cursor=_text(reply[0]), entries=entries, nil_entries=nil_entries, deleted_ids=deleted)
