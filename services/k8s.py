"""Kubernetes manifests for KubeRay, rendered from the settings that `switchyard serve` uses.

`render_manifests` writes a Kustomize base (namespace, Redis, PodMonitors, PrometheusRule)
and one overlay per cluster kind, each with a complete RayService. The RayService's
`serveConfigV2` is built from a validated `Settings` object: the application runs
`services.app:app_builder` with the settings mapping as `args`, exactly as
`switchyard serve` runs `build_app(settings)`. The router, expert and dense options come
from the same `ReplicaSettings.deployment_options()` that `build_app` applies in code.
The queue worker's and the supervisor's options are repeated here, and
tests/test_k8s_autoscaling.py compares all of them with the applications that
`services.app` builds.

Cluster topology (image, worker groups, GPUs, Redis storage) is not part of `Settings`;
it comes from a cluster file, `k8s/config/cluster.yaml` by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.ray_env import SERVE_ENV
from services.settings import Settings, SettingsError, load_settings

__all__ = [
    "APP_IMPORT_PATH",
    "ClusterSettings",
    "RenderError",
    "RenderedFile",
    "SUPERVISOR_IMPORT_PATH",
    "WorkerGroupSettings",
    "application_deployments",
    "load_cluster_settings",
    "render_manifests",
    "render_serve_config",
    "supervisor_application",
    "write_manifests",
]

APP_IMPORT_PATH = "services.app:app_builder"
SUPERVISOR_IMPORT_PATH = "services.app:supervisor_app_builder"
# Serve options that `services.app.build_supervisor_app` sets in code for its one deployment.
SUPERVISOR_OPTIONS = {"num_replicas": 1, "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.05},
                      "health_check_period_s": 5.0}
DEFAULT_CLUSTER_FILE = Path("k8s/config/cluster.yaml")
DEFAULT_ALERTS_FILE = Path(__file__).resolve().parents[1] / "monitoring" / "prometheus" / "alerts.yaml"
REDIS_SECRET_KEY = "password"
REDIS_PASSWORD_ENV = "REDIS_PASSWORD"
ADMIN_SECRET_KEY = "token"
ADMIN_TOKEN_ENV = "SWITCHYARD_ADMIN_TOKEN"
METRICS_PORT = 8080
# Seconds a worker pod may take to stop beyond the longest graceful shutdown of a Serve
# deployment: time for Ray to stop its processes after the replicas have drained.
TERMINATION_MARGIN_S = 30
# Serve's default `graceful_shutdown_timeout_s` (Ray 2.60) for deployments that do not set it.
SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S = 20.0


class RenderError(ValueError):
    """The settings or the cluster file cannot produce valid manifests. The message names the value to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerGroupSettings(_Strict):
    """One Ray worker group: pod size, GPUs and the range the Ray autoscaler may scale it in."""

    name: str = Field(..., pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="Ray worker group name.")
    min_replicas: int = Field(1, ge=0, description="Minimum number of worker pods.")
    max_replicas: int = Field(4, ge=1, description="Maximum number of worker pods the Ray autoscaler may start.")
    cpus: float = Field(2.0, gt=0, description="CPUs per pod: Kubernetes request and limit, and Ray's num-cpus.")
    memory: str = Field("8Gi", description="Memory per pod (Kubernetes quantity), request and limit.")
    gpus: int = Field(0, ge=0, description="NVIDIA GPUs per pod (`nvidia.com/gpu`), request and limit.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes nodeSelector of the pods.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra Kubernetes tolerations; GPU groups always tolerate `nvidia.com/gpu`."
    )

    @model_validator(mode="after")
    def _check_range(self) -> WorkerGroupSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"worker group {self.name!r}: max_replicas ({self.max_replicas}) must be >= "
                             f"min_replicas ({self.min_replicas})")
        return self


class HeadSettings(_Strict):
    """The Ray head pod. It runs the GCS, the Serve controller and a proxy, but no replicas (num-cpus 0)."""

    cpus: float = Field(1.0, gt=0, description="CPUs of the head pod, request and limit.")
    memory: str = Field("4Gi", description="Memory of the head pod, request and limit.")


class RedisClusterSettings(_Strict):
    """The Redis StatefulSet shared by Switchyard and Ray's GCS fault tolerance."""

    image: str = Field("redis:7.2", description="Redis container image.")
    storage: str = Field("1Gi", description="Size of the persistent volume claim.")
    storage_class: str | None = Field(None, description="StorageClass of the claim; the cluster default when unset.")
    secret_name: str = Field("switchyard-redis", description="Secret with the Redis password under key `password`.")
    service_name: str = Field("switchyard-redis", description="Service and StatefulSet name of Redis.")


class OverlaySettings(_Strict):
    """One Kustomize overlay: which Switchyard settings it serves and on which worker groups."""

    settings: Path = Field(..., description="Switchyard settings file, relative to the cluster file.")
    workers: list[WorkerGroupSettings] = Field(..., min_length=1, description="Ray worker groups.")
    redis_storage: str | None = Field(None, description="Redis volume size in this overlay; the base's when unset.")
    dev_redis_password: str | None = Field(
        None,
        description="Generate the Redis Secret with this password (development clusters only); "
        "unset means the Secret must exist before the overlay is applied.",
    )
    dev_admin_token: str | None = Field(
        None,
        description="Generate the admin-token Secret with this token (development clusters only); "
        "unset means the Secret must exist before the overlay is applied.",
    )


class ClusterSettings(_Strict):
    """Everything about the Kubernetes cluster that `Settings` does not describe."""

    name: str = Field("switchyard", description="Name of the RayService and prefix of the other objects.")
    namespace: str = Field("switchyard", description="Namespace of every object.")
    image: str = Field(..., description="Container image with Switchyard installed and the bundle at `bundle`.")
    ray_version: str = Field(..., description="Ray version inside the image (RayService `rayVersion`).")
    experts: int = Field(..., ge=1, description="Number of experts in the bundle inside the image.")
    autoscaler_idle_timeout_s: int = Field(60, ge=0, description="Seconds a worker pod stays idle before removal.")
    prometheus_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels the Prometheus operator selects PodMonitors and PrometheusRules by.",
    )
    admin_secret_name: str = Field(
        "switchyard-admin", description="Secret with the supervisor API's bearer token under key `token`."
    )
    head: HeadSettings = Field(default_factory=HeadSettings)
    redis: RedisClusterSettings = Field(default_factory=RedisClusterSettings)
    overlays: dict[str, OverlaySettings] = Field(..., min_length=1, description="Overlays by directory name.")


@dataclass(frozen=True)
class RenderedFile:
    """One manifest file: its path relative to the output directory and its text."""

    path: Path
    text: str


def load_cluster_settings(path: str | Path) -> ClusterSettings:
    """Read and validate a cluster file.

    Raises:
        RenderError: the file is missing, is not YAML, or a field is invalid.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise RenderError(f"cannot read cluster file {path}: {error.strerror}; pass --cluster FILE "
                          "or run from the repository root") from error
    except yaml.YAMLError as error:
        raise RenderError(f"cluster file {path} is not valid YAML: {error}") from error
    try:
        return ClusterSettings.model_validate(data or {})
    except ValidationError as error:
        lines = [f"invalid cluster file {path}:"]
        for problem in error.errors():
            location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            lines.append(f"  {location}: {problem['msg']}")
        raise RenderError("\n".join(lines)) from None


# ---------------------------------------------------------------------------------------
# serveConfigV2


def application_deployments(settings: Settings, num_experts: int) -> dict[str, dict[str, Any]]:
    """Map each deployment that `build_app` binds to the Serve options it sets in code.

    Raises:
        RenderError: `expert_overrides` names an expert the bundle does not have.
    """
    from services.app import DENSE_DEPLOYMENT, QUEUE_WORKER_DEPLOYMENT, ROUTER_DEPLOYMENT, expert_deployment_name

    unknown = sorted(set(settings.expert_overrides) - set(range(num_experts)))
    if unknown:
        raise RenderError(f"expert_overrides names experts {unknown}, but the cluster file sets the bundle's "
                          f"expert count to {num_experts} (experts 0..{num_experts - 1}); fix `experts` in the "
                          "cluster file or the overrides")
    deployments = {ROUTER_DEPLOYMENT: settings.router.replica.deployment_options()}
    for expert_id in range(num_experts):
        deployments[expert_deployment_name(expert_id)] = settings.expert_settings(expert_id).deployment_options()
    deployments[DENSE_DEPLOYMENT] = settings.dense.deployment_options()
    if settings.queue.enabled:
        # The same options as `services.app._queue_worker_deployment`.
        queue = settings.queue
        deployments[QUEUE_WORKER_DEPLOYMENT] = {
            "num_replicas": queue.num_replicas,
            "ray_actor_options": {"num_cpus": queue.num_cpus},
            "graceful_shutdown_timeout_s": queue.graceful_shutdown_timeout_s,
        }
    return deployments


def render_serve_config(settings: Settings, num_experts: int) -> dict[str, Any]:
    """Build the Serve config (`ServeDeploySchema`) that KubeRay deploys as `serveConfigV2`.

    `args` is the whole settings mapping, so every settings section reaches
    `app_builder`, including sections added after this function was written. The
    `deployments` entries repeat the options that `build_app` sets in code, so the
    manifest shows each deployment's resources and autoscaling range.
    """
    if settings.port == 0:
        raise RenderError("port is 0 (a free port picked at start), but Kubernetes Services need a fixed port; "
                          "set `port` in the settings file")
    deployments = [{"name": name, **options}
                   for name, options in application_deployments(settings, num_experts).items()]
    application = {
        "name": settings.app_name,
        "route_prefix": "/",
        "import_path": APP_IMPORT_PATH,
        "args": settings.model_dump(mode="json"),
        "deployments": deployments,
    }
    supervisor = supervisor_application(settings)
    return {
        "proxy_location": "EveryNode",
        # Pods receive traffic from Services on their pod IP, so the proxy listens on every
        # interface there, whatever `host` a local run uses.
        "http_options": {"host": "0.0.0.0", "port": settings.port},
        "logging_config": {"enable_access_log": False},
        "applications": [application, supervisor],
    }


def supervisor_application(settings: Settings) -> dict[str, Any]:
    """Build the Serve config of the supervisor application that `switchyard serve` runs beside the router.

    Its builder reads the admin token from `SWITCHYARD_ADMIN_TOKEN`, which the pods get
    from the admin Secret.
    """
    from services.app import SUPERVISOR_DEPLOYMENT, supervisor_app_name
    from services.supervisor_api import ROUTE_PREFIX

    return {
        "name": supervisor_app_name(settings),
        "route_prefix": ROUTE_PREFIX,
        "import_path": SUPERVISOR_IMPORT_PATH,
        "args": settings.model_dump(mode="json"),
        "deployments": [{"name": SUPERVISOR_DEPLOYMENT, **SUPERVISOR_OPTIONS}],
    }


# ---------------------------------------------------------------------------------------
# RayService


def _labels(cluster: ClusterSettings, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": cluster.name, "app.kubernetes.io/component": component}


def _redis_password_env(cluster: ClusterSettings) -> dict[str, Any]:
    return {"name": REDIS_PASSWORD_ENV,
            "valueFrom": {"secretKeyRef": {"name": cluster.redis.secret_name, "key": REDIS_SECRET_KEY}}}


def _ray_pod_env(cluster: ClusterSettings) -> list[dict[str, Any]]:
    """Environment of every Ray pod: Serve settings and Secrets (Ray workers inherit the pod's environment)."""
    admin_token = {"name": ADMIN_TOKEN_ENV,
                   "valueFrom": {"secretKeyRef": {"name": cluster.admin_secret_name, "key": ADMIN_SECRET_KEY}}}
    serve_env = [{"name": name, "value": value} for name, value in SERVE_ENV.items()]
    return [*serve_env, _redis_password_env(cluster), admin_token]


def _termination_grace_period_s(serve_config: dict[str, Any]) -> int:
    longest = max(
        (deployment.get("graceful_shutdown_timeout_s", SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S)
         for application in serve_config["applications"] for deployment in application["deployments"]),
        default=SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S,
    )
    return math.ceil(longest) + TERMINATION_MARGIN_S


def _head_group(cluster: ClusterSettings, serve_port: int) -> dict[str, Any]:
    resources = {"cpu": _quantity(cluster.head.cpus), "memory": cluster.head.memory}
    return {
        # num-cpus 0 keeps Serve replicas off the head, so losing a worker never takes the
        # GCS or the controller with it.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)},
        "template": {
            "metadata": {"labels": _labels(cluster, "ray-head")},
            "spec": {
                "containers": [{
                    "name": "ray-head",
                    "image": cluster.image,
                    "env": _ray_pod_env(cluster),
                    "ports": [
                        {"name": "gcs-server", "containerPort": 6379},
                        {"name": "dashboard", "containerPort": 8265},
                        {"name": "client", "containerPort": 10001},
                        {"name": "serve", "containerPort": serve_port},
                        {"name": "metrics", "containerPort": METRICS_PORT},
                    ],
                    "resources": {"requests": resources, "limits": resources},
                }],
            },
        },
    }


def _worker_group(cluster: ClusterSettings, group: WorkerGroupSettings, grace_period_s: int,
                  serve_port: int) -> dict[str, Any]:
    resources: dict[str, Any] = {"cpu": _quantity(group.cpus), "memory": group.memory}
    tolerations = list(group.tolerations)
    if group.gpus:
        resources["nvidia.com/gpu"] = str(group.gpus)
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    pod_spec: dict[str, Any] = {
        # Longer than the longest graceful shutdown of a deployment, so replicas on a
        # stopping pod finish their ongoing requests before the kubelet kills them.
        "terminationGracePeriodSeconds": grace_period_s,
        "containers": [{
            "name": "ray-worker",
            "image": cluster.image,
            "env": _ray_pod_env(cluster),
            "ports": [
                {"name": "serve", "containerPort": serve_port},
                {"name": "metrics", "containerPort": METRICS_PORT},
            ],
            "resources": {"requests": resources, "limits": resources},
            # The proxy on every worker serves /readyz for the whole application (all
            # deployments running and Redis reachable), so the serve Service only sends
            # traffic to pods once the application is ready.
            "readinessProbe": {
                "httpGet": {"path": "/readyz", "port": serve_port},
                "initialDelaySeconds": 10,
                "periodSeconds": 5,
                "timeoutSeconds": 3,
                "failureThreshold": 3,
            },
            "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
        }],
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if group.node_selector:
        pod_spec["nodeSelector"] = dict(group.node_selector)
    start_params = {"num-cpus": _quantity(group.cpus), "metrics-export-port": str(METRICS_PORT)}
    if group.gpus:
        start_params["num-gpus"] = str(group.gpus)
    return {
        "groupName": group.name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": start_params,
        "template": {"metadata": {"labels": _labels(cluster, "ray-worker")}, "spec": pod_spec},
    }


def _check_redis(overlay_name: str, overlay: OverlaySettings, settings: Settings) -> None:
    redis = settings.redis
    if redis.url is None:
        raise RenderError(f"overlay {overlay_name}: redis.url is not set in {overlay.settings}, and pods get no "
                          "embedded Redis; set it, e.g. to redis://switchyard-redis:6379/0")
    if redis.password_env is None and "@" not in redis.url:
        raise RenderError(f"overlay {overlay_name}: the manifests' Redis requires a password, but "
                          f"{overlay.settings} sets neither a password in redis.url nor redis.password_env; "
                          f"set redis.password_env: {REDIS_PASSWORD_ENV}")


def _check_placement(overlay_name: str, overlay: OverlaySettings, deployments: dict[str, dict[str, Any]]) -> None:
    for name, options in deployments.items():
        actor = options.get("ray_actor_options", {})
        cpus, gpus = actor.get("num_cpus", 1.0), actor.get("num_gpus", 0.0)
        if not any(cpus <= group.cpus and gpus <= group.gpus for group in overlay.workers):
            groups = ", ".join(f"{group.name} ({group.cpus:g} CPUs, {group.gpus} GPUs)" for group in overlay.workers)
            raise RenderError(
                f"overlay {overlay_name}: deployment {name} needs {cpus:g} CPUs and "
                f"{gpus:g} GPUs per replica, but no worker group is that large ({groups}); "
                f"enlarge a worker group in the cluster file or lower num_cpus/num_gpus in {overlay.settings}"
            )


def render_rayservice(cluster: ClusterSettings, overlay_name: str, overlay: OverlaySettings,
                      settings: Settings) -> dict[str, Any]:
    """Build the RayService of one overlay."""
    _check_redis(overlay_name, overlay, settings)
    _check_placement(overlay_name, overlay, application_deployments(settings, cluster.experts))
    serve_config = render_serve_config(settings, cluster.experts)
    grace_period_s = _termination_grace_period_s(serve_config)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": cluster.name, "labels": _labels(cluster, "serve")},
        "spec": {
            # Traffic enters through the workers, whose readiness is the application's /readyz.
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": _to_yaml(serve_config),
            "rayClusterConfig": {
                "rayVersion": cluster.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": cluster.autoscaler_idle_timeout_s,
                },
                # The GCS keeps its tables in Redis, so a restarted head pod recovers the
                # cluster state while running Serve replicas keep serving requests.
                "gcsFaultToleranceOptions": {
                    "redisAddress": f"{cluster.redis.service_name}:6379",
                    "redisPassword": {"valueFrom": {"secretKeyRef": {"name": cluster.redis.secret_name,
                                                                     "key": REDIS_SECRET_KEY}}},
                },
                "headGroupSpec": _head_group(cluster, settings.port),
                "workerGroupSpecs": [_worker_group(cluster, group, grace_period_s, settings.port)
                                     for group in overlay.workers],
            },
        },
    }


# ---------------------------------------------------------------------------------------
# Base: namespace, Redis, monitoring


def _redis_objects(cluster: ClusterSettings) -> list[dict[str, Any]]:
    name = cluster.redis.service_name
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": cluster.name}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        # Headless: the name resolves to the single StatefulSet pod.
        "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "redis", "port": 6379,
                                                                      "targetPort": "redis"}]},
    }
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": cluster.redis.storage}}}
    if cluster.redis.storage_class:
        claim_spec["storageClassName"] = cluster.redis.storage_class
    password_check = 'redis-cli --no-auth-warning -a "$REDIS_PASSWORD" ping | grep -q PONG'
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "redis",
                        "image": cluster.redis.image,
                        # Append-only file with fsync every second: Switchyard's supervisor
                        # state and queue, and the GCS tables, survive a pod restart.
                        "args": ["--requirepass", f"$({REDIS_PASSWORD_ENV})", "--appendonly", "yes",
                                 "--appendfsync", "everysec", "--dir", "/data"],
                        "env": [_redis_password_env(cluster)],
                        "ports": [{"name": "redis", "containerPort": 6379}],
                        "readinessProbe": {"exec": {"command": ["/bin/sh", "-c", password_check]},
                                           "periodSeconds": 5, "timeoutSeconds": 3},
                        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"},
                                      "limits": {"memory": "1Gi"}},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim_spec}],
        },
    }
    return [service, statefulset]


def _pod_monitor(cluster: ClusterSettings, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{cluster.name}-{component}", "labels": dict(cluster.prometheus_labels)},
        "spec": {
            "jobLabel": "app.kubernetes.io/component",
            "selector": {"matchLabels": _labels(cluster, component)},
            "podMetricsEndpoints": [{
                "port": "metrics",
                "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                                 "targetLabel": "ray_io_cluster"}],
            }],
        },
    }


def _prometheus_rule(cluster: ClusterSettings, alerts_file: Path) -> dict[str, Any]:
    try:
        rules = yaml.safe_load(alerts_file.read_text())
    except OSError as error:
        raise RenderError(f"cannot read the alert rules {alerts_file}: {error.strerror}") from error
    if not isinstance(rules, dict) or not isinstance(rules.get("groups"), list):
        raise RenderError(f"{alerts_file} is not a Prometheus rule file: a top-level `groups` list is missing")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": f"{cluster.name}-alerts", "labels": dict(cluster.prometheus_labels)},
        "spec": {"groups": rules["groups"]},
    }


# ---------------------------------------------------------------------------------------
# Files


def _quantity(value: float) -> str:
    return f"{value:g}"


class _ManifestDumper(yaml.SafeDumper):
    """YAML without anchors and aliases, with multi-line strings as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_ManifestDumper.add_representer(str, _represent_str)


def _to_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_ManifestDumper, sort_keys=False, width=120)


def _dump(header: str, documents: list[dict[str, Any]]) -> str:
    return header + "---\n".join(_to_yaml(document) for document in documents)


def _header(sources: list[str]) -> str:
    return (f"# Generated by `switchyard k8s render` from {', '.join(sources)}.\n"
            "# Edit those files and render again; `switchyard k8s validate` checks the result.\n")


def _kustomization(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


def _overlay_kustomization(cluster: ClusterSettings, overlay: OverlaySettings) -> dict[str, Any]:
    fields: dict[str, Any] = {"namespace": cluster.namespace, "resources": ["../../base", "rayservice.yaml"]}
    secrets = []
    if overlay.dev_redis_password is not None:
        secrets.append({"name": cluster.redis.secret_name,
                        "literals": [f"{REDIS_SECRET_KEY}={overlay.dev_redis_password}"]})
    if overlay.dev_admin_token is not None:
        secrets.append({"name": cluster.admin_secret_name,
                        "literals": [f"{ADMIN_SECRET_KEY}={overlay.dev_admin_token}"]})
    if secrets:
        fields["secretGenerator"] = secrets
        # Fixed names: KubeRay's RayService is a custom resource, so Kustomize would not
        # rewrite hashed Secret names inside it.
        fields["generatorOptions"] = {"disableNameSuffixHash": True}
    if overlay.redis_storage is not None:
        patch = [{"op": "replace", "path": "/spec/volumeClaimTemplates/0/spec/resources/requests/storage",
                  "value": overlay.redis_storage}]
        fields["patches"] = [{"target": {"kind": "StatefulSet", "name": cluster.redis.service_name},
                              "patch": _to_yaml(patch)}]
    return _kustomization(**fields)


def render_manifests(cluster_file: str | Path = DEFAULT_CLUSTER_FILE, config: str | Path | None = None,
                     overlays: list[str] | None = None,
                     alerts_file: str | Path = DEFAULT_ALERTS_FILE) -> list[RenderedFile]:
    """Render the base and the overlays; nothing is written.

    Args:
        cluster_file: cluster topology and the overlays with their settings files.
        config: a settings file that replaces every rendered overlay's own, so the
            manifests run exactly what `switchyard serve --config FILE` runs.
        overlays: names of the overlays to render; None renders all of them.
        alerts_file: Prometheus rule file copied into the PrometheusRule.

    Raises:
        RenderError: an invalid cluster or settings file, an unknown overlay name, or a
            deployment that fits no worker group of its overlay.
    """
    cluster_file = Path(cluster_file)
    cluster = load_cluster_settings(cluster_file)
    selected = list(cluster.overlays) if overlays is None else overlays
    unknown = [name for name in selected if name not in cluster.overlays]
    if unknown:
        raise RenderError(f"unknown overlays {unknown}; the cluster file {cluster_file} defines "
                          f"{sorted(cluster.overlays)}")
    alerts_file = Path(alerts_file)

    base_sources = [cluster_file.name, f"monitoring/prometheus/{alerts_file.name}"]
    files = [
        RenderedFile(Path("base/namespace.yaml"), _dump(_header([cluster_file.name]), [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cluster.namespace}}])),
        RenderedFile(Path("base/redis.yaml"), _dump(_header([cluster_file.name]), _redis_objects(cluster))),
        RenderedFile(Path("base/monitoring.yaml"), _dump(_header(base_sources), [
            _pod_monitor(cluster, "ray-head"), _pod_monitor(cluster, "ray-worker"),
            _prometheus_rule(cluster, alerts_file)])),
        RenderedFile(Path("base/kustomization.yaml"), _dump(_header([cluster_file.name]), [_kustomization(
            namespace=cluster.namespace, resources=["namespace.yaml", "redis.yaml", "monitoring.yaml"])])),
    ]
    for name in selected:
        overlay = cluster.overlays[name]
        settings_file = Path(config) if config is not None else cluster_file.parent / overlay.settings
        try:
            settings = load_settings(settings_file)
        except SettingsError as error:
            raise RenderError(f"overlay {name}: {error}") from None
        sources = [cluster_file.name, settings_file.name]
        rayservice = render_rayservice(cluster, name, overlay, settings)
        files.append(RenderedFile(Path(f"overlays/{name}/rayservice.yaml"), _dump(_header(sources), [rayservice])))
        files.append(RenderedFile(Path(f"overlays/{name}/kustomization.yaml"),
                                  _dump(_header([cluster_file.name]), [_overlay_kustomization(cluster, overlay)])))
    return files


def write_manifests(files: list[RenderedFile], out: str | Path) -> list[Path]:
    """Write rendered files under `out`, creating directories; returns the written paths."""
    out = Path(out)
    written = []
    for rendered in files:
        path = out / rendered.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered.text)
        written.append(path)
    return written
