"""The engine on Ray Data, behind ``cache`` and ``embed`` on a cluster (or a Ray this process
runs).

Shard names -> (CPU tasks) read + JPEG-decode each shard into chunks of uint8 images
(:func:`~.core.decode_shard`) -> (an autoscaling actor pool, GPUs per actor as configured)
every encoder on the same decoded chunk, whose features the actor writes as a part
(:class:`~.core.EncoderActor`) -> the driver, which receives only small rows, and for each
finished group of shards hands a finish call to a long-lived finisher actor on the node of the
actor that wrote its last part; that writes the stage's outputs (fusedist/features/parts.py).
No feature array passes through the driver.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from typing import Callable, Iterator

from fusedist.config import RayConfig
from fusedist.features.config import EngineConfig
from fusedist.features.engine.core import (EncoderActor, EngineSpec, EngineStats, PoolSpec,
                                           Rows, choose_device, clear_staging, decode_memory,
                                           decode_shard)
from fusedist.features.parts import FinishTask, Finish, Group, run_finish

log = logging.getLogger("fusedist.features")


def joined_cluster(ray_cfg: RayConfig) -> bool:
    """True when the stage joins a cluster by address (which may autoscale), False for the
    private local Ray it starts itself (whose resources are all there is)."""
    return bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))


def _largest_node_cpus() -> float:
    import ray

    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
    return max(cpus, default=1.0)


def engine_pool(cfg: EngineConfig, ray_cfg: RayConfig) -> tuple[str, PoolSpec, int]:
    """(device, Ray resources of the pools, torch threads per actor) for this stage."""
    import ray

    device = choose_device(cfg.device, "joined cluster" if joined_cluster(ray_cfg) else "local ray",
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


class Finisher:
    """A long-lived writer: finish calls reuse its warm process. A Ray task per group paid a
    worker start and the stage's imports each time (~1.4 CPU-s per group, measured on the
    cores the encoder actor computes on); one of these per node costs that once."""

    def warm(self, finish: Finish) -> None:
        """Nothing to do: receiving ``finish`` imports the stage's module here, ahead of work."""

    def run(self, task: FinishTask) -> dict:
        return run_finish(task)


class _Finishers:
    """One ``Finisher`` per node that runs encoder actors, started on that node's first group;
    a group whose finisher died with its node is finished by a plain retried task instead.

    num_cpus=0: a short write must not wait for the CPUs the actors hold until the end. It is
    placed on the node of the actor that wrote the group's last part (soft: any node if that one
    is gone)."""

    def __init__(self, finish: Finish):
        import ray

        self.ray = ray
        self.actor_cls = ray.remote(num_cpus=0, max_concurrency=4)(Finisher)
        self.task_fn = ray.remote(num_cpus=0, max_retries=3)(run_finish)
        self.by_node: dict[str, object] = {}
        self.running: dict = {}  # ref -> (group id, task, node or None for a plain task)
        # A local run (the driver's node computes): start its finisher now, so its start and
        # imports overlap the encoder actors' own start rather than the first groups' writes.
        # A cluster's driver sits on a head that computes nothing (num-cpus: 0): no finisher.
        here = ray.get_runtime_context().get_node_id()
        if any(n["NodeID"] == here and n["Resources"].get("CPU", 0) > 0 for n in ray.nodes()):
            self._start(here).warm.remote(finish)

    def _start(self, node: str):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node not in self.by_node:
            self.by_node[node] = self.actor_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote()
        return self.by_node[node]

    def submit(self, gid: str, task: FinishTask, node: str | None) -> None:
        if node is None:  # the fallback: a retried task, anywhere
            self.running[self.task_fn.remote(task)] = (gid, task, None)
            return
        self.running[self._start(node).run.remote(task)] = (gid, task, node)

    def collect(self, timeout: float | None) -> Iterator[tuple[str, dict, int]]:
        """(group id, done-entry, its pickled size) of finished calls; all of them when
        ``timeout`` is None (waits), else those ready now."""
        ray = self.ray
        while self.running:
            refs = list(self.running)
            # Waiting: stream entries as they come (progress); polling: take all that are ready.
            ready, _ = ray.wait(refs, num_returns=1 if timeout is None else len(refs),
                                timeout=timeout)
            for ref in ready:
                gid, task, node = self.running.pop(ref)
                try:
                    entry = ray.get(ref)
                except ray.exceptions.RayActorError:
                    log.warning("the finisher on node %s died (node lost?); finishing group "
                                "%s in a task elsewhere", node, gid)
                    self.by_node.pop(node, None)
                    self.submit(gid, task, None)
                    continue
                yield gid, entry, len(pickle.dumps(entry))
            if timeout is not None:
                return

    def close(self) -> None:
        for actor in self.by_node.values():
            self.ray.kill(actor)


def run_engine(spec: EngineSpec, shards: list[tuple], groups: dict[str, Group],
               finish: Finish, on_group: Callable[[str, dict | None, str], None],
               pool: PoolSpec) -> EngineStats:
    """Embed ``shards`` [(name, sample count[, manifest sha256])]; for each group of shards,
    once all its parts are written, run ``finish`` on a worker and call
    ``on_group(id, entry, error)`` with its done-entry (or the first shard error of the group,
    entry None). A shard whose bytes do not hash to its given sha256 fails; ``finish`` sees
    the hash actually read as ``ShardResult.sha256``."""
    import ray

    stats = EngineStats()
    if not shards:
        return stats
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"shard": s[0], "samples": s[1],
                               "sha256": (s[2] if len(s) > 2 else None) or ""} for s in shards],
                             override_num_blocks=len(shards))
    # Decode must stay a separate pool of CPU tasks. Ray Data fuses consecutive maps whose
    # resource requests match (on CPU-only clusters they do), which would move JPEG decoding
    # into the encoder actor, in series with the model. Decode tasks reserve the memory their
    # decoded chunks need and the actors do not, so the requests differ and they never fuse
    # (tests/test_cache.py checks decoding runs in other processes than the encoders).
    ds = ds.map_batches(decode_shard, fn_kwargs={"spec": spec}, batch_size=1,
                        compute=ray.data.TaskPoolStrategy(size=pool.decode_tasks),
                        num_cpus=pool.decode_cpus, memory=decode_memory(spec))
    ds = ds.map_batches(EncoderActor, fn_constructor_kwargs={"spec": spec}, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(
                            min_size=pool.min_actors, max_size=pool.max_actors,
                            max_tasks_in_flight_per_actor=2),
                        num_gpus=pool.gpus_per_actor, num_cpus=pool.cpus_per_actor)
    rows = Rows(spec, groups, finish, on_group, stats, t0)
    finishers = _Finishers(finish)

    def collect(timeout: float | None) -> None:
        for gid, entry, size in finishers.collect(timeout):
            stats.bytes_received += size
            on_group(gid, entry, "")

    try:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2):
            stats.bytes_received += sum(v.nbytes for v in batch.values())
            row = {k: v[0] for k, v in batch.items()}
            done = rows.add(row)
            if done is not None:
                finishers.submit(done[0], done[1], str(row["actor_node"]))
            collect(timeout=0)
        collect(timeout=None)
    finally:
        finishers.close()
    clear_staging(spec.staging)
    return stats
