"""The running application over HTTP: predictions, fallbacks and a 4xx for bad input."""

import json
import time

import httpx
import msgpack
import numpy as np
import pytest

from services.codec import decode_tensor, encode_tensor

pytestmark = pytest.mark.slow

MSGPACK_HEADERS = {"Content-Type": "application/msgpack"}


@pytest.fixture(scope="module")
def client(served_app):
    with httpx.Client(base_url=served_app.http_url, timeout=30.0) as http:
        yield http


def post_json(client, document):
    return client.post("/v1/predict", json=document)


def error_of(response):
    """The error object of a JSON or msgpack error response."""
    if response.headers["content-type"].startswith("application/msgpack"):
        return msgpack.unpackb(response.content, raw=False)["error"]
    return response.json()["error"]


def assert_still_answers(client, digits):
    response = post_json(client, {"inputs": digits.test.x[:1].tolist()})
    assert response.status_code == 200


def test_predict_json(client, digits):
    rows = digits.test.x[:3]

    response = post_json(client, {"inputs": rows.tolist(), "request_id": "json-1"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "json-1"
    outputs = np.asarray(body["outputs"])
    assert outputs.shape == (3, 10)
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=1e-5)
    assert body["predictions"] == outputs.argmax(axis=1).tolist()
    route = body["route"]
    assert route["path"] in ("moe", "dense")
    assert len(route["experts"]) == len(route["weights"]) == 3
    assert isinstance(route["policy_version"], int)
    assert body["flops"] > 0
    assert len(body["model_version"]) == 12


def test_predict_msgpack(client, digits):
    rows = digits.test.x[:4]
    body = msgpack.packb({"inputs": encode_tensor(rows), "request_id": "mp-1"}, use_bin_type=True)

    response = client.post("/v1/predict", content=body, headers=MSGPACK_HEADERS)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/msgpack")
    decoded = msgpack.unpackb(response.content, raw=False)
    outputs = decode_tensor(decoded["outputs"], "outputs")
    assert outputs.shape == (4, 10)
    assert decoded["predictions"] == outputs.argmax(axis=1).tolist()


def test_msgpack_request_with_json_accept(client, digits):
    body = msgpack.packb({"inputs": encode_tensor(digits.test.x[:1])}, use_bin_type=True)

    response = client.post("/v1/predict", content=body, headers={**MSGPACK_HEADERS, "Accept": "application/json"})

    assert response.status_code == 200
    assert len(response.json()["outputs"]) == 1


def test_accuracy_on_test_examples(client, digits):
    response = post_json(client, {"inputs": digits.test.x[:100].tolist()})

    predictions = np.asarray(response.json()["predictions"])
    assert (predictions == digits.test.y[:100]).mean() >= 0.9


def test_dense_path_on_request(client, digits):
    response = post_json(client, {"inputs": digits.test.x[:2].tolist(), "path": "dense"})

    route = response.json()["route"]
    assert route["path"] == "dense"
    assert route["reason"] == "requested"
    assert route["experts"] == [[], []]


@pytest.mark.parametrize("content, headers, status, code", [
    (b"{not json", {"Content-Type": "application/json"}, 400, "malformed_body"),
    (b"\xc1\xc1", MSGPACK_HEADERS, 400, "malformed_body"),
    (b"inputs=1", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (json.dumps({"inputs": [[1.0] * 63]}).encode(), {"Content-Type": "application/json"}, 422, "invalid_shape"),
    (json.dumps({"inputs": [[1.0] * 64], "label": 3}).encode(), {"Content-Type": "application/json"}, 422,
     "unknown_field"),
    (msgpack.packb({"inputs": {"dtype": "int64", "shape": [1, 64], "data": b"\0" * 512}}), MSGPACK_HEADERS, 422,
     "invalid_dtype"),
    (msgpack.packb({"inputs": [[float("inf")] * 64]}), MSGPACK_HEADERS, 422, "non_finite"),
])
def test_bad_input_gets_4xx_and_server_keeps_answering(client, digits, content, headers, status, code):
    response = client.post("/v1/predict", content=content, headers=headers)

    assert response.status_code == status
    assert error_of(response)["code"] == code
    assert error_of(response)["message"]
    assert_still_answers(client, digits)


def test_bad_row_rejects_whole_batch_naming_it(client, digits):
    rows = digits.test.x[:5].tolist()
    rows[3] = rows[3][:10]

    response = post_json(client, {"inputs": rows})

    assert response.status_code == 422
    assert error_of(response)["field"] == "inputs[3]"


def test_oversized_body_is_413(client, digits, served_app):
    limit = served_app.settings.router.max_body_bytes
    body = msgpack.packb({"inputs": {"dtype": "float32", "shape": [limit // 256 + 1, 64],
                                     "data": b"\0" * ((limit // 256 + 1) * 256)}})

    response = client.post("/v1/predict", content=body, headers=MSGPACK_HEADERS)

    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"
    assert_still_answers(client, digits)


def test_unknown_path_and_wrong_method(client):
    assert client.get("/v2/nothing").status_code == 404
    assert client.get("/v1/predict").status_code == 405


def test_health_ready_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] == "ok"
    assert set(ready.json()["deployments"]) >= {"expert-0", "dense"}
    assert "swagger" in client.get("/docs").text.lower()
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def redeploy(served_app, faults):
    from ray import serve

    from services.app import build_app

    serve.run(build_app(served_app.settings, faults=faults), name=served_app.settings.app_name,
              route_prefix="/", blocking=False)


def wait_for_reason(client, digits, wanted, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = post_json(client, {"inputs": digits.test.x[:30].tolist()}).json()
        if wanted(set(body["route"]["row_reasons"])):
            return body
        time.sleep(0.5)
    pytest.fail(f"row reasons never matched within {timeout_s} s")


def test_raising_experts_answered_by_dense(client, digits, served_app):
    num_experts = len(served_app.settings.expert_overrides) or 4
    faults = {f"expert-{i}": {"kind": "error"} for i in range(num_experts)}
    redeploy(served_app, faults)
    try:
        body = wait_for_reason(client, digits, lambda reasons: reasons <= {"expert_error", "low_confidence"})

        assert "expert_error" in body["route"]["row_reasons"]
        assert (np.asarray(body["predictions"]) == digits.test.y[:30]).mean() >= 0.9
    finally:
        redeploy(served_app, {})
    wait_for_reason(client, digits, lambda reasons: "expert_error" not in reasons)
