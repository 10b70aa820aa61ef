"""The benchmark's closed-loop client against a real HTTP server on 127.0.0.1."""

import asyncio
import threading

import numpy as np
import pytest

from services.loadgen import LoadResult, build_post, merge_results, run_closed_loop


class CountingServer:
    """Minimal HTTP/1.1 keep-alive server in a thread: 200 for /ok, 503 for anything else."""

    def __init__(self):
        self.requests = 0
        self.bodies = set()
        self.port = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.bodies.add(await reader.readexactly(length))
                self.requests += 1
                status = b"200 OK" if head.startswith(b"POST /ok ") else b"503 Service Unavailable"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    def _run(self):
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def __enter__(self):
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def test_closed_loop_counts_every_answered_request():
    bodies = [b"a", b"bb", b"ccc"]
    with CountingServer() as server:
        result = run_closed_loop(f"http://127.0.0.1:{server.port}/ok", bodies, "application/msgpack",
                                 concurrency=4, duration_s=0.3, warmup_s=0.1)
        total_seen = server.requests

    assert result.completed > 0
    assert result.errors == 0
    assert len(result.latencies_s) == result.completed
    # The warm-up's requests reach the server but are not counted.
    assert total_seen > result.completed
    assert server.bodies == set(bodies)
    assert result.requests_per_s == pytest.approx(result.completed / result.duration_s)


def test_closed_loop_counts_non_200_answers_as_errors():
    with CountingServer() as server:
        result = run_closed_loop(f"http://127.0.0.1:{server.port}/busy", [b"x"], "application/json",
                                 concurrency=2, duration_s=0.2, warmup_s=0.0)

    assert result.completed == 0
    assert result.errors > 0


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000/v1/predict", "http://example.com/v1/predict"])
def test_load_targets_must_be_loopback(url):
    with pytest.raises(ValueError, match="not a loopback address"):
        build_post(url, [b"x"], "application/json")


def test_build_post_sets_content_length_of_each_body():
    host, port, requests = build_post("http://127.0.0.1:8123/v1/predict", [b"12345"], "application/msgpack")

    assert (host, port) == ("127.0.0.1", 8123)
    assert requests[0].startswith(b"POST /v1/predict HTTP/1.1\r\n")
    assert b"Content-Length: 5\r\n" in requests[0]
    assert requests[0].endswith(b"\r\n\r\n12345")


def result(completed, duration_s, concurrency=16, errors=0):
    return LoadResult(concurrency=concurrency, duration_s=duration_s, completed=completed, errors=errors,
                      latencies_s=np.full(completed, 0.01))


def test_merged_rounds_give_total_requests_over_total_time():
    merged = merge_results([result(100, 1.0), result(300, 2.0, errors=2)])

    assert merged.completed == 400
    assert merged.errors == 2
    assert merged.duration_s == pytest.approx(3.0)
    assert merged.requests_per_s == pytest.approx(400 / 3.0)
    assert len(merged.latencies_s) == 400


def test_merge_rejects_empty_and_mixed_levels():
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])
    with pytest.raises(ValueError, match="different concurrency levels"):
        merge_results([result(10, 1.0, concurrency=1), result(10, 1.0, concurrency=16)])
