"""The benchmark's ceiling: a Serve deployment that reads the body and answers at once.

It runs behind the same proxy, with the same access-log setting, as the real
application, so the ratio of a path's throughput to this one isolates what routing
and the models cost. No torch is imported here.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from services.loopback import bind_replica_grpc_to_loopback

__all__ = ["NoOp"]

_BODY = b'{"ok":true}'


class NoOp:
    def __init__(self) -> None:
        bind_replica_grpc_to_loopback()

    async def __call__(self, request: Request) -> Response:
        await request.body()
        return Response(_BODY, media_type="application/json")
