"""The router deployment: HTTP ingress and mixture router in one replica (one hop fewer).

Request path: HTTP body → `services.codec` (decode, validate) → `route` (request
batching sized by the load, `services.batcher`) → `services.dispatch.MixtureDispatcher`
(gate, policy, capacity, expert calls, dense fallback, combine) → `services.codec` (encode).

Failure modes: client errors get a 4xx with SPEC's error object; when the dense model
fails for rows that need it the request gets 503 with `Retry-After`; any other
exception is logged with the request id and returned as 500 `internal_error`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from services.codec import (
    JSON,
    PredictRequest,
    RequestError,
    decode_predict_request,
    encode_body,
    error_payload,
    media_type_for,
    negotiate_response_media,
    validate_predict_document,
)
from services.batcher import AdaptiveBatcher
from services.dispatch import DenseUnavailable, DispatchItem, RouteOutcome
from services.loopback import bind_replica_grpc_to_loopback
from services.openapi import DOCS_HTML, openapi_document

__all__ = ["RouterIngress"]

RETRY_AFTER_S = "1"


class RouterIngress:
    """Serves `/v1/predict`, `/v1/feedback`, `/healthz`, `/readyz`, `/docs` and routes every row."""

    def __init__(self, bundle_path: str, settings: dict[str, Any], experts: list, dense,
                 queue_worker=None) -> None:
        bind_replica_grpc_to_loopback()
        import torch

        from experts.bundle import load_bundle
        from monitoring.logging import get_logger
        from monitoring.metrics import router_metrics
        from router.gate import Gate, GateSpec
        from router.policy import RoutingConfig
        from services.dispatch import MixtureDispatcher
        from services.redis_setup import create_async_client
        from services.router_telemetry import RouterTelemetry
        from services.settings import Settings

        torch.set_num_threads(1)
        full_settings = Settings.model_validate(settings)
        self.settings = full_settings.router
        # The supervisor runs as its own Serve application named after this one.
        self.supervisor_app = f"{full_settings.app_name}-supervisor"
        self.redis = create_async_client(full_settings.redis) if full_settings.redis.url else None
        self.log = get_logger("router")
        self.telemetry = RouterTelemetry(router_metrics(), self.log)
        self._redis_state: str | None = None
        bundle = load_bundle(bundle_path)
        manifest = bundle.manifest
        self.model_version = bundle.version
        self.input_shape = tuple(manifest["dataset"]["input_shape"])
        self.class_names = manifest["dataset"]["class_names"]

        gate = Gate(GateSpec.from_dict(manifest["gate"]))
        gate.load_state_dict(bundle.load_state_dict("gate"))
        overrides = {name: getattr(self.settings, name)
                     for name in ("top_p", "min_k", "max_k", "confidence_floor", "escalate_below")
                     if getattr(self.settings, name) is not None}
        routing = RoutingConfig(**{**manifest["routing"], **overrides})

        self.experts = experts
        self.dense = dense
        # Bound here so that the worker deploys with the application and /readyz covers it.
        self.queue_worker = queue_worker
        self.dispatcher = MixtureDispatcher(
            gate=gate,
            routing=routing,
            num_classes=len(self.class_names),
            expert_flops=[manifest["flops"][f"expert-{i}"] for i in range(len(experts))],
            dense_flops=manifest["flops"]["dense"],
            call_expert=lambda expert, rows, request_ids: self.experts[expert].remote(rows, request_ids),
            call_dense=lambda rows, request_ids: self.dense.remote(rows, request_ids),
            expert_capacity=self.settings.expert_capacity,
            expert_timeout_s=self.settings.expert_timeout_s,
            dense_timeout_s=self.settings.dense_timeout_s,
            observer=self.telemetry.observe_expert_call,
            forward_request_ids=True,
        )
        self.supervision = None
        if self.redis is not None:
            from services.router_supervision import RouterSupervision

            self.supervision = RouterSupervision(
                self.redis, full_settings, call_dense=self._call_dense, num_classes=len(self.class_names),
                agreement_gauge=self.telemetry.metrics.shadow_agreement,
                comparisons_counter=self.telemetry.metrics.shadow_comparisons,
            )
            self.supervision.start()  # Serve runs the constructor on the replica's event loop.
            # Pending shadow comparisons ride along with the dense calls that batches make anyway.
            self.dispatcher.ride_along = self.supervision.shadow.take_pending
        self.batcher = AdaptiveBatcher(self.dispatcher.dispatch, max_batch_size=self.settings.replica.max_batch_size,
                                       max_concurrent_batches=self.settings.max_concurrent_batches,
                                       fill_wait_s=self.settings.replica.batch_wait_timeout_s)
        self._openapi = openapi_document(self.input_shape, self.settings.max_rows_per_request)
        self.log.info("router_started", experts=len(experts), model_version=self.model_version,
                      routing=routing.__dict__)

    # --- routing -----------------------------------------------------------------------

    async def route(self, item: DispatchItem) -> RouteOutcome:
        """Dispatch one request's rows together with the requests that arrive alongside it."""
        return await self.batcher.submit(item)

    async def predict(self, request: PredictRequest) -> dict[str, Any]:
        """Route one validated request; returns the response payload (SPEC's response body).

        Raises:
            DenseUnavailable: the dense model failed for rows that needed it.
        """
        started = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        supervisor_dense, policy_version = False, 0
        if self.supervision is not None:
            supervisor_dense, policy_version = self.supervision.route_policy(request_id)
        item = DispatchItem(inputs=request.inputs, request_id=request_id, force_dense=request.path == "dense",
                            supervisor_dense=supervisor_dense)
        outcome = await self.route(item)
        latency_s = time.perf_counter() - started
        latency_ms = latency_s * 1000.0
        self.telemetry.observe_request(outcome, latency_s)
        if outcome.error is not None:
            self.log.error("request_failed", request_id=request_id, error=str(outcome.error),
                           latency_ms=round(latency_ms, 3))
            raise outcome.error
        route = {
            "path": outcome.path,
            "reason": outcome.reason,
            "experts": outcome.experts,
            "weights": outcome.weights,
            "policy_version": policy_version,
            "k": outcome.k,
            "row_reasons": outcome.row_reasons,
            "gate_scores": outcome.gate_scores,
            "confidence": outcome.confidence,
        }
        # The canonical request line: the response's route record plus size, latency and cost.
        self.log.info("request", request_id=request_id, **route, rows=len(request.inputs),
                      latency_ms=round(latency_ms, 3), flops=outcome.flops)
        predictions = np.argmax(outcome.outputs, axis=1).tolist()
        if self.supervision is not None:
            self.supervision.observe(request_id, request.inputs, predictions, outcome.row_reasons,
                                     outcome.confidence, latency_s, policy_version)
        return {
            "request_id": request_id,
            "outputs": outcome.outputs,
            "predictions": predictions,
            "route": route,
            "flops": outcome.flops,
            "model_version": self.model_version,
        }

    async def predict_document(self, document: Any) -> dict[str, Any]:
        """Handle-call entry for already-decoded request objects (the queue workers).

        Raises:
            RequestError: the document fails validation.
            DenseUnavailable: as `predict`.
        """
        request = validate_predict_document(document, self.input_shape, self.settings.max_rows_per_request)
        return await self.predict(request)

    # --- HTTP ----------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        if path == "/v1/predict":
            if request.method != "POST":
                return _error_response(RequestError(405, "method_not_allowed", "use POST for /v1/predict"), JSON)
            return await self._handle_predict(request)
        if path == "/v1/feedback":
            if request.method != "POST":
                return _error_response(RequestError(405, "method_not_allowed", "use POST for /v1/feedback"), JSON)
            return await self._handle_feedback(request)
        if path == "/healthz":
            return JSONResponse({"status": "ok"})
        if path == "/readyz":
            return await self._handle_readyz()
        if path == "/docs":
            return HTMLResponse(DOCS_HTML)
        if path == "/openapi.json":
            return JSONResponse(self._openapi)
        return _error_response(RequestError(404, "not_found", f"no route for {request.url.path}; see /docs"), JSON)

    async def _handle_predict(self, request: Request) -> Response:
        response_media = JSON
        try:
            media = media_type_for(request.headers.get("content-type"))
            response_media = negotiate_response_media(media, request.headers.get("accept"))
            body = await _read_body(request, self.settings.max_body_bytes)
            decoded = decode_predict_request(body, media, self.input_shape, self.settings.max_rows_per_request,
                                             self.settings.max_body_bytes)
            payload = await self.predict(decoded)
        except RequestError as error:
            return _error_response(error, response_media)
        except DenseUnavailable as error:
            return _error_response(RequestError(503, "unavailable", f"no model could answer: {error}"),
                                   response_media, headers={"Retry-After": RETRY_AFTER_S})
        except Exception as error:  # noqa: BLE001 - never let a bug drop the connection
            self.log.exception("internal_error", error=repr(error))
            return _error_response(RequestError(500, "internal_error", "internal error; see the router log"),
                                   response_media)
        # Serve's proxy sets its own X-Request-Id header, so the id travels in the body only.
        return Response(encode_body(payload, response_media), media_type=response_media)

    def _call_dense(self, rows: np.ndarray, request_id: str):
        """Call dense outside the dispatcher (shadow evaluation), in the dispatcher's call convention."""
        if self.dispatcher.forward_request_ids:
            return self.dispatcher.call_dense(rows, [request_id])
        return self.dispatcher.call_dense(rows)

    async def _handle_feedback(self, request: Request) -> Response:
        try:
            if self.supervision is None:
                raise RequestError(503, "unavailable", "feedback needs Redis, and this router has no redis.url")
            body = await _read_body(request, self.settings.max_body_bytes)
            result = await self.supervision.feedback(body, request.headers.get("content-type"))
        except RequestError as error:
            return _error_response(error, JSON)
        except Exception as error:  # noqa: BLE001 - a Redis outage must not drop the connection
            self.log.warning("feedback_failed", error=repr(error))
            return _error_response(RequestError(503, "unavailable", f"feedback could not be stored: "
                                                                    f"{type(error).__name__}; retry shortly"),
                                   JSON, headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse(result)

    async def readiness(self) -> dict[str, Any]:
        """Ping every model deployment and Redis; ready when all answer within 2 seconds."""
        names = [f"expert-{i}" for i in range(len(self.experts))] + ["dense"]
        handles = [*self.experts, self.dense]
        if self.queue_worker is not None:
            names.append("queue-worker")
            handles.append(self.queue_worker)

        async def ping(handle) -> str:
            try:
                await asyncio.wait_for(_await(handle.ping.remote()), 2.0)
                return "ok"
            except asyncio.TimeoutError:
                return "timeout"
            except Exception as error:  # noqa: BLE001 - readiness reports, never raises
                return f"error: {type(error).__name__}"

        results = await asyncio.gather(*(ping(handle) for handle in handles), self._ping_supervisor(),
                                       self._ping_redis())
        deployments = dict(zip([*names, "supervisor"], results[:-1]))
        redis_state = results[-1]
        return {"ready": all(state == "ok" for state in results), "deployments": deployments, "redis": redis_state}

    async def _ping_supervisor(self) -> str:
        from ray import serve

        try:
            handle = serve.get_deployment_handle("supervisor", app_name=self.supervisor_app)
            await asyncio.wait_for(_await(handle.check_health.remote()), 2.0)
            return "ok"
        except asyncio.TimeoutError:
            return "timeout"
        except Exception as error:  # noqa: BLE001 - readiness reports, never raises
            return f"error: {type(error).__name__}"

    async def _ping_redis(self) -> str:
        if self.redis is None:
            return "not configured"
        try:
            await asyncio.wait_for(self.redis.ping(), 2.0)
            state = "ok"
        except asyncio.TimeoutError:
            state = "timeout"
        except Exception as error:  # noqa: BLE001 - readiness reports, never raises
            state = f"error: {type(error).__name__}"
        if state != self._redis_state:
            # Logged on change only: /readyz is polled every few seconds.
            log = self.log.info if state == "ok" else self.log.warning
            log("redis_state_changed", previous=self._redis_state, state=state)
            self._redis_state = state
        return state

    async def _handle_readyz(self) -> Response:
        report = await self.readiness()
        status = 200 if report["ready"] else 503
        headers = {} if report["ready"] else {"Retry-After": RETRY_AFTER_S}
        return JSONResponse({"status": "ready" if report["ready"] else "not_ready", **report},
                            status_code=status, headers=headers)


async def _await(value):
    return await value


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise RequestError(400, "malformed_body", f"Content-Length {declared!r} is not a number",
                               field="Content-Length") from None
        if declared_bytes > limit:
            raise RequestError(413, "body_too_large",
                               f"body has {declared_bytes} bytes, the limit is {limit}; send fewer rows per request")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise RequestError(413, "body_too_large",
                               f"body exceeds the limit of {limit} bytes; send fewer rows per request")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_response(error: RequestError, media: str, headers: dict[str, str] | None = None) -> Response:
    return Response(encode_body(error_payload(error), media), status_code=error.status, media_type=media,
                    headers=headers)
