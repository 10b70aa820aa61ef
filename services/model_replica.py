"""Ray Serve deployment that runs one model of the bundle: an expert or the dense model.

Each replica loads its module's weights from the verified bundle, runs on CUDA when
Ray gave it a GPU and on the CPU otherwise, and merges concurrent calls into one
forward pass with `@serve.batch`. Inputs and outputs are numpy arrays, which Ray
serialises without copying; outputs are class probabilities (float32, [N, C]).

Every call carries the ids of the requests whose rows it contains. Each forward pass
records its rows and duration in the `switchyard_model_*` histograms and logs one
debug line `forward_pass` with those ids. A failed pass logs a rate-limited warning.

Game-day faults arrive through `user_config` (see `services.faults`), so an operator
can make one expert fail, slow down or return noisy answers without a redeploy.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np
from ray import serve

from services.faults import Fault, add_noise, parse_fault
from services.loopback import bind_replica_grpc_to_loopback

__all__ = ["ModelReplica"]


class ModelReplica:
    """One MLP behind a batched `__call__(x: np.ndarray [N, D]) -> np.ndarray [N, C]`."""

    def __init__(self, bundle_path: str, module: str, max_batch_size: int, batch_wait_timeout_s: float,
                 torch_threads: int = 1) -> None:
        bind_replica_grpc_to_loopback()
        import torch

        from experts.bundle import load_bundle
        from experts.models import MLP, MLPSpec
        from monitoring.logging import RateLimitedWarning, get_logger
        from monitoring.metrics import model_metrics

        torch.set_num_threads(torch_threads)
        self._torch = torch
        self.module = module
        self.log = get_logger("model_replica", deployment=module)
        self.metrics = model_metrics(module)
        self._failure_warning = RateLimitedWarning(interval_s=30.0)
        bundle = load_bundle(bundle_path)
        manifest = bundle.manifest
        if module == "dense":
            spec = manifest["dense"]
        else:
            spec = manifest["experts"][int(module.split("-", 1)[1])]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = MLP(MLPSpec.from_dict(spec))
        self.model.load_state_dict(bundle.load_state_dict(module))
        self.model.to(self.device).eval()
        self.flops = self.model.flops
        self.fault: Fault | None = None
        self._rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
        self.__call__.set_max_batch_size(max_batch_size)
        self.__call__.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.log.info("replica_started", device=str(self.device), flops=self.flops,
                      model_version=bundle.version)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply `{"fault": {...}}` from the deployment's user_config; an empty dict clears it."""
        fault = parse_fault((user_config or {}).get("fault"))
        if fault != self.fault:
            self.log.warning("fault_changed", fault=None if fault is None else fault.to_dict())
        self.fault = fault

    def _active_fault(self) -> Fault | None:
        if self.fault is not None and self.fault.is_active(time.time()):
            return self.fault
        return None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def __call__(self, batches: list[np.ndarray], request_ids: list[list[str]]) -> list[np.ndarray]:
        """Run one forward pass over the merged calls; `request_ids[i]` lists call i's request ids, for logs."""
        try:
            return await self._forward(batches, request_ids)
        except Exception as error:
            ids = [request_id for call_ids in request_ids for request_id in call_ids]
            self._failure_warning.warn(self.log, "forward_failed", error=repr(error), request_ids=ids)
            raise

    async def _forward(self, batches: list[np.ndarray], request_ids: list[list[str]]) -> list[np.ndarray]:
        fault = self._active_fault()
        if fault is not None and fault.kind == "error":
            raise RuntimeError(f"injected fault on {self.module}: error")
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.latency_s)

        sizes = [len(batch) for batch in batches]
        x = np.concatenate(batches) if len(batches) > 1 else batches[0]
        started = time.perf_counter()
        probs = self.predict(x)
        duration_s = time.perf_counter() - started
        self.metrics.batch_size.observe(len(x))
        self.metrics.inference_duration.observe(duration_s)
        self.log.debug("forward_pass", rows=len(x), calls=len(batches), duration_s=round(duration_s, 6),
                       request_ids=[request_id for call_ids in request_ids for request_id in call_ids])
        if fault is not None and fault.kind == "noise":
            probs = add_noise(probs, fault.noise_scale, self._rng)
        return np.split(probs, np.cumsum(sizes)[:-1])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities for rows x [N, D]."""
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(x).to(self.device))
            return torch.softmax(logits, dim=-1).cpu().numpy()

    def ping(self) -> dict[str, Any]:
        fault = self._active_fault()
        return {"module": self.module, "device": str(self.device), "fault": fault.kind if fault else None}
