"""Wire format of `/v1/predict` and of queue messages: JSON and msgpack, strictly decoded.

A request body is `{"inputs": <tensor>, "request_id": <str, optional>, "path": "auto"|"dense"}`.
In JSON a tensor is nested lists of numbers; in msgpack it is
`{"dtype": "float32", "shape": [...], "data": <bin, little-endian, C order>}` (nested
lists are accepted too). Every problem becomes a `RequestError` carrying the HTTP
status, a stable error code, the offending field and how to fix it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "JSON",
    "MSGPACK",
    "PredictRequest",
    "RequestError",
    "decode_predict_request",
    "decode_tensor",
    "encode_body",
    "encode_tensor",
    "error_payload",
    "media_type_for",
    "negotiate_response_media",
]

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_ALIASES = {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
_REQUEST_FIELDS = {"inputs", "request_id", "path"}
_PATHS = ("auto", "dense")
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Only float32 is accepted: the models take float32, and a silent cast from float64
# would hide a client that sends the wrong precision.
_ACCEPTED_DTYPES = {"float32": np.dtype("<f4")}


class RequestError(Exception):
    """A client error: HTTP status, stable code, message and the field to fix."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def __reduce__(self):
        # Exceptions pickle as `cls(*args)` by default, and args holds only the message;
        # Ray pickles an error raised in a replica to re-raise it in the caller.
        return (type(self), (self.status, self.code, self.message, self.field))


@dataclass(frozen=True)
class PredictRequest:
    """A decoded, validated prediction request."""

    inputs: np.ndarray  # [N, *input_shape] float32, writable, owned
    request_id: str | None
    path: str  # "auto" or "dense"


def error_payload(error: RequestError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.field is not None:
        body["field"] = error.field
    return {"error": body}


def _base_media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def media_type_for(content_type: str | None) -> str:
    """Map a Content-Type header to JSON or MSGPACK; raises 415 for anything else."""
    base = _base_media(content_type)
    if base in ("", JSON) or base.endswith("+json"):
        return JSON
    if base in _MSGPACK_ALIASES:
        return MSGPACK
    raise RequestError(
        415, "unsupported_media_type",
        f"Content-Type {base!r} is not supported; send application/json or application/msgpack",
        field="Content-Type",
    )


def negotiate_response_media(request_media: str, accept: str | None) -> str:
    """Choose the response encoding: the request's own, unless Accept names only the other one."""
    if not accept:
        return request_media
    offered = {_base_media(part) for part in accept.split(",")}
    if request_media in offered or "*/*" in offered:
        return request_media
    if offered & _MSGPACK_ALIASES:
        return MSGPACK
    if JSON in offered:
        return JSON
    return request_media


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """msgpack tensor map of a float32 array (little-endian, C order)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": list(array.shape), "data": array.tobytes()}


def encode_body(payload: dict[str, Any], media: str) -> bytes:
    """Serialise a response payload; numpy arrays become tensors of the chosen encoding."""
    if media == MSGPACK:
        return msgpack.packb(payload, default=_msgpack_default, use_bin_type=True)
    return json.dumps(payload, default=_json_default, separators=(",", ":"), allow_nan=False).encode()


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return encode_tensor(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} as msgpack")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _unpack_msgpack(body: bytes, max_body_bytes: int) -> Any:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_body_bytes,
            max_str_len=64 * 1024,
            max_array_len=max_body_bytes,
            max_map_len=64,
            max_ext_len=0,
        )
    except msgpack.StackError:
        raise RequestError(400, "malformed_body", "body is not valid msgpack: nesting is too deep") from None
    except msgpack.ExtraData:
        raise RequestError(400, "malformed_body", "body is not valid msgpack: extra bytes after the message") from None
    except (msgpack.FormatError, ValueError, TypeError) as error:
        reason = str(error) or type(error).__name__
        if "max_ext_len" in reason:
            reason = "msgpack extension types are not accepted"
        raise RequestError(400, "malformed_body", f"body is not valid msgpack: {reason}") from None


def _parse_json(body: bytes) -> Any:
    def reject_constant(name: str) -> float:
        raise ValueError(f"{name} is not valid JSON; send finite numbers")

    try:
        return json.loads(body, parse_constant=reject_constant)
    except RecursionError:
        raise RequestError(400, "malformed_body", "body is not valid JSON: nesting is too deep") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise RequestError(400, "malformed_body", f"body is not valid JSON: {error}") from None


def decode_predict_request(
    body: bytes,
    media: str,
    input_shape: tuple[int, ...],
    max_rows: int,
    max_body_bytes: int,
) -> PredictRequest:
    """Decode and validate a prediction request body.

    Raises:
        RequestError: 413 when over `max_body_bytes`, 400 when not decodable or not an
            object, 422 when a field is missing, unknown or of the wrong type, or the
            tensor has the wrong dtype, shape or non-finite values (naming the first
            bad row).
    """
    if len(body) > max_body_bytes:
        raise RequestError(413, "body_too_large",
                           f"body has {len(body)} bytes, the limit is {max_body_bytes}; send fewer rows per request")
    if not body:
        raise RequestError(400, "malformed_body", "body is empty; send {\"inputs\": [[...], ...]}")
    document = _unpack_msgpack(body, max_body_bytes) if media == MSGPACK else _parse_json(body)
    return validate_predict_document(document, input_shape, max_rows)


def validate_predict_document(document: Any, input_shape: tuple[int, ...], max_rows: int) -> PredictRequest:
    """Validate a decoded request object (shared by HTTP and the queue)."""
    if not isinstance(document, dict):
        raise RequestError(400, "malformed_body",
                           f"body must be an object with 'inputs', got {type(document).__name__}")
    unknown = sorted(str(key) for key in set(document) - _REQUEST_FIELDS)
    if unknown:
        raise RequestError(422, "unknown_field",
                           f"unknown field {unknown[0]!r}; allowed fields are {sorted(_REQUEST_FIELDS)}",
                           field=unknown[0])
    if "inputs" not in document:
        raise RequestError(422, "missing_field", "field 'inputs' is missing; send the batch as 'inputs'",
                           field="inputs")

    request_id = document.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not _REQUEST_ID_PATTERN.match(request_id)):
        raise RequestError(422, "invalid_field",
                           "request_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                           field="request_id")
    path = document.get("path", "auto")
    if path not in _PATHS:
        raise RequestError(422, "invalid_field", f"path must be one of {list(_PATHS)}, got {path!r}", field="path")

    inputs = decode_tensor(document["inputs"], "inputs")
    _check_inputs(inputs, input_shape, max_rows)
    return PredictRequest(inputs=inputs, request_id=request_id, path=path)


def decode_tensor(value: Any, field: str) -> np.ndarray:
    """Decode a tensor from a msgpack map or nested lists into an owned, writable float32 array."""
    if isinstance(value, dict):
        return _decode_tensor_map(value, field)
    if isinstance(value, list):
        return _decode_nested_lists(value, field)
    raise RequestError(422, "invalid_field",
                       f"{field} must be nested lists of numbers, or in msgpack a tensor map "
                       f"{{dtype, shape, data}}, got {type(value).__name__}", field=field)


def _decode_tensor_map(value: dict, field: str) -> np.ndarray:
    expected_keys = {"dtype", "shape", "data"}
    if set(value) != expected_keys:
        raise RequestError(422, "invalid_field",
                           f"{field} tensor map must have exactly the keys {sorted(expected_keys)}, "
                           f"got {sorted(map(str, value))}", field=field)
    dtype_name = value["dtype"]
    if dtype_name not in _ACCEPTED_DTYPES:
        raise RequestError(422, "invalid_dtype",
                           f"{field}.dtype is {dtype_name!r}; this model takes 'float32' "
                           "(convert with numpy: x.astype('<f4'))", field=f"{field}.dtype")
    shape = value["shape"]
    if not isinstance(shape, list) or not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape
    ):
        raise RequestError(422, "invalid_shape",
                           f"{field}.shape must be a non-empty list of non-negative integers, got {shape!r}",
                           field=f"{field}.shape")
    data = value["data"]
    if not isinstance(data, bytes):
        raise RequestError(422, "invalid_field",
                           f"{field}.data must be msgpack bin, got {type(data).__name__}; tensor maps need a "
                           "msgpack body (JSON takes nested lists)", field=f"{field}.data")
    dtype = _ACCEPTED_DTYPES[dtype_name]
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(data) != expected_bytes:
        raise RequestError(422, "invalid_shape",
                           f"{field}.data has {len(data)} bytes, shape {shape} of {dtype_name} needs {expected_bytes}",
                           field=f"{field}.data")
    # frombuffer returns a read-only view into the message; copy so the array owns its memory.
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.float32, copy=True)


def _decode_nested_lists(value: list, field: str) -> np.ndarray:
    try:
        raw = np.asarray(value)
    except ValueError:
        raw = None
    if raw is not None and raw.dtype == object:
        # Integers beyond int64 and nulls land here. Floats parse big integers, but numpy
        # would turn null into NaN, so nulls are rejected first.
        if _contains_null(value):
            raise RequestError(422, "invalid_dtype", f"{field} contains null; send numbers only", field=field)
        try:
            raw = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raw = None
    if raw is None:
        raise RequestError(422, "invalid_shape", f"{field} is ragged or mixes types: {_describe_ragged(value, field)}",
                           field=_first_ragged_row(value, field))
    if raw.dtype.kind not in "iuf":
        kind = {"b": "booleans", "U": "strings", "S": "bytes"}.get(raw.dtype.kind, str(raw.dtype))
        raise RequestError(422, "invalid_dtype", f"{field} must contain numbers, got {kind}", field=field)
    with np.errstate(over="ignore"):
        return raw.astype(np.float32)


def _contains_null(value: list) -> bool:
    stack = [value]
    while stack:
        for element in stack.pop():
            if element is None:
                return True
            if isinstance(element, list):
                stack.append(element)
    return False


def _first_ragged_row(value: list, field: str) -> str:
    lengths = [len(row) if isinstance(row, list) else None for row in value]
    reference = lengths[0] if lengths else None
    for index, length in enumerate(lengths):
        if length != reference:
            return f"{field}[{index}]"
    return field


def _describe_ragged(value: list, field: str) -> str:
    location = _first_ragged_row(value, field)
    if location == field:
        return "every row must be a list of numbers of the same length"
    return f"{location} differs from row 0 in length or type"


def _check_inputs(inputs: np.ndarray, input_shape: tuple[int, ...], max_rows: int) -> None:
    expected = ["N", *input_shape]
    if inputs.ndim != len(input_shape) + 1 or tuple(inputs.shape[1:]) != tuple(input_shape):
        raise RequestError(422, "invalid_shape",
                           f"inputs has shape {list(inputs.shape)}, expected {expected} "
                           "(the first dimension is the batch; wrap a single example in a list)",
                           field="inputs")
    rows = inputs.shape[0]
    if rows == 0:
        raise RequestError(422, "invalid_shape", "inputs has no rows; send at least one example", field="inputs")
    if rows > max_rows:
        raise RequestError(422, "too_many_rows",
                           f"inputs has {rows} rows, the limit is {max_rows}; split the batch", field="inputs")
    finite = np.isfinite(inputs.reshape(rows, -1)).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise RequestError(422, "non_finite",
                           f"inputs[{row}] contains NaN or infinity (or a value beyond float32 range); "
                           "send finite numbers", field=f"inputs[{row}]")
