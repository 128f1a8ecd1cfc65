"""Which engine a stage runs, and the call that runs it: :func:`plan_engine` decides Ray
Data (:mod:`.raydata`) or this process (:mod:`.local`) by ``engine.executor``, and the device
(:func:`~.core.choose_device`), logging both; :func:`execute` runs that plan;
:func:`shard_progress` is the stage's progress bar.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

from fusedist.config import RayConfig
from fusedist.execution.local import local_cpus
from fusedist.execution.progress import Rate
from fusedist.execution.rayrun import init_ray
from fusedist.execution.tasks import local_reason
from fusedist.features.config import EngineConfig
from fusedist.features.engine.core import PoolSpec, choose_device
from fusedist.features.engine.raydata import engine_pool, run_engine

log = logging.getLogger("fusedist.features")


@dataclass(frozen=True)
class EnginePlan:
    """How a stage's engine runs: on Ray (``pool``) or in this process (``local``)."""

    local: bool
    device: str
    threads: int  # torch threads of the encoders
    pool: PoolSpec | None = None  # Ray
    decode_workers: int = 1  # local


def plan_engine(cfg: EngineConfig, ray_cfg: RayConfig) -> EnginePlan:
    """``engine.executor`` decided: Ray (started or joined here) or this process; the device,
    and why, is logged either way."""
    why = local_reason(cfg.executor, ray_cfg, "engine.executor")
    if why is None:
        init_ray(ray_cfg)
        device, pool, threads = engine_pool(cfg, ray_cfg)
        return EnginePlan(False, device, threads, pool=pool)
    device = choose_device(cfg.device, "local", _cuda_gpus())
    cores = local_cpus(ray_cfg.num_cpus)
    threads = max(1, round(cfg.cpus_per_actor)) if cfg.cpus_per_actor else cores
    workers = cfg.decode_workers or (1 if device == "cpu" else min(8, max(1, cores - 1)))
    log.info("engine: local, without Ray (%s): encoders in this process on %s, %d torch "
             "threads; %d DataLoader worker(s) decode", why, device, threads, workers)
    return EnginePlan(True, device, threads, decode_workers=workers)


def _cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def execute(plan: EnginePlan, spec, shards: list[tuple], groups: dict, finish, on_group,
            encoders: list):
    """Run the engine ``plan`` chose (``run_engine``'s arguments; ``encoders``: the built
    encoders of ``spec``, which the local engine computes with)."""
    if plan.local:
        # lazy: keeps torch out of the stage's start-up (Ray's driver never imports it)
        from fusedist.features.engine.local import run_engine_local

        return run_engine_local(spec, shards, groups, finish, on_group, encoders,
                                plan.decode_workers)
    return run_engine(spec, shards, groups, finish, on_group, plan.pool)


class _Bar:
    def __init__(self, bar):
        self.bar, self.rate = bar, Rate("tiles")

    def advance(self, tiles: int) -> None:
        self.rate.add(tiles)
        self.bar.set_postfix_str(str(self.rate), refresh=False)
        self.bar.update(1)


@contextlib.contextmanager
def shard_progress(total: int, desc: str, enabled: bool) -> Iterator[_Bar]:
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="shard", disable=not enabled,
              dynamic_ncols=True) as bar:
        yield _Bar(bar)
