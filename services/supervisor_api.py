"""The supervisor deployment: the quality loop and `/v1/supervisor/...` over HTTP.

It runs as a Serve application of its own (route prefix `/v1/supervisor`, one
replica) on the same proxy port as the router, so that the on-call rollback path
works even while the router application is broken.

Routes: `GET status`, `GET events?limit=N`, `POST rollback|promote|pause|resume`
(optional JSON body `{"reason": str}`) and `PUT weight` (`{"moe_percent": 0..100}`).
Every POST and PUT needs `Authorization: Bearer <admin token>`: a missing token gets
401, a wrong one 403. The deployment receives only the token's sha256 and compares
digests in constant time; the token itself is never stored or logged here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.codec import RequestError, error_payload
from services.loopback import bind_replica_grpc_to_loopback
from services.supervisor import ActionRejected, hash_admin_token

__all__ = ["ROUTE_PREFIX", "SupervisorIngress"]

ROUTE_PREFIX = "/v1/supervisor"
MAX_BODY_BYTES = 16 * 1024
MAX_EVENTS_PER_PAGE = 1000
RETRY_AFTER_S = "1"


class SupervisorIngress:
    """Runs `SupervisorCore.run_forever` in the background and serves the supervisor API.

    Deploy exactly one replica: a second one would only be kept correct by the
    compare-and-set on the policy version, and would double the evaluation work.
    """

    def __init__(self, settings: dict[str, Any], admin_token_sha256: str) -> None:
        bind_replica_grpc_to_loopback()
        from monitoring.logging import get_logger
        from monitoring.metrics import supervisor_metrics
        from services.policy_state import SupervisorKeys
        from services.redis_setup import create_async_client
        from services.settings import Settings
        from services.supervisor import SupervisorCore

        full_settings = Settings.model_validate(settings)
        self.admin_token_sha256 = admin_token_sha256
        self.log = get_logger("supervisor_api")
        self.redis = create_async_client(full_settings.redis)
        self.core = SupervisorCore(self.redis, full_settings.supervisor, SupervisorKeys(full_settings.redis.key_prefix),
                                   metrics=supervisor_metrics())
        # Serve runs a class deployment's constructor on the replica's event loop thread.
        self._loop_task = asyncio.get_running_loop().create_task(self.core.run_forever())
        self.log.info("supervisor_started", interval_s=full_settings.supervisor.interval_s)

    def __del__(self) -> None:
        task = getattr(self, "_loop_task", None)
        if task is not None:
            task.cancel()

    async def check_health(self) -> None:
        """Serve's health check: restart the replica if the loop task died."""
        if self._loop_task.done():
            raise RuntimeError(f"supervisor loop stopped: {self._loop_task!r}")

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except RequestError as error:
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return JSONResponse(error_payload(error), status_code=error.status, headers=headers)
        except ActionRejected as error:
            return JSONResponse(error_payload(RequestError(409, "conflict", str(error))), status_code=409)
        except (ConnectionError, OSError, TimeoutError) as error:
            return _redis_unavailable(self.log, error)
        except Exception as error:  # noqa: BLE001 - redis-py errors and bugs must not drop the connection
            if type(error).__module__.startswith("redis"):
                return _redis_unavailable(self.log, error)
            self.log.exception("internal_error", error=repr(error))
            return JSONResponse(error_payload(RequestError(500, "internal_error", "internal error; see the log")),
                                status_code=500)

    async def _route(self, request: Request) -> Response:
        action = _action(request)
        if action == "status":
            _require_method(request, "GET")
            return JSONResponse(await self.core.status())
        if action == "events":
            _require_method(request, "GET")
            return JSONResponse({"events": await self.core.events(_limit(request))})
        if action in ("rollback", "promote", "pause", "resume"):
            _require_method(request, "POST")
            self._authorize(request)
            body = await _read_json(request, allowed={"reason"})
            result = await getattr(self.core, action)(_reason(body))
            return JSONResponse({**result, "status": await self.core.status()})
        if action == "weight":
            _require_method(request, "PUT")
            self._authorize(request)
            body = await _read_json(request, allowed={"moe_percent", "reason"})
            result = await self.core.set_weight(_moe_percent(body), _reason(body))
            return JSONResponse({**result, "status": await self.core.status()})
        raise RequestError(404, "not_found", f"no supervisor route {request.url.path!r}; routes are status, events, "
                                             "rollback, promote, pause, resume and weight under /v1/supervisor/")

    def _authorize(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(401, "unauthorized",
                               "missing admin token; send `Authorization: Bearer <token>` with the token from "
                               "SWITCHYARD_ADMIN_TOKEN or the admin-token file that `switchyard serve` printed",
                               field="Authorization")
        if not hmac.compare_digest(hash_admin_token(token.strip()), self.admin_token_sha256):
            self.log.warning("admin_token_rejected", path=request.url.path,
                             client=request.client.host if request.client else None)
            raise RequestError(403, "forbidden", "invalid admin token; use the token of the running server",
                               field="Authorization")


def _action(request: Request) -> str:
    path = request.url.path.rstrip("/")
    if path.startswith(ROUTE_PREFIX):
        path = path[len(ROUTE_PREFIX):]
    return path.strip("/")


def _require_method(request: Request, method: str) -> None:
    if request.method != method:
        raise RequestError(405, "method_not_allowed", f"use {method} for {request.url.path}")


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_EVENTS_PER_PAGE:
        raise RequestError(400, "invalid_parameter",
                           f"limit must be an integer from 1 to {MAX_EVENTS_PER_PAGE}, got {raw!r}", field="limit")
    return limit


async def _read_json(request: Request, allowed: set[str]) -> dict[str, Any]:
    """Read an optional JSON object body whose keys are all in `allowed`."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, "body_too_large", f"body has {len(body)} bytes, the limit is {MAX_BODY_BYTES}")
    if not body.strip():
        return {}
    media = (request.headers.get("content-type") or "application/json").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise RequestError(415, "unsupported_media_type",
                           f"Content-Type {media!r} is not supported; send application/json", field="Content-Type")
    try:
        document = json.loads(body)
    except ValueError as error:
        raise RequestError(400, "malformed_body", f"body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise RequestError(400, "malformed_body", f"body must be a JSON object, got {type(document).__name__}")
    unknown = sorted(str(key) for key in set(document) - allowed)
    if unknown:
        raise RequestError(422, "unknown_field", f"unknown field {unknown[0]!r}; allowed fields are {sorted(allowed)}",
                           field=unknown[0])
    return document


def _reason(body: dict[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > 500:
        raise RequestError(422, "invalid_field", "reason must be a string of at most 500 characters",
                           field="reason")
    return reason


def _moe_percent(body: dict[str, Any]) -> float:
    value = body.get("moe_percent")
    if value is None:
        raise RequestError(422, "missing_field", 'moe_percent is required, e.g. {"moe_percent": 25}',
                           field="moe_percent")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 100:
        raise RequestError(422, "invalid_field", f"moe_percent must be a number from 0 to 100, got {value!r}",
                           field="moe_percent")
    return float(value)


def _redis_unavailable(log, error: Exception) -> Response:
    log.warning("redis_unavailable", error=repr(error))
    return JSONResponse(error_payload(RequestError(503, "unavailable", f"Redis is unreachable: {type(error).__name__}; "
                                                                       "retry shortly")),
                        status_code=503, headers={"Retry-After": RETRY_AFTER_S})
