"""Application builder: one Serve application with the router, E experts and dense.

`build_app(settings)` is used by `switchyard serve`; `app_builder(args)` is the import
path for Serve config files and KubeRay (`import_path: services.app:app_builder`),
taking the same settings as a mapping. The supervisor is a second application
(`build_supervisor_app`, `supervisor_app_builder`) under the route `/v1/supervisor`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray import serve
from ray.serve import Application

from experts.bundle import load_bundle
from services.model_replica import ModelReplica
from services.queue_worker import QueueWorker
from services.router_ingress import RouterIngress
from services.settings import ReplicaSettings, Settings

__all__ = [
    "DENSE_DEPLOYMENT",
    "QUEUE_WORKER_DEPLOYMENT",
    "ROUTER_DEPLOYMENT",
    "app_builder",
    "SUPERVISOR_DEPLOYMENT",
    "build_app",
    "build_supervisor_app",
    "expert_deployment_name",
    "supervisor_app_builder",
    "supervisor_app_name",
]

ROUTER_DEPLOYMENT = "router"
DENSE_DEPLOYMENT = "dense"
SUPERVISOR_DEPLOYMENT = "supervisor"
QUEUE_WORKER_DEPLOYMENT = "queue-worker"
# Serve's per-request access log line costs CPU on the hot path; the router writes
# one canonical line per request instead.
_LOGGING = {"enable_access_log": False}


def expert_deployment_name(expert_id: int) -> str:
    return f"expert-{expert_id}"


def _code_version(*parts: Any) -> str:
    """A deployment version that stays the same while its code inputs do.

    Serve gives each `serve.run` a random version by default, which restarts every
    replica on a redeploy; with a stable version a redeploy that changes only
    `user_config` reconfigures the running replicas in place (Ray 2.60
    `DeploymentVersion.requires_actor_restart`).
    """
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _model_deployment(name: str, bundle_path: str, replica: ReplicaSettings, fault: dict[str, Any] | None = None,
                      model_version: str = ""):
    user_config = {"fault": fault} if fault else {}
    version = _code_version(model_version, name, bundle_path, replica.model_dump(mode="json"))
    deployment = serve.deployment(ModelReplica).options(
        name=name, logging_config=_LOGGING, user_config=user_config, version=version, _internal=True,
        **replica.deployment_options()
    )
    return deployment.bind(bundle_path, name, replica.max_batch_size, replica.batch_wait_timeout_s,
                           replica.torch_threads)


def build_app(settings: Settings, faults: dict[str, dict[str, Any]] | None = None) -> Application:
    """Bind every deployment of the application from validated settings.

    `faults` maps model deployment names (`expert-<i>`, `dense`) to a fault mapping
    (see `services.faults`) delivered through that deployment's `user_config`;
    redeploying with only these changed reconfigures replicas in place.

    Raises:
        BundleError: the bundle is missing or fails verification (checked here, before
            any replica starts).
    """
    bundle = load_bundle(settings.bundle)
    bundle_path = str(settings.bundle.resolve())
    num_experts = len(bundle.manifest["experts"])
    unknown = sorted(set(settings.expert_overrides) - set(range(num_experts)))
    if unknown:
        raise ValueError(f"expert_overrides names experts {unknown}, but the bundle has experts 0..{num_experts - 1}")

    faults = faults or {}
    experts = [
        _model_deployment(expert_deployment_name(i), bundle_path, settings.expert_settings(i),
                          faults.get(expert_deployment_name(i)), bundle.version)
        for i in range(num_experts)
    ]
    dense = _model_deployment(DENSE_DEPLOYMENT, bundle_path, settings.dense, faults.get(DENSE_DEPLOYMENT),
                              bundle.version)
    router_version = _code_version(bundle.version, ROUTER_DEPLOYMENT, settings.model_dump(mode="json"))
    router = serve.deployment(RouterIngress).options(
        name=ROUTER_DEPLOYMENT, logging_config=_LOGGING, version=router_version, _internal=True,
        **settings.router.replica.deployment_options()
    )
    return router.bind(bundle_path, settings.model_dump(mode="json"), experts, dense,
                       queue_worker=_queue_worker_deployment(settings))


def _queue_worker_deployment(settings: Settings):
    """The `queue-worker` deployment bound to the settings, or None when the queue is disabled."""
    if not settings.queue.enabled:
        return None
    queue = settings.queue
    settings_json = settings.model_dump(mode="json")
    deployment = serve.deployment(QueueWorker).options(
        name=QUEUE_WORKER_DEPLOYMENT, logging_config=_LOGGING, num_replicas=queue.num_replicas,
        ray_actor_options={"num_cpus": queue.num_cpus},
        graceful_shutdown_timeout_s=queue.graceful_shutdown_timeout_s,
        version=_code_version(QUEUE_WORKER_DEPLOYMENT, settings_json), _internal=True,
    )
    return deployment.bind(settings_json, ROUTER_DEPLOYMENT)


def supervisor_app_name(settings: Settings) -> str:
    """The supervisor's Serve application: separate, so that rollback works while the router is broken."""
    return f"{settings.app_name}-supervisor"


def build_supervisor_app(settings: Settings, admin_token_sha256: str) -> Application:
    """Bind the supervisor deployment (one replica) with the admin token's sha256, never the token."""
    from services.supervisor_api import SupervisorIngress

    settings_json = settings.model_dump(mode="json")
    deployment = serve.deployment(SupervisorIngress).options(
        name=SUPERVISOR_DEPLOYMENT, logging_config=_LOGGING, num_replicas=1, max_ongoing_requests=32,
        ray_actor_options={"num_cpus": 0.05}, health_check_period_s=5.0,
        version=_code_version(SUPERVISOR_DEPLOYMENT, settings_json, admin_token_sha256), _internal=True,
    )
    return deployment.bind(settings_json, admin_token_sha256)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve application builder: `args` is a settings mapping (as in a config file)."""
    return build_app(Settings.model_validate(args or {}))


def supervisor_app_builder(args: dict[str, Any]) -> Application:
    """Serve application builder of the supervisor; the admin token comes from `SWITCHYARD_ADMIN_TOKEN`.

    Raises:
        ValueError: `SWITCHYARD_ADMIN_TOKEN` is not set, so no one could call the mutating API.
    """
    import os

    from services.supervisor import hash_admin_token

    token = os.environ.get("SWITCHYARD_ADMIN_TOKEN")
    if not token:
        raise ValueError("SWITCHYARD_ADMIN_TOKEN is not set; set it (e.g. from a Kubernetes Secret) so that "
                         "the supervisor API can authorize rollbacks")
    return build_supervisor_app(Settings.model_validate(args or {}), hash_admin_token(token))
