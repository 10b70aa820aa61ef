"""Prometheus metric declarations, exported through Ray (`ray.serve.metrics`).

Each deployment builds its metric set once, in its constructor, with one of the
`*_metrics()` factories below; nothing declares a metric on the request path. Names
use Prometheus base units (`_seconds`, `_total`, `_ratio` in 0..1); Ray adds the
`ray_` prefix on export. Tags have bounded values: expert ids, paths, reasons and
outcomes, never request ids.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EXPORT_PREFIX",
    "LATENCY_BUCKETS_S",
    "METRIC_NAMES",
    "METRIC_TYPES",
    "ModelMetrics",
    "QueueMetrics",
    "RouterMetrics",
    "SupervisorMetrics",
    "model_metrics",
    "queue_metrics",
    "router_metrics",
    "supervisor_metrics",
    "exported_series_names",
]

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
EXPERT_COUNT_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 16.5]
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]

# Every metric name declared below, as exported (without Ray's `ray_` prefix).
METRIC_NAMES = (
    "switchyard_requests_total",
    "switchyard_expert_calls_total",
    "switchyard_expert_rows_total",
    "switchyard_experts_per_request",
    "switchyard_gate_confidence",
    "switchyard_fallbacks_total",
    "switchyard_request_duration_seconds",
    "switchyard_expert_call_duration_seconds",
    "switchyard_expert_errors_total",
    "switchyard_shadow_agreement_ratio",
    "switchyard_shadow_comparisons_total",
    "switchyard_supervisor_moe_weight_ratio",
    "switchyard_supervisor_state",
    "switchyard_supervisor_transitions_total",
    "switchyard_queue_messages_total",
    "switchyard_queue_backlog_messages",
    "switchyard_queue_dead_letters_total",
    "switchyard_model_batch_size",
    "switchyard_model_inference_seconds",
)

# Prometheus type of each name in METRIC_NAMES.
METRIC_TYPES = {
    "switchyard_requests_total": "counter",
    "switchyard_expert_calls_total": "counter",
    "switchyard_expert_rows_total": "counter",
    "switchyard_experts_per_request": "histogram",
    "switchyard_gate_confidence": "histogram",
    "switchyard_fallbacks_total": "counter",
    "switchyard_request_duration_seconds": "histogram",
    "switchyard_expert_call_duration_seconds": "histogram",
    "switchyard_expert_errors_total": "counter",
    "switchyard_shadow_agreement_ratio": "gauge",
    "switchyard_shadow_comparisons_total": "counter",
    "switchyard_supervisor_moe_weight_ratio": "gauge",
    "switchyard_supervisor_state": "gauge",
    "switchyard_supervisor_transitions_total": "counter",
    "switchyard_queue_messages_total": "counter",
    "switchyard_queue_backlog_messages": "gauge",
    "switchyard_queue_dead_letters_total": "counter",
    "switchyard_model_batch_size": "histogram",
    "switchyard_model_inference_seconds": "histogram",
}

# Ray's exporter prepends this to every application metric (checked with Ray 2.60).
EXPORT_PREFIX = "ray_"


def exported_series_names(name: str) -> tuple[str, ...]:
    """Return the series names Prometheus scrapes from Ray for one declared metric.

    Ray 2.60 exports a counter under its declared name when that already ends in
    `_total` (and appends `_total` otherwise), a gauge under its name, and a histogram
    as `_bucket`, `_sum` and `_count` series, all with `EXPORT_PREFIX`.

    Raises:
        KeyError: `name` is not in METRIC_TYPES.
    """
    kind = METRIC_TYPES[name]
    exported = EXPORT_PREFIX + name
    if kind == "histogram":
        return (f"{exported}_bucket", f"{exported}_sum", f"{exported}_count")
    if kind == "counter" and not name.endswith("_total"):
        return (f"{exported}_total",)
    return (exported,)


@dataclass(frozen=True)
class RouterMetrics:
    requests: object
    expert_calls: object
    expert_rows: object
    experts_per_request: object
    gate_confidence: object
    fallbacks: object
    request_duration: object
    expert_call_duration: object
    expert_errors: object
    shadow_agreement: object
    shadow_comparisons: object


@dataclass(frozen=True)
class ModelMetrics:
    batch_size: object
    inference_duration: object


@dataclass(frozen=True)
class SupervisorMetrics:
    moe_weight: object
    state: object
    transitions: object


@dataclass(frozen=True)
class QueueMetrics:
    messages: object
    backlog: object
    dead_letters: object


def router_metrics() -> RouterMetrics:
    from ray.serve.metrics import Counter, Gauge, Histogram

    return RouterMetrics(
        requests=Counter("switchyard_requests_total", description="Requests answered, by path and reason.",
                         tag_keys=("path", "reason")),
        expert_calls=Counter("switchyard_expert_calls_total", description="Calls from the router to each expert.",
                             tag_keys=("expert",)),
        expert_rows=Counter("switchyard_expert_rows_total", description="Input rows sent to each expert.",
                            tag_keys=("expert",)),
        experts_per_request=Histogram("switchyard_experts_per_request",
                                      description="Experts used per input row answered by the mixture.",
                                      boundaries=EXPERT_COUNT_BUCKETS),
        gate_confidence=Histogram("switchyard_gate_confidence",
                                  description="Highest gate probability per gated row (0..1).",
                                  boundaries=CONFIDENCE_BUCKETS),
        fallbacks=Counter("switchyard_fallbacks_total", description="Rows answered by dense, by reason.",
                          tag_keys=("reason",)),
        request_duration=Histogram("switchyard_request_duration_seconds",
                                   description="Router time per request, decode to encode.",
                                   boundaries=LATENCY_BUCKETS_S, tag_keys=("path",)),
        expert_call_duration=Histogram("switchyard_expert_call_duration_seconds",
                                       description="Duration of each router-to-expert call.",
                                       boundaries=LATENCY_BUCKETS_S, tag_keys=("expert",)),
        expert_errors=Counter("switchyard_expert_errors_total",
                              description="Expert calls that failed or timed out.", tag_keys=("expert", "kind")),
        shadow_agreement=Gauge("switchyard_shadow_agreement_ratio",
                               description="Share of shadowed rows where mixture and dense agree (0..1)."),
        shadow_comparisons=Counter("switchyard_shadow_comparisons_total",
                                   description="Rows compared against dense in shadow, by agreement.",
                                   tag_keys=("agree",)),
    )


def model_metrics(deployment: str) -> ModelMetrics:
    from ray.serve.metrics import Histogram

    batch_size = Histogram("switchyard_model_batch_size", description="Rows per forward pass.",
                           boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512], tag_keys=("model",))
    batch_size.set_default_tags({"model": deployment})
    inference = Histogram("switchyard_model_inference_seconds", description="Forward pass duration.",
                          boundaries=LATENCY_BUCKETS_S, tag_keys=("model",))
    inference.set_default_tags({"model": deployment})
    return ModelMetrics(batch_size=batch_size, inference_duration=inference)


def supervisor_metrics() -> SupervisorMetrics:
    from ray.serve.metrics import Counter, Gauge

    return SupervisorMetrics(
        moe_weight=Gauge("switchyard_supervisor_moe_weight_ratio",
                         description="Share of traffic the supervisor sends to the mixture (0..1)."),
        state=Gauge("switchyard_supervisor_state",
                    description="1 for the supervisor's current state, 0 for the others.", tag_keys=("state",)),
        transitions=Counter("switchyard_supervisor_transitions_total",
                            description="State changes, by target state and actor.", tag_keys=("to", "actor")),
    )


def queue_metrics() -> QueueMetrics:
    from ray.serve.metrics import Counter, Gauge

    return QueueMetrics(
        messages=Counter("switchyard_queue_messages_total",
                         description="Queue messages handled, by outcome (answered, dead_lettered, reclaimed, "
                                     "duplicate).", tag_keys=("outcome",)),
        backlog=Gauge("switchyard_queue_backlog_messages",
                      description="Entries of the requests stream not yet delivered or not yet acknowledged."),
        dead_letters=Counter("switchyard_queue_dead_letters_total",
                             description="Messages moved to the dead stream, by reason.", tag_keys=("reason",)),
    )
