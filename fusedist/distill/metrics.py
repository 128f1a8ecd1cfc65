"""Per-step metrics of a distill run: averaged over ranks, logged to MLflow by rank 0.

The driver opens the MLflow run (params, tags, config, export); rank 0 of the workers logs the
step metrics into that same run by id, so the numbers arrive while training runs.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
import torch.distributed as dist

from fusedist.tracking import Tracker


def worker_tracker(mlflow: Mapping[str, Any] | None, rank: int):
    """A tracker on the driver's run for rank 0; a no-op one elsewhere or when disabled."""
    if rank != 0 or not mlflow or not mlflow.get("run_id"):
        return Tracker.noop(rank)
    from mlflow import MlflowClient

    uri = mlflow["tracking_uri"]
    return Tracker(MlflowClient(tracking_uri=uri), mlflow["run_id"], uri, rank)


def system_monitor(mlflow: Mapping[str, Any] | None, rank: int, local_rank: int,
                   node_rank: int):
    """A tracker sampling MLflow system metrics on this worker's node, or ``None``.

    One sampler per node (its local rank 0): node 0's as ``system/...`` (the names a one-node
    run and every other stage use), other nodes' as ``system/node<k>/...``, and only when the
    run is on a tracking server (a SQLite file on node 0 is not reachable from the others).
    The step metrics stay rank 0's alone."""
    sm = (mlflow or {}).get("system_metrics")
    if not sm or not mlflow.get("run_id") or local_rank != 0:
        return None
    uri = mlflow["tracking_uri"]
    if node_rank != 0 and not str(uri).startswith(("http://", "https://")):
        return None
    from mlflow import MlflowClient

    tracker = Tracker(MlflowClient(tracking_uri=uri), mlflow["run_id"], uri, rank)
    tracker.start_system_metrics(float(sm["interval"]),
                                 node_id=None if node_rank == 0 else f"node{node_rank}")
    return tracker


class StepLogger:
    """Every ``every`` steps: mean loss/cosines over steps and ranks, lr, img/s, GPU memory.

    The MLflow call runs on a background thread: a step of a ViT-B on an H100 takes ~35 ms,
    a synchronous HTTP request would add a good part of that to every logged step.
    """

    KEYS = ("loss", "global_cos", "local_cos")

    def __init__(self, tracker: Any, every: int, global_batch: int, device: torch.device):
        from concurrent.futures import ThreadPoolExecutor

        self.tracker, self.every, self.global_batch = tracker, every, global_batch
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-log")
        self._pending: list[Any] = []
        self._sum = torch.zeros(len(self.KEYS), device=device)
        self._n = 0
        self._t0 = time.perf_counter()
        self.last: dict[str, float] = {}

    def step(self, step: int, out: Mapping[str, torch.Tensor], lr: float, epoch: int) -> None:
        # Summed on the device: no host sync except on logging steps.
        self._sum += torch.stack([out[k].detach().float() for k in self.KEYS])
        self._n += 1
        if step % self.every:
            return
        total = self._sum.clone()
        if dist.is_initialized():
            dist.all_reduce(total)  # every rank logs on the same steps: a matched collective
            total /= dist.get_world_size()
        values = (total / self._n).tolist()
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        metrics = dict(zip(self.KEYS, values))
        metrics.update(lr=lr, epoch=epoch, img_per_s=self._n * self.global_batch / elapsed)
        if self.device.type == "cuda":
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.tracker.active:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._pool.submit(self.tracker.log_metrics, metrics, step))
        self.last = metrics
        self._sum.zero_()
        self._n = 0
        self._t0 = time.perf_counter()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue other metrics (validation) behind the step metrics, on the same thread."""
        if self.tracker.active:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._pool.submit(self.tracker.log_metrics, dict(metrics), step))

    def close(self) -> None:
        """Wait for the queued MLflow calls (their errors surface here)."""
        self._pool.shutdown(wait=True)
        for f in self._pending:
            f.result()
