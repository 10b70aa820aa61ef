"""Local lifecycle: Ray on loopback, Serve's HTTP proxy, the application, `runtime.json`.

`LocalServe` is what `switchyard serve`, `demo`, `bench` and the integration tests use.
It starts a private Ray instance whose listeners stay on 127.0.0.1, deploys the
application and waits for `/readyz`; leaving the context shuts Serve and Ray down.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from services.loopback import loopback_environment
from services.ray_env import serve_env_for_ray_start
from services.settings import Settings

__all__ = ["LocalServe", "ServeStartError", "check_port_free", "find_free_port", "read_runtime", "running_server",
           "state_dir"]

RUNTIME_FILE = "runtime.json"
SETTINGS_FILE = "settings.json"
ADMIN_TOKEN_FILE = "admin-token"
FAULTS_FILE = "faults.json"  # faults that `switchyard drill` put in force
ADMIN_TOKEN_ENV = "SWITCHYARD_ADMIN_TOKEN"


class ServeStartError(RuntimeError):
    """The application did not become ready."""


def state_dir() -> Path:
    """Directory for runtime.json, bundles and the admin token (`SWITCHYARD_STATE_DIR`)."""
    return Path(os.environ.get("SWITCHYARD_STATE_DIR", ".switchyard"))


def read_runtime() -> dict[str, Any] | None:
    """The running server's runtime.json, or None when no server wrote one."""
    path = state_dir() / RUNTIME_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def running_server() -> dict[str, Any] | None:
    """runtime.json of a `switchyard serve` that is still alive in this state directory, else None."""
    runtime = read_runtime()
    if not runtime or not isinstance(runtime.get("pid"), int):
        return None
    try:
        os.kill(runtime["pid"], 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # Alive, owned by another user.
    return runtime


def check_port_free(host: str, port: int) -> None:
    """Raise ServeStartError when `host:port` cannot be bound (another server listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServeStartError(f"cannot listen on {host}:{port}: {error.strerror}; "
                                  "stop the process using it or pass --port") from None


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class LocalServe:
    """Runs the application on a private local Ray instance.

    Args:
        settings: validated settings; port 0 picks a free port.
        metrics_port: Ray's Prometheus export port; None picks a free one.
        num_cpus: CPUs Ray may hand out; None uses the machine's count.
        ready_timeout_s: how long to wait for `/readyz` before giving up.
        log_to_driver: stream replica logs to this process's stderr.
        admin_token: bearer token of the supervisor API; None takes `SWITCHYARD_ADMIN_TOKEN`,
            else generates one, which `write_runtime` stores owner-only in `admin-token`.
    """

    def __init__(self, settings: Settings, metrics_port: int | None = None, num_cpus: float | None = None,
                 ready_timeout_s: float = 180.0, log_to_driver: bool = True, admin_token: str | None = None) -> None:
        if settings.port == 0:
            settings = settings.model_copy(update={"port": find_free_port(settings.host)})
        self.settings = settings
        self.embedded_redis = None
        self.metrics_port = metrics_port or find_free_port()
        self.num_cpus = num_cpus
        self.ready_timeout_s = ready_timeout_s
        self.log_to_driver = log_to_driver
        # The supervisor API's bearer token: given, from the environment, or generated for this run.
        self.admin_token_generated = not (admin_token or os.environ.get(ADMIN_TOKEN_ENV))
        self.admin_token = admin_token or os.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(32)

    @property
    def http_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def redis_url(self) -> str | None:
        return self.settings.redis.url

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def __enter__(self) -> LocalServe:
        # Must be set before Ray starts: the raylet and every worker inherit it.
        os.environ.update(loopback_environment())
        import ray
        from ray import serve

        from services.app import build_app, build_supervisor_app, supervisor_app_name
        from services.redis_setup import EmbeddedRedis
        from services.supervisor import hash_admin_token
        from services.supervisor_api import ROUTE_PREFIX

        application = build_app(self.settings)  # verifies the bundle before Ray starts
        if self.settings.redis.url is None:
            self.embedded_redis = EmbeddedRedis().start()
            redis = self.settings.redis.model_copy(update={"url": self.embedded_redis.url})
            self.settings = self.settings.model_copy(update={"redis": redis})
            application = build_app(self.settings)
        with serve_env_for_ray_start():
            ray.init(
                num_cpus=self.num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                _metrics_export_port=self.metrics_port,
                log_to_driver=self.log_to_driver,
                namespace="switchyard",
            )
        try:
            serve.start(http_options={"host": self.settings.host, "port": self.settings.port},
                        logging_config={"enable_access_log": False})
            serve.run(application, name=self.settings.app_name, route_prefix="/", blocking=False)
            serve.run(build_supervisor_app(self.settings, hash_admin_token(self.admin_token)),
                      name=supervisor_app_name(self.settings), route_prefix=ROUTE_PREFIX, blocking=False)
            self._wait_ready()
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._shutdown()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{self.http_url}/readyz", timeout=5.0)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(0.5)
        raise ServeStartError(f"application not ready after {self.ready_timeout_s:.0f} s; last /readyz: {last}")

    def _shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            if self.embedded_redis is not None:
                self.embedded_redis.stop()
                self.embedded_redis = None

    def write_runtime(self, extra: dict[str, Any] | None = None) -> Path:
        """Write runtime.json (owner-only) so that other commands find this server."""
        directory = state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / RUNTIME_FILE
        import ray

        data = {"http_url": self.http_url, "metrics_url": self.metrics_url, "redis_url": self.redis_url,
                "pid": os.getpid(), "admin_token_file": self._write_admin_token(directory),
                "settings_file": str(_write_private(directory / SETTINGS_FILE,
                                                    self.settings.model_dump_json(indent=2) + "\n").resolve()),
                "ray_address": ray.get_runtime_context().gcs_address if ray.is_initialized() else None,
                # ray.init of a new local cluster sets RAY_AUTH_MODE=token (Ray 2.60); drivers that
                # join by address must set the same mode to send the token.
                "ray_auth_mode": os.environ.get("RAY_AUTH_MODE"),
                "app_name": self.settings.app_name, **(extra or {})}
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
        return path

    def _write_admin_token(self, directory: Path) -> str | None:
        """Write a generated admin token owner-only and return its path; None for a given token."""
        if not self.admin_token_generated:
            return None
        return str(_write_private(directory / ADMIN_TOKEN_FILE, self.admin_token + "\n").resolve())

    @staticmethod
    def remove_runtime() -> None:
        """Remove runtime.json and the files written with it (settings, admin token, drill faults).

        Does nothing when runtime.json belongs to another process, so that a server that
        failed to start never removes the files of the one that is running.
        """
        runtime = read_runtime()
        if runtime is not None and runtime.get("pid") not in (None, os.getpid()):
            return
        for name in (RUNTIME_FILE, SETTINGS_FILE, ADMIN_TOKEN_FILE, FAULTS_FILE):
            try:
                (state_dir() / name).unlink()
            except FileNotFoundError:
                pass


def _write_private(path: Path, text: str) -> Path:
    """Write `text` to a file readable by its owner only (created 0600, never wider)."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return path
