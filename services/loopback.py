"""Keep Ray's local listeners on 127.0.0.1.

A local run sets `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` before Ray starts, which makes
the GCS, raylet and worker servers bind loopback. Ray Serve 2.60 still opens each
replica's inter-deployment gRPC server on `[::]:0` (`ray/serve/_private/replica.py`),
so replicas call `bind_replica_grpc_to_loopback` when `SWITCHYARD_LOOPBACK_ONLY=1`.
In a cluster neither is set, because replicas on other nodes must reach each other.
"""

from __future__ import annotations

import os

__all__ = ["LOOPBACK_ENV", "bind_replica_grpc_to_loopback", "loopback_environment"]

LOOPBACK_ENV = "SWITCHYARD_LOOPBACK_ONLY"


def loopback_environment() -> dict[str, str]:
    """Environment variables a local Ray must start with to listen on loopback only."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", LOOPBACK_ENV: "1"}


def bind_replica_grpc_to_loopback() -> None:
    """Rewrite the replica gRPC bind address `[::]:PORT` to `127.0.0.1:PORT` in this process.

    Must run in the replica's constructor: Serve starts that server right after it.
    Does nothing unless `SWITCHYARD_LOOPBACK_ONLY=1`.
    """
    if os.environ.get(LOOPBACK_ENV) != "1":
        return
    # NOTE: patches a private Ray Serve module; checked against Ray 2.60. If the name
    # moves, replicas fall back to Ray's default bind address.
    try:
        from ray.serve._private import replica as replica_module
    except ImportError:
        return
    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_switchyard_loopback", False):
        return

    def add_port_on_loopback(server, address: str):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port_on_loopback._switchyard_loopback = True
    replica_module.add_port_to_grpc_server = add_port_on_loopback
