"""Validated settings for every deployment of the application.

Defaults in this file fit a laptop or a 2-core CI machine: fractional CPUs per replica
and no GPU. Production values (GPUs, replica ranges) live in configuration files such
as `k8s/config/production.yaml`, loaded with `switchyard serve --config FILE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.redis_setup import RedisSettings

__all__ = [
    "AutoscalingSettings",
    "ReplicaSettings",
    "QueueSettings",
    "RouterSettings",
    "Settings",
    "SettingsError",
    "SupervisorSettings",
    "load_settings",
]


class SettingsError(ValueError):
    """A configuration file or option that does not validate; the message lists each problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingSettings(_Strict):
    """Ray Serve `autoscaling_config` for one deployment."""

    min_replicas: int = Field(1, ge=0, description="Minimum number of replicas kept running.")
    max_replicas: int = Field(2, ge=1, description="Maximum number of replicas the autoscaler may start.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; min_replicas when unset.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(3.0, ge=0, description="Seconds of high load before adding a replica.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Seconds of low load before removing a replica.")
    metrics_interval_s: float = Field(1.0, gt=0, description="Seconds between load reports from replicas.")
    look_back_period_s: float = Field(5.0, gt=0, description="Seconds of load history averaged per decision.")

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self

    def to_serve(self) -> dict[str, Any]:
        config = self.model_dump(exclude_none=True)
        return config


class ReplicaSettings(_Strict):
    """Resources, batching and scaling of one model deployment (an expert or dense)."""

    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica (Ray resource).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica; the model runs on CUDA when > 0.")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count when `autoscaling` is not set.")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Autoscaling range and targets; overrides num_replicas."
    )
    max_batch_size: int = Field(32, ge=1, description="Maximum calls merged into one forward pass.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="Seconds a partial batch waits for more calls; 0 merges only the calls already "
                               "waiting. The router sends one call per model per batch of requests, so a wait pays "
                               "off only where several router replicas share a model (a GPU pool)."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Calls a replica accepts at once; at least max_batch_size."
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="Calls queued per caller before rejecting; -1 is unlimited."
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica.")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="Seconds a stopping replica waits for ongoing calls."
    )
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, ge=0, description="Seconds between checks while draining."
    )

    @model_validator(mode="after")
    def _check_batching(self) -> ReplicaSettings:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}); otherwise batches never grow past max_ongoing_requests"
            )
        return self

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class RouterSettings(_Strict):
    """The routing ingress: policy overrides, capacity, timeouts, batching and HTTP limits."""

    top_p: float | None = Field(None, gt=0, le=1, description="Cumulative gate probability to reach; bundle default when unset.")
    min_k: int | None = Field(None, ge=1, description="Minimum experts per row; bundle default when unset.")
    max_k: int | None = Field(None, ge=1, description="Maximum experts per row; bundle default when unset.")
    confidence_floor: float | None = Field(
        None, ge=0, lt=1, description="Top gate probability below which a row goes to dense; bundle default when unset."
    )
    escalate_below: float | None = Field(
        None, ge=0, lt=1, description="Top class probability of the experts' combined answer below which the row "
                                      "goes to dense as well (0 turns it off); bundle default when unset."
    )
    expert_capacity: int = Field(
        512, ge=1, description="Rows in flight per expert per router replica before rows move elsewhere."
    )
    expert_timeout_s: float = Field(2.0, gt=0, description="Seconds to wait for an expert before using dense.")
    dense_timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for the dense model.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Maximum request body size, in bytes.")
    max_rows_per_request: int = Field(1024, ge=1, description="Maximum input rows in one request.")
    max_concurrent_batches: int = Field(
        1, ge=1, description="Batches one router replica dispatches at once; requests arriving meanwhile "
                             "form the next batch."
    )
    replica: ReplicaSettings = Field(
        default_factory=lambda: ReplicaSettings(num_cpus=0.2, max_batch_size=64, batch_wait_timeout_s=0.004,
                                                max_ongoing_requests=256),
        description="Resources and request batching of the router replicas; batch_wait_timeout_s is the extra "
                    "time a batch waits to fill under load (a lone request on an idle router never waits).",
    )


class SupervisorSettings(_Strict):
    """The quality loop: evaluation windows, thresholds, rollback and the staged ramp-back."""

    interval_s: float = Field(5.0, gt=0, description="Seconds between window evaluations.")
    failed_windows: int = Field(2, ge=1, description="Consecutive failed windows in `moe` before all traffic goes to dense.")
    cooldown_s: float = Field(30.0, ge=0, description="Seconds in `dense` before the ramp-back starts.")
    step_weight: float = Field(0.25, gt=0, le=1, description="Share of traffic added to the mixture per canary step (0..1).")
    max_weight: float = Field(0.75, gt=0, le=1, description="Largest canary share; a passed step at this share promotes to `moe`.")
    step_windows: int = Field(
        2, ge=1, description="Consecutive passed windows needed before the next canary step; more make a false pass rarer."
    )
    min_agreement: float = Field(0.9, ge=0, le=1, description="Lowest shadow agreement of mixture and dense predictions (0..1).")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="Highest share of expert rows that failed or timed out (0..1).")
    max_p99_latency_s: float = Field(2.0, gt=0, description="Highest p99 router latency per request, in seconds.")
    min_accuracy: float | None = Field(
        None, ge=0, le=1, description="Lowest online accuracy from `/v1/feedback` labels; unset reports without checking."
    )
    min_samples: int = Field(20, ge=1, description="Minimum samples a metric needs; below it the window is inconclusive.")
    shadow_fraction: float = Field(
        0.2, ge=0, le=1, description="Share of mixture-answered requests also sent to dense off the response path."
    )
    max_shadow_in_flight: int = Field(32, ge=1, description="Shadow calls in flight per router replica; more are skipped.")
    shadow_window_s: float = Field(
        0.5, gt=0, allow_inf_nan=False,
        description="Seconds sampled requests wait to share one dense call, unless a dense call the router makes "
                    "anyway takes them first, or half of max_shadow_in_flight are waiting; shorter than interval_s."
    )
    flush_interval_s: float = Field(0.5, gt=0, description="Seconds between quality-record flushes of each router replica.")
    poll_interval_s: float = Field(2.0, gt=0, description="Seconds between policy re-reads of each router replica.")
    prediction_ttl_s: int = Field(3600, ge=1, description="Seconds a prediction is kept for `/v1/feedback`.")
    max_events: int = Field(10_000, ge=10, description="Events kept in the events stream (approximate cap).")

    @model_validator(mode="after")
    def _check_ramp(self) -> SupervisorSettings:
        if self.step_weight > self.max_weight:
            raise ValueError(
                f"step_weight ({self.step_weight}) must be <= max_weight ({self.max_weight}), "
                "or the ramp-back has no canary step"
            )
        if self.flush_interval_s >= self.interval_s:
            raise ValueError(
                f"flush_interval_s ({self.flush_interval_s} s) must be shorter than interval_s "
                f"({self.interval_s} s), or windows miss the records of the last flush"
            )
        if self.shadow_window_s >= self.interval_s:
            raise ValueError(
                f"shadow_window_s ({self.shadow_window_s} s) must be shorter than interval_s "
                f"({self.interval_s} s), or shadow comparisons reach the window after the one they belong to"
            )
        return self


class QueueSettings(_Strict):
    """The Redis Streams queue path: bounds, batching, redelivery and the worker deployment."""

    enabled: bool = Field(True, description="Deploy the `queue-worker` deployment.")
    max_length: int = Field(
        10_000, ge=1, description="Most entries (undelivered plus pending) in the requests stream; producers wait above it."
    )
    batch_size: int = Field(32, ge=1, description="Entries read per XREADGROUP (COUNT) and claimed per XAUTOCLAIM page.")
    max_deliveries: int = Field(5, ge=1, description="Deliveries after which an unanswered entry goes to the dead stream.")
    claim_idle_ms: int = Field(
        30_000, ge=1, description="Milliseconds an entry stays pending unacknowledged before another consumer claims it."
    )
    reclaim_interval_s: float = Field(5.0, gt=0, description="Seconds between reclaim passes of each worker.")
    route_timeout_s: float = Field(10.0, gt=0, description="Seconds a worker waits for the router per entry.")
    results_max_length: int = Field(
        100_000, ge=1, description="Approximate cap of the results stream (XADD MAXLEN ~); older answers are trimmed."
    )
    dead_max_length: int = Field(100_000, ge=1, description="Approximate cap of the dead stream (XADD MAXLEN ~).")
    num_replicas: int = Field(1, ge=1, description="Worker replicas; each runs one consumer.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per worker replica (Ray resource).")
    graceful_shutdown_timeout_s: float = Field(
        5.0, ge=0, description="Seconds a stopping worker has to finish its current batch."
    )

    @model_validator(mode="after")
    def _check_claim_after_timeout(self) -> QueueSettings:
        if self.claim_idle_ms <= self.route_timeout_s * 1000:
            raise ValueError(
                f"claim_idle_ms ({self.claim_idle_ms} ms) must be longer than route_timeout_s "
                f"({self.route_timeout_s} s), or entries still being routed are claimed and routed twice"
            )
        return self


class Settings(_Strict):
    """Everything `switchyard serve` deploys."""

    bundle: Path = Field(Path(".switchyard/bundles/digits"), description="Model bundle directory.")
    app_name: str = Field("switchyard", min_length=1, description="Ray Serve application name.")
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy; 0 picks a free one.")
    router: RouterSettings = Field(default_factory=RouterSettings)
    experts: ReplicaSettings = Field(
        default_factory=lambda: ReplicaSettings(autoscaling=AutoscalingSettings()),
        description="Settings every expert deployment starts from; each gets its own copy.",
    )
    expert_overrides: dict[int, dict[str, Any]] = Field(
        default_factory=dict, description="Per-expert changes to `experts`, keyed by expert id."
    )
    dense: ReplicaSettings = Field(default_factory=lambda: ReplicaSettings(num_cpus=0.2))
    redis: RedisSettings = Field(
        default_factory=RedisSettings,
        description="Redis connection; `url` unset makes `switchyard serve` start an embedded server.",
    )
    queue: QueueSettings = Field(
        default_factory=QueueSettings, description="Redis Streams intake: bounds, redelivery and workers."
    )
    supervisor: SupervisorSettings = Field(
        default_factory=SupervisorSettings, description="Quality windows, thresholds, rollback and ramp-back."
    )

    @field_validator("expert_overrides")
    @classmethod
    def _check_overrides(cls, overrides: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        for expert_id, changes in overrides.items():
            if expert_id < 0:
                raise ValueError(f"expert id {expert_id} must be >= 0")
            unknown = set(changes) - set(ReplicaSettings.model_fields)
            if unknown:
                raise ValueError(f"expert {expert_id}: unknown fields {sorted(unknown)}; "
                                 f"valid fields are {sorted(ReplicaSettings.model_fields)}")
        return overrides

    def expert_settings(self, expert_id: int) -> ReplicaSettings:
        """Settings of one expert deployment: `experts` with its overrides applied."""
        changes = self.expert_overrides.get(expert_id)
        if not changes:
            return self.experts
        merged = self.experts.model_dump()
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return ReplicaSettings.model_validate(merged)


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"  {location}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def load_settings(path: str | Path | None = None, redis_url: str | None = None, **overrides: Any) -> Settings:
    """Read settings from a YAML or JSON file (optional), then apply keyword overrides.

    Overrides with the value None are ignored, so CLI options that were not given keep
    the file's values. `redis_url` sets `redis.url`.

    Raises:
        SettingsError: the file cannot be read, or any field is invalid; every problem
            is listed with its dotted location.
    """
    data: dict[str, Any] = {}
    source = "options"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as error:
            raise SettingsError(f"cannot read config file {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise SettingsError(f"config file {path} is not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"config file {path} must hold a mapping at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    data.update({key: value for key, value in overrides.items() if value is not None})
    if redis_url is not None:
        data["redis"] = {**(data.get("redis") or {}), "url": redis_url}
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        raise SettingsError(_format_validation_error(error, source)) from None
