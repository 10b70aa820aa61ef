"""Ray Serve deployment `queue-worker`: each replica runs one `QueueConsumer` in the background.

The consumer starts in the constructor as an asyncio task on the replica's event loop and
routes every stream entry through the router deployment's `predict_document`, so queue
requests are validated and routed exactly like HTTP requests. Scale it like any other
deployment (`queue.num_replicas`); each replica is its own consumer in the group.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from services.loopback import bind_replica_grpc_to_loopback

__all__ = ["QueueWorker"]


class QueueWorker:
    """Background consumer of the requests stream. Callers use only `ping` and the health check."""

    async def __init__(self, settings: dict[str, Any], router_deployment: str) -> None:
        bind_replica_grpc_to_loopback()
        from monitoring.logging import get_logger
        from monitoring.metrics import queue_metrics
        from services.queue import QueueStreams
        from services.queue_consumer import QueueConsumer
        from services.redis_setup import create_async_client
        from services.settings import Settings

        full_settings = Settings.model_validate(settings)
        if full_settings.redis.url is None:
            raise ValueError("the queue worker needs redis.url; pass --redis-url or let `switchyard serve` "
                             "start the embedded Redis")
        self.settings = full_settings.queue
        self.block_ms = full_settings.redis.block_ms
        self.client = create_async_client(full_settings.redis)
        self.router = serve.get_deployment_handle(router_deployment, app_name=full_settings.app_name)
        # NOTE: each replica joins the group under its own id. Nothing removes the consumers
        # of stopped replicas, so they stay in XINFO CONSUMERS once their entries are reclaimed.
        consumer_name = serve.get_replica_context().replica_id.unique_id
        self.log = get_logger("queue_worker", consumer=consumer_name)
        self.consumer = QueueConsumer(
            client=self.client,
            streams=QueueStreams.from_prefix(full_settings.redis.key_prefix),
            route=self._route,
            consumer_name=consumer_name,
            config=self.settings,
            block_ms=self.block_ms,
            max_body_bytes=full_settings.router.max_body_bytes,
            metrics=queue_metrics(),
        )
        self.task = asyncio.get_running_loop().create_task(self.consumer.run())

    async def _route(self, document: dict[str, Any]) -> dict[str, Any]:
        return await self.router.predict_document.remote(document)

    def ping(self) -> dict[str, Any]:
        return {"consumer": self.consumer.name, "running": not self.task.done()}

    def check_health(self) -> None:
        """Fail the health check when the consumer task ended, so Serve replaces the replica."""
        if self.task.done():
            error = None if self.task.cancelled() else self.task.exception()
            raise RuntimeError(f"queue consumer {self.consumer.name} stopped: {error!r}")

    async def __del__(self) -> None:
        """Stop after the current batch. A batch cut short stays pending and is reclaimed."""
        self.consumer.stop()
        try:
            await asyncio.wait_for(asyncio.shield(self.task),
                                   self.block_ms / 1000.0 + self.settings.graceful_shutdown_timeout_s)
        except asyncio.TimeoutError:
            self.task.cancel()
            self.log.warning("consumer_cancelled", reason="batch did not finish within the shutdown timeout")
        except Exception as error:  # noqa: BLE001 - shutdown must not raise
            self.log.warning("consumer_failed", error=repr(error))
        finally:
            await self.client.aclose()
