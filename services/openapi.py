"""OpenAPI description of the HTTP API, served at `/openapi.json` and rendered at `/docs`."""

from __future__ import annotations

from typing import Any

__all__ = ["DOCS_HTML", "openapi_document"]

# Swagger UI loads from a CDN in the reader's browser; the server itself needs no network.
DOCS_HTML = """<!doctype html>
<html><head><title>Switchyard API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
<noscript>The machine-readable description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "examples": ["invalid_shape"]},
                "message": {"type": "string"},
                "field": {"type": "string", "examples": ["inputs[3]"]},
            },
        }
    },
}


def _error_responses(*statuses: int) -> dict[str, Any]:
    descriptions = {
        400: "Malformed body (not JSON or msgpack, or not an object).",
        401: "Missing bearer token.",
        403: "Wrong bearer token.",
        404: "Unknown path.",
        413: "Body over the configured limit.",
        415: "Unsupported Content-Type.",
        422: "Valid body with a missing or unknown field, wrong shape or dtype, or non-finite values.",
        503: "No model could answer; retry after the Retry-After header.",
    }
    return {
        str(status): {"description": descriptions[status],
                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for status in statuses
    }


def _supervisor_paths() -> dict[str, Any]:
    """The supervisor application's API, served under /v1/supervisor on the same port."""
    admin = [{"adminToken": []}]
    paths: dict[str, Any] = {
        "/v1/supervisor/status": {"get": {"summary": "State, traffic split and the last quality window",
                                          "responses": {"200": {"description": "Status."}}}},
        "/v1/supervisor/events": {"get": {"summary": "Policy changes, oldest first",
                                          "responses": {"200": {"description": "Events."}}}},
        "/v1/supervisor/weight": {"put": {
            "summary": "Set the share of traffic sent to the mixture",
            "security": admin,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["moe_percent"],
                "properties": {"moe_percent": {"type": "number", "minimum": 0, "maximum": 100}}}}}},
            "responses": {"200": {"description": "Changed."}, **_error_responses(400, 401, 403, 422)},
        }},
    }
    summaries = {"rollback": "Send all traffic to dense now", "promote": "Send all traffic to the mixture now",
                 "pause": "Hold automatic changes", "resume": "Let the supervisor change the policy again"}
    for action, summary in summaries.items():
        paths[f"/v1/supervisor/{action}"] = {"post": {
            "summary": summary, "security": admin,
            "responses": {"200": {"description": "Changed."}, **_error_responses(401, 403)},
        }}
    return paths


def openapi_document(input_shape: tuple[int, ...], max_rows: int) -> dict[str, Any]:
    """OpenAPI 3.1 document for a bundle with the given input shape."""
    row_schema: dict[str, Any] = {"type": "number"}
    for size in reversed(input_shape):
        row_schema = {"type": "array", "items": row_schema, "minItems": size, "maxItems": size}
    tensor_map = {
        "type": "object",
        "description": "msgpack only: little-endian, C-order float32 data.",
        "required": ["dtype", "shape", "data"],
        "properties": {
            "dtype": {"const": "float32"},
            "shape": {"type": "array", "items": {"type": "integer"}, "examples": [[1, *input_shape]]},
            "data": {"type": "string", "format": "binary"},
        },
    }
    predict_request = {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "properties": {
            "inputs": {
                "oneOf": [
                    {"type": "array", "items": row_schema, "minItems": 1, "maxItems": max_rows},
                    tensor_map,
                ],
                "description": f"Batch of examples, shape [N, {', '.join(map(str, input_shape))}].",
            },
            "request_id": {"type": "string", "pattern": "^[A-Za-z0-9._:\\-]{1,128}$",
                           "description": "Client id; generated when missing. Also decides the traffic split."},
            "path": {"enum": ["auto", "dense"], "default": "auto",
                     "description": "`dense` skips the experts and asks the dense model."},
        },
    }
    predict_response = {
        "type": "object",
        "properties": {
            "request_id": {"type": "string"},
            "outputs": {"description": "Class probabilities [N, C] (a tensor map in msgpack)."},
            "predictions": {"type": "array", "items": {"type": "integer"}},
            "route": {
                "type": "object",
                "properties": {
                    "path": {"enum": ["moe", "dense"]},
                    "reason": {"type": "string", "examples": ["top_p", "low_confidence", "capacity",
                                                              "expert_error", "expert_timeout", "supervisor",
                                                              "escalated"]},
                    "experts": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                    "weights": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    "policy_version": {"type": "integer"},
                    "k": {"type": "array", "items": {"type": "integer"}},
                    "row_reasons": {"type": "array", "items": {"type": "string"}},
                    "gate_scores": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    "confidence": {"type": "array", "items": {"type": "number"}},
                },
            },
            "flops": {"type": "integer", "description": "Multiply-adds spent on this request."},
            "model_version": {"type": "string"},
        },
    }
    body_content = {
        "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
        "application/msgpack": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchyard", "version": "1",
                 "description": "Adaptive mixture-of-experts inference with a dense fallback."},
        "paths": {
            "/v1/predict": {
                "post": {
                    "summary": "Classify a batch of examples",
                    "requestBody": {"required": True, "content": body_content},
                    "responses": {
                        "200": {"description": "Predictions and the route taken.",
                                "content": {"application/json": {
                                    "schema": {"$ref": "#/components/schemas/PredictResponse"}},
                                    "application/msgpack": {}}},
                        **_error_responses(400, 413, 415, 422, 503),
                    },
                }
            },
            "/v1/feedback": {
                "post": {
                    "summary": "Record the true label of an answered request (online accuracy)",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["request_id", "label"],
                        "properties": {"request_id": {"type": "string"},
                                       "label": {"oneOf": [{"type": "integer"},
                                                           {"type": "array", "items": {"type": "integer"}}]}},
                    }}}},
                    "responses": {"200": {"description": "Recorded."}, **_error_responses(400, 404, 415, 422)},
                }
            },
            **_supervisor_paths(),
            "/healthz": {"get": {"summary": "Process is up", "responses": {"200": {"description": "OK"}}}},
            "/readyz": {"get": {"summary": "Every deployment answers and Redis is reachable",
                                "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}}}},
        },
        "components": {"schemas": {"PredictRequest": predict_request, "PredictResponse": predict_response,
                                   "Error": _ERROR},
                       "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}},
    }
