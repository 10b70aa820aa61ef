"""The supervisor against a running `switchyard serve` (its own Ray, Redis and state directory).

The application runs in a subprocess because this process may already run the
session's Ray instance, and its supervisor needs short intervals. Tests share that
server and leave the policy in `moe` without faults.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest

from services.codec import MSGPACK, encode_tensor

pytestmark = pytest.mark.slow

INTERVAL_S = 1.5
SUPERVISOR = {
    "interval_s": INTERVAL_S, "failed_windows": 2, "cooldown_s": 3.0, "step_weight": 0.5, "max_weight": 0.5,
    "step_windows": 2, "min_samples": 10, "min_agreement": 0.9, "max_error_rate": 0.05,
    # The latency limit is loose because CI machines are shared; the drill checks agreement.
    "max_p99_latency_s": 5.0,
    "shadow_fraction": 0.5, "shadow_window_s": 0.1, "flush_interval_s": 0.25, "poll_interval_s": 0.5,
}
QUICK = {"graceful_shutdown_timeout_s": 1.0, "graceful_shutdown_wait_loop_s": 0.2}
SWITCHYARD = [sys.executable, "-m", "services"]


class Server:
    def __init__(self, process: subprocess.Popen, state: Path) -> None:
        self.process = process
        self.state = state
        self.runtime = json.loads((state / "runtime.json").read_text())
        self.url = self.runtime["http_url"]
        self.token = Path(self.runtime["admin_token_file"]).read_text().strip()
        self.env = {**os.environ, "SWITCHYARD_STATE_DIR": str(state)}

    async def cli(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run `switchyard ARGUMENTS` against this server without blocking the event loop."""
        process = await asyncio.create_subprocess_exec(*SWITCHYARD, *arguments, env=self.env,
                                                       stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=180)
        result = subprocess.CompletedProcess(arguments, process.returncode, stdout.decode(), stderr.decode())
        if check and result.returncode != 0:
            raise AssertionError(f"switchyard {' '.join(arguments)} failed: {result.stderr[-2000:]}")
        return result

    def status(self) -> dict:
        response = httpx.get(f"{self.url}/v1/supervisor/status", timeout=10)
        response.raise_for_status()
        return response.json()

    def events(self) -> list[dict]:
        return httpx.get(f"{self.url}/v1/supervisor/events", params={"limit": 1000}, timeout=10).json()["events"]

    def post(self, action: str, token: str | None = None, **body) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(f"{self.url}/v1/supervisor/{action}", json=body, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def server(trained_bundle, tmp_path_factory):
    state = tmp_path_factory.mktemp("supervised-state")
    config = state / "config.json"
    config.write_text(json.dumps({
        "port": 0,
        "router": {"expert_timeout_s": 1.0, "replica": {"num_cpus": 0.1, "max_batch_size": 16,
                                                        "batch_wait_timeout_s": 0.002,
                                                        "max_ongoing_requests": 128, **QUICK}},
        "experts": {"num_cpus": 0.05, "num_replicas": 1, **QUICK},
        "dense": {"num_cpus": 0.1, **QUICK},
        "supervisor": SUPERVISOR,
    }))
    env = {**os.environ, "SWITCHYARD_STATE_DIR": str(state)}
    env.pop("SWITCHYARD_ADMIN_TOKEN", None)
    log = open(state / "serve.log", "w")
    process = subprocess.Popen([*SWITCHYARD, "serve", "--bundle", str(trained_bundle.path), "--config", str(config)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (state / "runtime.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"switchyard serve did not start: {(state / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield Server(process, state)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    # `serve` removes what it wrote for other commands when it stops.
    assert not (state / "runtime.json").exists()
    assert not (state / "admin-token").exists()
    assert not (state / "faults.json").exists()


class Traffic:
    """Closed-loop single-row requests from a few workers, counting every outcome."""

    def __init__(self, url: str, rows: np.ndarray, workers: int = 4, pause_s: float = 0.02) -> None:
        self.url = url
        self.rows = rows
        self.workers = workers
        self.pause_s = pause_s
        self.ok = 0
        self.failed: list[str] = []
        self.paths: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _worker(self, client: httpx.AsyncClient, worker: int) -> None:
        index = worker
        while not self._stop.is_set():
            body = {"inputs": encode_tensor(self.rows[index % len(self.rows)][None]),
                    "request_id": f"traffic-{uuid.uuid4().hex}"}
            index += self.workers
            try:
                response = await client.post(f"{self.url}/v1/predict", content=msgpack.packb(body),
                                             headers={"Content-Type": MSGPACK})
                if response.status_code == 200:
                    self.ok += 1
                    path = msgpack.unpackb(response.content)["route"]["path"]
                    self.paths[path] = self.paths.get(path, 0) + 1
                else:
                    self.failed.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                self.failed.append(repr(error))
            await asyncio.sleep(self.pause_s)

    async def __aenter__(self) -> Traffic:
        self.client = httpx.AsyncClient(timeout=30)
        self._tasks = [asyncio.create_task(self._worker(self.client, worker)) for worker in range(self.workers)]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.client.aclose()


async def wait_for_state(server: Server, state: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = server.status()
        if status["state"] == state:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"state {status['state']!r} instead of {state!r} after {timeout_s} s: {status}")
        await asyncio.sleep(0.2)


def test_status_needs_no_token(server):
    status = server.status()

    assert status["state"] == "moe"
    assert status["interval_s"] == INTERVAL_S
    assert set(status["window"]) >= {"agreement", "error_rate", "p99_latency_s"}
    assert {"value", "threshold", "ok"} <= set(status["window"]["agreement"])


def test_token_file_is_owner_only(server):
    mode = Path(server.runtime["admin_token_file"]).stat().st_mode & 0o777

    assert mode == 0o600


def test_mutation_without_token_is_401(server):
    response = server.post("rollback")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer" in response.json()["error"]["message"]
    assert server.status()["state"] == "moe"


def test_mutation_with_wrong_token_is_403(server):
    response = server.post("rollback", token="not-the-token")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert server.status()["state"] == "moe"


def test_weight_rejects_out_of_range_percent(server):
    response = httpx.put(f"{server.url}/v1/supervisor/weight", json={"moe_percent": 140},
                         headers={"Authorization": f"Bearer {server.token}"}, timeout=10)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "moe_percent"


def test_weight_rejects_unknown_field(server):
    response = httpx.put(f"{server.url}/v1/supervisor/weight", json={"moe_percent": 50, "percent": 50},
                         headers={"Authorization": f"Bearer {server.token}"}, timeout=10)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "percent"
    assert server.status()["moe_percent"] == 100.0


def test_action_body_must_be_json(server):
    response = httpx.post(f"{server.url}/v1/supervisor/resume", content=b"please",
                          headers={"Authorization": f"Bearer {server.token}", "Content-Type": "text/plain"},
                          timeout=10)

    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_token_is_not_logged(server):
    assert server.token not in (server.state / "serve.log").read_text()


async def test_manual_actions_through_cli(server):
    rollback = json.loads((await server.cli("supervisor", "rollback", "--reason", "game day", "--json")).stdout)
    pause = json.loads((await server.cli("supervisor", "pause", "--json")).stdout)
    promote = json.loads((await server.cli("supervisor", "promote", "--json")).stdout)
    resume = json.loads((await server.cli("supervisor", "resume", "--json")).stdout)
    events = server.events()[-4:]

    assert rollback["status"]["state"] == "dense"
    assert pause["status"]["state"] == "paused"
    assert promote["status"]["state"] == "paused"
    assert promote["status"]["moe_percent"] == 100.0
    assert resume["status"]["state"] == "moe"
    assert [event["to"] for event in events] == ["dense", "paused", "paused", "moe"]
    assert all(event["actor"] == "api" for event in events)
    assert events[0]["reason"] == "game day"


async def test_cli_with_wrong_token_is_refused(server):
    result = await server.cli("supervisor", "rollback", "--token", "wrong", check=False)

    assert result.returncode == 1
    assert "403" in result.stderr
    assert server.status()["state"] == "moe"


async def test_noise_drill_rolls_back_and_ramps_back(server, digits):
    async with Traffic(server.url, digits.test.x.astype(np.float32)) as traffic:
        await wait_for_state(server, "moe", timeout_s=5)
        await asyncio.sleep(2 * INTERVAL_S)  # a healthy window first
        # The drill returns seconds after Serve reconfigured the replica, so a watcher
        # records when the replica first reports the fault.
        watcher = await _start_ray_script(server, _WATCH_FAULT_SCRIPT)
        await server.cli("drill", "--expert", "0", "--fault", "noise")
        fault_in_force = await _script_output(watcher)
        await wait_for_state(server, "dense", timeout_s=30)
        rollback = next(event for event in server.events()
                        if event["to"] == "dense" and event["time"] >= fault_in_force)

        clearing = time.time()
        await server.cli("drill", "--clear")
        await wait_for_state(server, "moe", timeout_s=60)

    # The ramp-back may finish before the drill command returns, so count from its start.
    events = [event for event in server.events() if event["time"] >= clearing]
    assert traffic.failed == []
    assert traffic.ok > 100
    assert rollback["actor"] == "automatic"
    assert "agreement" in rollback["reason"]
    assert rollback["time"] - fault_in_force <= 3 * INTERVAL_S, (rollback, fault_in_force)
    assert "canary" in [event["to"] for event in events]
    assert events[-1]["to"] == "moe"


async def test_supervisor_and_shadow_metrics_exported(server):
    wanted = ("ray_switchyard_supervisor_moe_weight_ratio", "ray_switchyard_supervisor_state",
              "ray_switchyard_shadow_agreement_ratio")
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(server.runtime["metrics_url"], timeout=10).text
        if all(name in text for name in wanted):
            break
        await asyncio.sleep(1.0)

    for name in wanted:
        assert name in text


async def test_restarted_supervisor_keeps_state_and_events(server):
    await server.cli("supervisor", "weight", "40", "--reason", "before restart")
    await server.cli("supervisor", "pause")
    before = server.status()
    events_before = server.events()

    killed = await _kill_supervisor_replica(server)
    after = await _wait_for_new_replica_status(server)
    events_after = server.events()
    await server.cli("supervisor", "resume")
    await server.cli("supervisor", "promote")

    assert killed
    assert after["state"] == "paused"
    assert after["moe_percent"] == 40.0
    assert after["policy_version"] == before["policy_version"]
    assert events_after == events_before


def test_feedback_scores_stored_prediction(server, digits):
    request_id = f"feedback-{uuid.uuid4().hex}"
    row = digits.test.x[:1].astype(np.float32)
    answer = httpx.post(f"{server.url}/v1/predict", json={"inputs": row.tolist(), "request_id": request_id},
                        timeout=30).json()
    time.sleep(0.5)  # two flush intervals: the prediction reaches Redis

    first = httpx.post(f"{server.url}/v1/feedback", json={"request_id": request_id,
                                                           "label": int(digits.test.y[0])}, timeout=10)
    repeated = httpx.post(f"{server.url}/v1/feedback", json={"request_id": request_id, "label": 0}, timeout=10)

    assert first.status_code == 200
    assert first.json()["rows"] == 1
    assert first.json()["correct"] == int(answer["predictions"][0] == digits.test.y[0])
    assert repeated.status_code == 404
    assert repeated.json()["error"]["field"] == "request_id"


def test_feedback_rejects_invalid_label(server):
    response = httpx.post(f"{server.url}/v1/feedback", json={"request_id": "any", "label": 99}, timeout=10)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "label"
    assert "from 0 to 9" in response.json()["error"]["message"]


def test_feedback_rejects_malformed_body(server):
    response = httpx.post(f"{server.url}/v1/feedback", content=b"{not json", timeout=10,
                          headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_body"


async def test_readyz_recovers_when_redis_returns(server, monkeypatch):
    from redis import Redis

    from services.redis_setup import EmbeddedRedis

    port = int(server.runtime["redis_url"].rsplit(":", 1)[1].split("/")[0])
    Redis(host="127.0.0.1", port=port).shutdown(nosave=True)
    down = await _wait_for_readyz(server, 503)

    monkeypatch.setattr("services.redis_setup._free_port", lambda: port)
    with EmbeddedRedis() as replacement:
        up = await _wait_for_readyz(server, 200)
        status = server.status()

    assert replacement.port == port
    assert down["redis"] != "ok"
    assert up["redis"] == "ok"
    assert status["state"] == "moe"


async def _wait_for_readyz(server: Server, status_code: int, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{server.url}/readyz", timeout=10)
        if response.status_code == status_code:
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz answered {response.status_code}, not {status_code}: {response.text}")
        await asyncio.sleep(0.3)


_KILL_SCRIPT = """
import json, os, ray
ray.init(address=os.environ["RAY_ADDRESS_FOR_TEST"], namespace="switchyard", log_to_driver=False,
         _node_ip_address="127.0.0.1")
names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
         if actor["name"].startswith("SERVE_REPLICA::switchyard-supervisor#")]
for name in names:
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
print(json.dumps(names))
"""


_WATCH_FAULT_SCRIPT = """
import asyncio, json, os, time, ray
from ray import serve
ray.init(address=os.environ["RAY_ADDRESS_FOR_TEST"], namespace="switchyard", log_to_driver=False,
         _node_ip_address="127.0.0.1")

async def watch():
    # Awaited inside a loop: with Serve's router on the caller's loop, handles need one.
    handle = serve.get_deployment_handle("expert-0", app_name="switchyard")
    deadline = time.time() + 120
    while time.time() < deadline and (await handle.ping.remote())["fault"] != "noise":
        await asyncio.sleep(0.05)
    return time.time()

print(json.dumps(asyncio.run(watch())))
"""


async def _start_ray_script(server: Server, script: str):
    """Run `script` as a separate Ray driver of the server's Ray instance."""
    env = {**server.env, "RAY_ADDRESS_FOR_TEST": server.runtime["ray_address"],
           "RAY_AUTH_MODE": server.runtime["ray_auth_mode"] or "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return await asyncio.create_subprocess_exec(sys.executable, "-c", script, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _script_output(process):
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode == 0, stderr.decode()[-2000:]
    return json.loads(stdout.decode().strip().splitlines()[-1])


async def _kill_supervisor_replica(server: Server) -> list[str]:
    return await _script_output(await _start_ray_script(server, _KILL_SCRIPT))


async def _wait_for_new_replica_status(server: Server, timeout_s: float = 120) -> dict:
    """Wait until the supervisor answers again (Serve replaces the killed replica)."""
    deadline = time.monotonic() + timeout_s
    await asyncio.sleep(1.0)
    while True:
        try:
            return server.status()
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
