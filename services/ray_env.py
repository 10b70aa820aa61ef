"""Ray Serve environment settings that every Switchyard process starts with.

Ray Serve 2.60 runs user code in a second event loop thread and deployment-handle
routing in a third one by default (`RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD`,
`RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP` in `ray/serve/_private/constants.py`). Each
request and each handle call then crosses threads several times. The router makes
one handle call per expert per batch, so on a small machine those crossings cost more
than the routing itself; running both on the replica's main loop removes them. The
code run on that loop (gate scoring, numpy) takes well under a millisecond per batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["SERVE_ENV", "serve_env_for_ray_start"]

SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


@contextlib.contextmanager
def serve_env_for_ray_start() -> Iterator[None]:
    """Set `SERVE_ENV` while Ray starts, so that the raylet and its workers inherit it.

    The variables are removed from this process afterwards: a driver that calls a
    deployment handle outside an event loop (a script, a test) needs Serve's default
    separate router loop. Values already set in the environment win.
    """
    added = [name for name in SERVE_ENV if name not in os.environ]
    for name in added:
        os.environ[name] = SERVE_ENV[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
