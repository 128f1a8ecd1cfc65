"""Pieces shared by ``cache`` and ``embed``: inputs, encoders, resources, progress."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

from fusedist import storage
from fusedist.config import ConfigError, RayConfig
from fusedist.features.config import EncoderRef, EngineConfig
from fusedist.features.engine import PoolSpec
from fusedist.execution.progress import Rate

log = logging.getLogger("fusedist.features")


def read_tile_manifest(url: str) -> dict:
    """The tile dataset's manifest, or a clear error saying to run ``fusedist tile``."""
    murl = storage.join(url.rstrip("/"), "manifest.json")
    if not storage.exists(murl):
        raise ConfigError(f"no tile dataset at {url} (no manifest.json); make one with "
                          "`fusedist tile`, or point --tiles at <tiles>/<dataset>")
    m = storage.read_json(murl)
    if not str(m.get("format", "")).startswith("fusedist.tiles/"):
        raise ConfigError(f"{murl} is not a fusedist tile manifest (format "
                          f"{m.get('format')!r})")
    return m


def load_encoders(refs: list[EncoderRef], tracking_uri: str | None = None) -> list:
    """Build each encoder once on the CPU: bad names or weights fail here, before any work,
    and the weights digests that mark outputs come from the real loaded weights.
    ``tracking_uri``: the MLflow that resolves ``models:/`` references."""
    from fusedist.preflight import check_encoder_refs

    check_encoder_refs(refs)  # before torch is imported
    from fusedist.models import WeightsError, build_encoder, get_spec

    out = []
    for ref in refs:
        try:
            name = resolve_ref(ref.name, tracking_uri)
            get_spec(name)
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"")) from None
        try:
            enc = build_encoder(name, weights=ref.weights, device="cpu")
        except WeightsError as e:
            raise ConfigError(str(e)) from None
        _check_exported_dim(enc, ref.name)
        out.append(enc)
    names = [e.spec.name for e in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"encoder listed twice: {names}")
    return out


def _check_exported_dim(enc, ref: str) -> None:
    """An exported model's card says its ``dim``; its weights decide what comes out. A card
    edited (or copied from another export) must fail here, not write bags of the wrong width."""
    import torch

    from fusedist.distill.export import exported_weights

    if exported_weights(enc.spec.name) is None:
        return  # registry encoders: their dim is checked by the registry's own tests
    s = int(enc.spec.input_size)
    with torch.inference_mode():
        got = int(enc.embed(torch.zeros(1, 3, s, s, dtype=torch.uint8)).shape[-1])
    if got != int(enc.spec.dim):
        raise ConfigError(f"export {ref}: card.json says dim={enc.spec.dim} but its weights "
                          f"give {got}-d features; fix the card's dim or re-export the model "
                          "(fusedist export)")


def resolve_ref(name: str, tracking_uri: str | None = None) -> str:
    """A registry name, the folder/card.json of an exported model, or an MLflow model
    ``models:/<name>@<alias>`` (the last two registered here; ``tracking_uri`` is the MLflow
    for ``models:/``, default ``MLFLOW_TRACKING_URI`` or the local store).

    Each Ray worker has its own registry, so actors call this too with the same reference.
    """
    from fusedist.distill.export import resolve_encoder

    try:
        return resolve_encoder(name, tracking_uri)
    except FileNotFoundError as e:
        raise ConfigError(f"encoder {name!r}: {e}; give a registry name "
                          "(fusedist.models.list_encoders()) or an exported model folder") from None
    except ValueError as e:
        if not name.startswith("models:/"):
            raise
        raise ConfigError(f"encoder {name!r}: {e}") from None


def stage_tracking_uri(mlflow_cfg) -> str:
    """The MLflow that resolves a stage's ``models:/`` encoders: the stage's own
    ``mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the local store (the URI the
    stage logs its run to, so one setting names one server)."""
    from fusedist.tracking import resolve_tracking_uri

    return resolve_tracking_uri(mlflow_cfg)[0]


def shared_export(output: str, name: str) -> str:
    """``<output>/_state/models/<name>/``: the export folder of an encoder that came from
    ``models:/``, copied where every actor can read it. The driver downloaded it into its
    own cache, which workers on other nodes do not see, and which an actor could not refill
    itself: it may not reach the MLflow the driver was pointed at."""
    from pathlib import Path

    from fusedist.distill.export import CARD, exported_weights

    src = Path(exported_weights(name)).parent
    dest = storage.join(output, "_state", "models", name)
    card = storage.read_json(str(src / CARD))
    have = storage.join(dest, CARD)
    if not (storage.exists(have) and storage.read_json(have).get("weights_sha256")
            == card.get("weights_sha256")):
        storage.delete(have)  # no moment pairs the old card with the new weights
        for p in sorted(src.iterdir()):
            if p.name != CARD:
                storage.upload_file(p, storage.join(dest, p.name))
        storage.upload_file(src / CARD, have)  # last: marks the copy complete
    return dest


def actor_refs(refs: list[EncoderRef], encoders: list, tracking_uri: str, output: str
               ) -> list[tuple[str, str | None]]:
    """The (reference, weights) pairs the engine's actors build ``encoders`` (built by
    :func:`load_encoders` from ``refs``) from, in their own processes: as the user gave them,
    but an MLflow model's reference is its export copied under ``output``
    (:func:`shared_export`), so no actor needs to reach MLflow."""
    from fusedist import mlmodels

    names = {e.spec.name for e in encoders}
    out = []
    for r in refs:
        name = resolve_ref(r.name, tracking_uri)
        if name in names:
            out.append((shared_export(output, name) if mlmodels.is_registry_uri(r.name)
                        else r.name, r.weights))
    return out


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
    from fusedist.execution.rayrun import init_ray
    from fusedist.execution.tasks import local_reason

    why = local_reason(cfg.executor, ray_cfg, "engine.executor")
    if why is None:
        init_ray(ray_cfg)
        device, pool, threads = engine_pool(cfg, ray_cfg)
        return EnginePlan(False, device, threads, pool=pool)
    from fusedist.execution.local import local_cpus

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
