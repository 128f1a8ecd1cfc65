"""Pieces shared by ``cache`` and ``embed``: resources, the engine plan, progress.

Inputs and encoders: :mod:`fusedist.formats.tile_manifest`, :mod:`fusedist.models.refs`."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

from fusedist.config import ConfigError, RayConfig
from fusedist.features.config import EngineConfig
from fusedist.features.engine import PoolSpec
from fusedist.runtime import Rate

log = logging.getLogger("fusedist.features")


def joined_cluster(ray_cfg: RayConfig) -> bool:
    """True when the stage joins a cluster by address (which may autoscale), False for the
    private local Ray it starts itself (whose resources are all there is)."""
    return bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))


def choose_device(cfg: EngineConfig, joined: bool, gpus_now: float) -> str:
    """``cuda``/``cpu`` from the config; ``gpus_now`` (GPUs up at start) only decides ``auto``
    and is never trusted to mean "no GPUs will come" on a joined cluster: that is logged."""
    if cfg.device == "cuda":
        if gpus_now <= 0 and not joined:
            raise ConfigError("engine.device=cuda but this local Ray has no GPUs; use "
                              "engine.device=cpu (or auto), or join a GPU cluster with "
                              "--set ray.address=...")
        log.info("engine.device=cuda (from the config): each encoder actor requests %g GPU(s)%s",
                 cfg.gpus_per_actor, "" if gpus_now > 0 else
                 "; no GPU node is up yet, so the actors wait for the autoscaler to add one")
        return "cuda"
    if cfg.device == "cpu":
        log.info("engine.device=cpu (from the config)")
        return "cpu"
    if gpus_now > 0:
        log.info("engine.device=auto -> cuda: the Ray cluster has %g GPU(s)", gpus_now)
        return "cuda"
    if joined:
        log.warning("engine.device=auto -> cpu: the joined Ray cluster has no GPU right now. "
                    "An autoscaling cluster starts GPU nodes only when something requests "
                    "them: set engine.device=cuda to request GPU actors (the GPU recipes do)")
    else:
        log.info("engine.device=auto -> cpu: this local Ray has no GPUs")
    return "cpu"


def _largest_node_cpus() -> float:
    import ray

    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
    return max(cpus, default=1.0)


def engine_pool(cfg: EngineConfig, ray_cfg: RayConfig) -> tuple[str, PoolSpec, int]:
    """(device, Ray resources of the pools, torch threads per actor) for this stage."""
    import ray

    device = choose_device(cfg, joined_cluster(ray_cfg),
                           float(ray.cluster_resources().get("GPU", 0)))
    cpus = cfg.cpus_per_actor
    if cpus is None:
        # CPU actors: the model gets every core of a node that decoding does not need. The
        # node sizes of a CPU run are what is up now (CPU runs do not wait for scale-ups).
        node = _largest_node_cpus()
        cpus = 1.0 if device == "cuda" else (node - cfg.decode_cpus if node > cfg.decode_cpus
                                              else node)
    actors = cfg.max_actors or cfg.min_actors
    decode_cpus, decode_tasks = cfg.decode_cpus, None
    if device == "cpu":
        # Decode tasks placed first must never leave a node too few CPUs for its actor (Ray
        # grants a task's lease before the GCS places an actor). At most one decode task per
        # actor runs at once, and together they hold decode_cpus: wherever they land, an
        # actor's request of a node's CPUs minus decode_cpus still fits. One task per actor
        # keeps a CPU model fed (decoding is ~1/50 of a ViT-S forward).
        decode_tasks = actors
        decode_cpus = max(1e-4, math.floor(cfg.decode_cpus / actors * 1e4) / 1e4)
    pool = PoolSpec(min_actors=cfg.min_actors, max_actors=actors,
                    gpus_per_actor=cfg.gpus_per_actor if device == "cuda" else 0.0,
                    cpus_per_actor=cpus, decode_cpus=decode_cpus, decode_tasks=decode_tasks)
    threads = max(1, round(cpus))
    log.info("engine: %d-%d encoder actor(s) on %s, %g CPU(s) each (%d torch threads), "
             "%g GPU(s) each; decode tasks %g CPU each, %s at once", pool.min_actors,
             pool.max_actors, device, cpus, threads, pool.gpus_per_actor, decode_cpus,
             decode_tasks or "as many as Ray Data schedules")
    return device, pool, threads


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
    from fusedist.runtime import init_ray, local_reason

    why = local_reason(cfg.executor, ray_cfg, "engine.executor")
    if why is None:
        init_ray(ray_cfg)
        device, pool, threads = engine_pool(cfg, ray_cfg)
        return EnginePlan(False, device, threads, pool=pool)
    from fusedist.localtasks import local_cpus

    device = _local_device(cfg)
    cores = local_cpus(ray_cfg.num_cpus)
    threads = max(1, round(cfg.cpus_per_actor)) if cfg.cpus_per_actor else cores
    workers = cfg.decode_workers or (1 if device == "cpu" else min(8, max(1, cores - 1)))
    log.info("engine: local, without Ray (%s): encoders in this process on %s, %d torch "
             "threads; %d DataLoader worker(s) decode", why, device, threads, workers)
    return EnginePlan(True, device, threads, decode_workers=workers)


def _local_device(cfg: EngineConfig) -> str:
    import torch

    has_gpu = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_gpu:
        raise ConfigError("engine.device=cuda but this machine has no CUDA GPU (the engine "
                          "runs locally, without Ray); use engine.device=cpu (or auto), or "
                          "join a GPU cluster with --set ray.address=...")
    if cfg.device != "auto":
        log.info("engine.device=%s (from the config)", cfg.device)
        return cfg.device
    log.info("engine.device=auto -> %s: this machine has %s", "cuda" if has_gpu else "cpu",
             "a CUDA GPU" if has_gpu else "no CUDA GPU")
    return "cuda" if has_gpu else "cpu"


def execute(plan: EnginePlan, spec, shards: list[tuple], groups: dict, finish, on_group,
            encoders: list):
    """Run the engine ``plan`` chose (``run_engine``'s arguments; ``encoders``: the built
    encoders of ``spec``, which the local engine computes with)."""
    if plan.local:
        from fusedist.features.local_engine import run_engine_local

        return run_engine_local(spec, shards, groups, finish, on_group, encoders,
                                plan.decode_workers)
    from fusedist.features.engine import run_engine

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
