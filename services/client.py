"""Python client for `/v1/predict`: msgpack requests, several in flight at once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack
import numpy as np

from services.codec import MSGPACK, decode_tensor, encode_tensor

__all__ = ["PredictResult", "predict_many"]


@dataclass
class PredictResult:
    """One request's outcome: the decoded response or the error, and its latency."""

    index: int
    status: int
    latency_s: float
    body: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body is not None


async def predict_many(
    url: str,
    rows: np.ndarray,
    concurrency: int = 8,
    path: str = "auto",
    request_id_prefix: str = "req",
    timeout_s: float = 30.0,
) -> list[PredictResult]:
    """Send each row of `rows` as its own msgpack request to `url`/v1/predict.

    Requests are closed-loop: `concurrency` workers each send the next row as soon as
    their previous answer arrives. Results come back in row order.
    """
    results: list[PredictResult | None] = [None] * len(rows)
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(rows):
            index = next_index
            next_index += 1
            body = {"inputs": encode_tensor(rows[index : index + 1]), "request_id": f"{request_id_prefix}-{index}"}
            if path != "auto":
                body["path"] = path
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/predict", content=msgpack.packb(body, use_bin_type=True),
                                             headers={"Content-Type": MSGPACK})
                latency = time.perf_counter() - started
                decoded = msgpack.unpackb(response.content, raw=False)
                if response.status_code == 200:
                    decoded["outputs"] = decode_tensor(decoded["outputs"], "outputs")
                    results[index] = PredictResult(index, 200, latency, body=decoded)
                else:
                    results[index] = PredictResult(index, response.status_code, latency, error=str(decoded))
            except (httpx.HTTPError, ValueError, msgpack.UnpackException) as error:
                results[index] = PredictResult(index, 0, time.perf_counter() - started, error=repr(error))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return [result for result in results if result is not None]
