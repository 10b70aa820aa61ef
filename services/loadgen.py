"""Closed-loop HTTP/1.1 load generator for benchmarks, light enough to share 2 cores with the server.

Each of `concurrency` connections sends a pre-encoded request, reads the whole
response, and sends the next one at once (closed loop). Only the status line and
`Content-Length` are parsed, so the client spends a few tens of microseconds per
request, where a general-purpose client spends far more and would cap the measured
throughput on a small machine. Targets must be loopback addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

__all__ = ["LoadResult", "build_post", "merge_results", "run_closed_loop"]


@dataclass(frozen=True)
class LoadResult:
    """Throughput and latency of one closed-loop run."""

    concurrency: int
    duration_s: float
    completed: int
    errors: int
    latencies_s: np.ndarray

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not len(self.latencies_s):
            return 0.0
        return float(np.percentile(self.latencies_s, q) * 1000.0)

    def to_dict(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "completed": self.completed,
            "errors": self.errors,
            "rps": round(self.requests_per_s, 1),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
        }


def merge_results(results: Sequence[LoadResult]) -> LoadResult:
    """Pool several runs at one concurrency: total requests over total measured time.

    Raises:
        ValueError: `results` is empty or mixes concurrency levels.
    """
    if not results:
        raise ValueError("merge_results needs at least one result")
    levels = {result.concurrency for result in results}
    if len(levels) != 1:
        raise ValueError(f"cannot merge runs at different concurrency levels: {sorted(levels)}")
    return LoadResult(
        concurrency=results[0].concurrency,
        duration_s=sum(result.duration_s for result in results),
        completed=sum(result.completed for result in results),
        errors=sum(result.errors for result in results),
        latencies_s=np.concatenate([result.latencies_s for result in results]),
    )


def _check_loopback(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"load target {host!r} is not a loopback address; use 127.0.0.1") from None
        return
    if not address.is_loopback:
        raise ValueError(f"load target {host!r} is not a loopback address; use 127.0.0.1")


def build_post(url: str, bodies: Sequence[bytes], content_type: str) -> tuple[str, int, list[bytes]]:
    """Pre-encode one HTTP/1.1 keep-alive POST per body; returns (host, port, requests)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    _check_loopback(host)
    path = parts.path or "/"
    requests = [
        (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
         f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body
        for body in bodies
    ]
    return host, port, requests


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:].strip())
            break
    else:
        # Chunked bodies are not expected from Serve for small payloads; read to the terminator.
        if b"transfer-encoding: chunked" in head.lower():
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.strip(), 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
            return status
    if length:
        await reader.readexactly(length)
    return status


async def _connection_loop(host: str, port: int, requests: list[bytes], start_index: int, deadline: float,
                           latencies: list[float], counters: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    index = start_index
    try:
        while time.perf_counter() < deadline:
            request = requests[index % len(requests)]
            index += 1
            started = time.perf_counter()
            writer.write(request)
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - started)
            if status == 200:
                counters[0] += 1
            else:
                counters[1] += 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def _run(host: str, port: int, requests: list[bytes], concurrency: int, duration_s: float,
               warmup_s: float) -> LoadResult:
    if warmup_s > 0:
        await asyncio.gather(*(
            _connection_loop(host, port, requests, i, time.perf_counter() + warmup_s, [], [0, 0])
            for i in range(concurrency)
        ))
    latencies: list[float] = []
    counters = [0, 0]  # completed with 200, other statuses
    started = time.perf_counter()
    deadline = started + duration_s
    await asyncio.gather(*(
        _connection_loop(host, port, requests, i * 7919, deadline, latencies, counters) for i in range(concurrency)
    ))
    elapsed = time.perf_counter() - started
    return LoadResult(concurrency=concurrency, duration_s=elapsed, completed=counters[0], errors=counters[1],
                      latencies_s=np.asarray(latencies))


def run_closed_loop(url: str, bodies: Sequence[bytes], content_type: str, concurrency: int, duration_s: float,
                    warmup_s: float = 1.0) -> LoadResult:
    """Drive `url` with `concurrency` keep-alive connections for `duration_s` after a warm-up.

    Raises:
        ValueError: the URL's host is not a loopback address.
    """
    host, port, requests = build_post(url, bodies, content_type)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_run(host, port, requests, concurrency, duration_s, warmup_s))
