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

import os

__all__ = ["SERVE_ENV", "apply_serve_env"]

SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def apply_serve_env() -> None:
    """Set `SERVE_ENV` in this process before Ray starts; values already set win."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
