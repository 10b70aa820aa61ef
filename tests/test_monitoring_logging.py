"""structlog set-up, redaction, rate-limited warnings and the router's per-row metric values."""

import asyncio
import io
import json
import logging

import numpy as np
import pytest
import structlog

import monitoring.logging
from monitoring.logging import REDACTED, RateLimitedWarning, configure_logging, get_logger
from services.router_telemetry import summarize_rows


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def reset_logging() -> None:
    """Drop this module's configuration; the next `get_logger` configures with the defaults."""
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    monitoring.logging._configured = False


@pytest.fixture
def log_stream():
    """JSON logging into a buffer for one test."""
    stream = io.StringIO()
    configure_logging(json_output=None, level=logging.DEBUG, stream=stream)
    yield stream
    reset_logging()


def parsed_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_non_terminal_stream_gets_json_lines(log_stream):
    log = get_logger("router", deployment="router")

    log.info("request", request_id="r-1", latency_ms=1.5)
    log.warning("fault_changed", fault={"kind": "slow"})

    lines = parsed_lines(log_stream)
    assert [line["event"] for line in lines] == ["request", "fault_changed"]
    assert lines[0]["request_id"] == "r-1"
    assert lines[0]["component"] == "router"
    assert lines[0]["level"] == "info"
    assert lines[1]["level"] == "warning"
    assert lines[1]["fault"] == {"kind": "slow"}
    assert all(line["timestamp"].endswith("Z") for line in lines)


def test_terminal_stream_gets_console_renderer():
    stream = TerminalStream()
    configure_logging(stream=stream)
    try:
        get_logger("cli").info("serving", http_url="http://127.0.0.1:8000")
    finally:
        reset_logging()

    output = stream.getvalue()
    assert "serving" in output
    assert "http://127.0.0.1:8000" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output.splitlines()[0])


def test_debug_lines_filtered_at_info_level():
    stream = io.StringIO()
    configure_logging(json_output=True, level=logging.INFO, stream=stream)
    try:
        log = get_logger("model_replica")
        log.debug("forward_pass", rows=3)
        log.info("replica_started")
    finally:
        reset_logging()

    assert [line["event"] for line in parsed_lines(stream)] == ["replica_started"]


def test_tokens_and_payloads_redacted(log_stream):
    log = get_logger("supervisor")

    log.info("admin_request", token="s3cret", Authorization="Bearer s3cret", payload={"inputs": [1, 2]},
             body=b"\x00\x01", raw=b"abcdef", request_id="r-2")

    line = parsed_lines(log_stream)[0]
    assert line["token"] == REDACTED
    assert line["Authorization"] == REDACTED
    assert line["payload"] == REDACTED
    assert line["body"] == REDACTED
    assert line["raw"] == "<6 bytes>"
    assert line["request_id"] == "r-2"
    assert "s3cret" not in log_stream.getvalue()


async def test_interleaved_requests_keep_their_own_ids(log_stream):
    """Concurrent tasks bind their own request id, and every line carries the id of its task."""
    log = get_logger("queue_worker")

    async def handle(request_id: str, pauses: list[float]) -> None:
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            for step, pause in enumerate(pauses):
                log.info("step", step=step, expected=request_id)
                await asyncio.sleep(pause)
            log.info("request", expected=request_id)

    rng = np.random.default_rng(0)
    request_ids = [f"req-{index}" for index in range(40)]
    await asyncio.gather(*(handle(request_id, list(rng.uniform(0, 0.003, size=4))) for request_id in request_ids))
    log.info("after_requests")

    lines = parsed_lines(log_stream)
    steps = [line for line in lines if line["event"] == "step"]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(steps) == 4 * len(request_ids)
    assert sorted(line["request_id"] for line in requests) == sorted(request_ids)
    assert all(line["request_id"] == line["expected"] for line in steps + requests)
    interleaved = [line["request_id"] for line in steps[: len(request_ids)]]
    assert len(set(interleaved)) > 1, "the tasks did not interleave"
    assert "request_id" not in lines[-1]


def test_rate_limited_warning_counts_suppressed(log_stream):
    now = [100.0]
    warnings = RateLimitedWarning(interval_s=30.0, clock=lambda: now[0])
    log = get_logger("router")

    logged = [warnings.warn(log, "expert_call_failed", expert=1) for _ in range(5)]
    now[0] += 31.0
    logged.append(warnings.warn(log, "expert_call_failed", expert=1))

    assert logged == [True, False, False, False, False, True]
    lines = parsed_lines(log_stream)
    assert [line["suppressed"] for line in lines] == [0, 4]


def test_rate_limited_warning_keys_independent(log_stream):
    warnings = RateLimitedWarning(interval_s=30.0, clock=lambda: 0.0)
    log = get_logger("router")

    first = warnings.warn(log, "expert_call_failed", key="expert_call_failed:0", expert=0)
    second = warnings.warn(log, "expert_call_failed", key="expert_call_failed:1", expert=1)
    repeat = warnings.warn(log, "expert_call_failed", key="expert_call_failed:0", expert=0)

    assert (first, second, repeat) == (True, True, False)
    assert [line["expert"] for line in parsed_lines(log_stream)] == [0, 1]


def test_summarize_rows_splits_reasons():
    summary = summarize_rows(
        row_reasons=["top_p", "low_confidence", "top_p", "requested", "capacity", "supervisor"],
        k=[2, 0, 1, 0, 0, 0],
        confidence=[0.9, 0.2, 0.7, 0.0, 0.8, 0.0],
    )

    assert summary.experts_per_row == [2, 1]
    assert dict(summary.fallbacks) == {"low_confidence": 1, "requested": 1, "capacity": 1, "supervisor": 1}
    assert summary.gate_confidence == pytest.approx([0.9, 0.2, 0.7, 0.8])


def test_summarize_rows_of_dense_request():
    summary = summarize_rows(row_reasons=["requested"] * 3, k=[0] * 3, confidence=[0.0] * 3)

    assert summary.experts_per_row == []
    assert summary.gate_confidence == []
    assert dict(summary.fallbacks) == {"requested": 3}


def test_expert_failures_warn_once_per_expert(log_stream):
    from monitoring.metrics import router_metrics
    from services.dispatch import ExpertCallRecord
    from services.router_telemetry import RouterTelemetry

    now = [0.0]
    telemetry = RouterTelemetry(router_metrics(), get_logger("router"),
                                RateLimitedWarning(interval_s=30.0, clock=lambda: now[0]))

    def failed_call(expert: int, request_ids: list[str]) -> ExpertCallRecord:
        return ExpertCallRecord(expert=expert, rows=len(request_ids), duration_s=0.01, status="error",
                                error=RuntimeError("injected fault"), request_ids=request_ids)

    telemetry.observe_expert_call(failed_call(1, ["a", "b"]))
    telemetry.observe_expert_call(failed_call(1, ["c"]))
    telemetry.observe_expert_call(failed_call(2, ["d"]))
    telemetry.observe_expert_call(ExpertCallRecord(expert=3, rows=1, duration_s=0.01, status="ok", error=None,
                                                   request_ids=["e"]))
    now[0] = 31.0
    telemetry.observe_expert_call(failed_call(1, ["f"]))

    lines = parsed_lines(log_stream)
    assert [line["event"] for line in lines] == ["expert_call_failed"] * 3
    assert [line["expert"] for line in lines] == [1, 2, 1]
    assert [line["request_ids"] for line in lines] == [["a", "b"], ["d"], ["f"]]
    assert [line["suppressed"] for line in lines] == [0, 0, 1]
    assert lines[0]["kind"] == "error"
    assert "injected fault" in lines[0]["error"]
