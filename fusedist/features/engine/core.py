"""The engine core shared by its two drivers (Ray Data, :mod:`.raydata`; this process,
:mod:`.local`): what the decode and encoder steps need (:class:`EngineSpec`), reading and
JPEG-decoding a shard into chunks (:func:`decode_shard`), the embedder that runs every encoder
on a chunk and writes its part (:class:`EncoderActor`), the driver's bookkeeping of chunk rows
(:class:`Rows`) and what it saw (:class:`EngineStats`), and the one device chooser
(:func:`choose_device`).

Chunks are cut at fixed sample offsets inside a shard (the last one holds only the real
remainder: nothing padded runs through a model) and each forward sees exactly one chunk, so a
re-run, on either driver, computes every feature from the same batch and writes the same bytes.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.features.parts import FinishTask, Finish, Group, write_part
from fusedist.models.refs import resolve_ref

__all__ = ["EngineSpec", "PoolSpec", "EngineStats", "Group", "Rows", "choose_device",
           "decode_shard", "EncoderActor", "clear_staging"]

log = logging.getLogger("fusedist.features")

# Pairs: hi.jpg is cut into a 4x4 grid of teacher tiles (methods.md §1), row-major.
GRID = 4


@dataclass(frozen=True)
class EngineSpec:
    """What the decode tasks and encoder actors need (plain data: it travels to workers)."""

    tiles_url: str
    mode: str  # "pairs" | "grid"
    image_key: str  # "hi.jpg" (pairs) or "img.jpg" (grid)
    tile_px: int  # side of one encoder input tile after cutting (224)
    chunk: int  # samples per chunk (one forward)
    encoders: tuple[tuple[str, str | None], ...]  # (registry name, weights or None)
    device: str  # "cuda" | "cpu"
    staging: str = ""  # where actors write feature parts (parts.py)
    threads: int = 1  # torch threads per actor: the CPUs it holds
    compile: bool = False
    storage_cfg: dict = field(default_factory=dict)

    @property
    def per_sample(self) -> int:
        return GRID * GRID if self.mode == "pairs" else 1


@dataclass(frozen=True)
class PoolSpec:
    """Ray resources of the two pools (``raydata.engine_pool`` decides them)."""

    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    decode_cpus: float  # per decode task
    decode_tasks: int | None = None  # most decode tasks at once (None: Ray Data decides)


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _cut(img: np.ndarray, spec: EngineSpec) -> np.ndarray:
    """(H, W, 3) -> (S, 3, t, t): the 4x4 sub-tiles of a pairs hi.jpg, or the tile itself."""
    t = spec.tile_px
    if spec.mode == "pairs":
        if img.shape[:2] != (GRID * t, GRID * t):
            raise ValueError(f"hi.jpg is {img.shape[1]}x{img.shape[0]}, expected "
                             f"{GRID * t}x{GRID * t}")
        tiles = img.reshape(GRID, t, GRID, t, 3).transpose(0, 2, 4, 1, 3)
        return np.ascontiguousarray(tiles.reshape(GRID * GRID, 3, t, t))
    if img.shape[:2] != (t, t):
        raise ValueError(f"tile is {img.shape[1]}x{img.shape[0]}, expected {t}x{t}")
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


def _row(shard: str, index: int, n_chunks: int, keys: list[str], images: np.ndarray,
         error: str = "", sha256: str = "") -> dict:
    # No padding: a chunk holds only its real samples, so the model never runs on filler.
    # Rows travel one per block (batch_size=1), so their differing shapes never meet.
    return {"shard": np.array([shard]), "chunk": np.array([index]),
            "n_chunks": np.array([n_chunks]), "n": np.array([len(keys)]),
            "keys": np.array(["\n".join(keys)]), "error": np.array([error]),
            "sha256": np.array([sha256]),
            "decode_pid": np.array([os.getpid()]), "images": images[None]}


def _empty(spec: EngineSpec) -> np.ndarray:
    return np.zeros((0, spec.per_sample, 3, spec.tile_px, spec.tile_px), np.uint8)


def decode_shard(batch: dict, spec: EngineSpec) -> Iterator[dict]:
    """Ray Data map_batches fn (CPU): one shard name in, one row per chunk of decoded images.

    A sample that cannot be decoded ends the shard with an error row naming the shard and key;
    the driver records the shard as failed and the other shards proceed. The shard is hashed as
    it streams (the reader yields its last sample only once the hash matches the manifest's),
    so the last chunk of a shard whose bytes changed never leaves: an error row takes its
    place, and the last row carries the hash actually read.
    """
    # lazy: keeps torch (imported by fusedist.data) out of the stage's start-up
    from fusedist.data.reader import ShardError, iter_tar_samples

    storage.configure(storage.StorageConfig(**spec.storage_cfg))
    for shard, expected, sha in zip(batch["shard"], batch["samples"], batch["sha256"]):
        shard, expected = str(shard), int(expected)
        n_chunks = max(1, -(-expected // spec.chunk))
        url = storage.join(spec.tiles_url, shard)
        keys: list[str] = []
        images: list[np.ndarray] = []
        index, seen, key = 0, 0, "<start>"
        digest: dict[str, str] = {}
        try:
            for key, sample in iter_tar_samples(url, str(sha) or None, digest):
                if spec.image_key not in sample:
                    raise ValueError(f"no {spec.image_key} member")
                try:
                    images.append(_cut(_decode(sample[spec.image_key]), spec))
                except Exception as e:  # noqa: BLE001 - PIL raises many types
                    raise ValueError(f"cannot decode {spec.image_key}: {e}") from None
                keys.append(key)
                seen += 1
                if len(keys) == spec.chunk:
                    yield _row(shard, index, n_chunks, keys, np.stack(images),
                               sha256=digest.get("sha256", ""))
                    index, keys, images = index + 1, [], []
            if seen != expected:
                raise ValueError(f"holds {seen} samples but its manifest says {expected}")
            if keys or index == 0:
                yield _row(shard, index, n_chunks, keys,
                           np.stack(images) if images else _empty(spec),
                           sha256=digest.get("sha256", ""))
        except Exception as e:  # noqa: BLE001 - recorded per shard, never fatal to the job
            # The reader's own errors name the file, the sample and one last key already.
            msg = str(e) if isinstance(e, ShardError) else f"{url}: sample {seen} (key {key}): {e}"
            yield _row(shard, index, n_chunks, [], _empty(spec), error=msg)


def choose_device(requested: str, where: str, gpus: float = 0.0) -> str:
    """The torch device of the engine's encoders (``engine.device`` = ``requested``:
    auto|cpu|cuda), decided where it is decided, with why logged:

    - ``where="local"``: the local engine, this process (``gpus``: CUDA GPUs of this machine);
    - ``where="local ray"`` / ``"joined cluster"``: the Ray driver, for the encoder actors'
      requests (``gpus``: the cluster's GPUs up at start, which only decide ``auto``; a joined
      cluster may autoscale, so none up now is never taken to mean none will come);
    - ``where="actor"``: an encoder computing, ``requested`` the device decided above;
      ``FUSEDIST_DEVICE_OVERRIDE=cpu`` (tests only) computes on CPU while the actor's Ray
      request (its GPUs) stays what was decided: the multi-node test clusters declare GPUs
      that do not exist (tests/cluster.py).
    """
    if where == "actor":
        return os.environ.get("FUSEDIST_DEVICE_OVERRIDE") or requested
    local, joined = where == "local", where == "joined cluster"
    if requested == "cuda":
        if gpus <= 0 and local:
            raise ConfigError("engine.device=cuda but this machine has no CUDA GPU (the engine "
                              "runs locally, without Ray); use engine.device=cpu (or auto), or "
                              "join a GPU cluster with --set ray.address=...")
        if gpus <= 0 and not joined:
            raise ConfigError("engine.device=cuda but this local Ray has no GPUs; use "
                              "engine.device=cpu (or auto), or join a GPU cluster with "
                              "--set ray.address=...")
        if local:
            log.info("engine.device=cuda (from the config)")
        else:
            log.info("engine.device=cuda (from the config): each encoder actor requests GPUs%s",
                     "" if gpus > 0 else "; no GPU node is up yet, so the actors wait for the "
                     "autoscaler to add one")
        return "cuda"
    if requested == "cpu":
        log.info("engine.device=cpu (from the config)")
        return "cpu"
    if local:
        log.info("engine.device=auto -> %s: this machine has %s", "cuda" if gpus > 0 else "cpu",
                 "a CUDA GPU" if gpus > 0 else "no CUDA GPU")
        return "cuda" if gpus > 0 else "cpu"
    if gpus > 0:
        log.info("engine.device=auto -> cuda: the Ray cluster has %g GPU(s)", gpus)
        return "cuda"
    if joined:
        log.warning("engine.device=auto -> cpu: the joined Ray cluster has no GPU right now. "
                    "An autoscaling cluster starts GPU nodes only when something requests "
                    "them: set engine.device=cuda to request GPU actors (the GPU recipes do)")
    else:
        log.info("engine.device=auto -> cpu: this local Ray has no GPUs")
    return "cpu"


class EncoderActor:
    """Ray Data actor: loads every encoder once, embeds each decoded chunk with all of them and
    writes the chunk's features as a part (fusedist/features/parts.py); returns a small row."""

    def __init__(self, spec: EngineSpec, encoders: list | None = None):
        """``encoders``: already built ones (the local engine passes the driver's, in this
        process); ``None`` (a Ray actor): build them here from ``spec``."""
        import torch

        # lazy: keeps torch and timm out of the stage's start-up (a Ray driver builds none)
        from fusedist.models import build_encoder

        self.spec = spec
        self.torch = torch
        # Use every CPU this actor holds: Ray sets no thread count of its own that fits.
        torch.set_num_threads(spec.threads)
        device = choose_device(spec.device, "actor")
        self.device = torch.device(device)
        if encoders is not None:
            self.node = "local"
            self.encoders = [e.to(device) for e in encoders]
        else:
            import ray

            self.node = ray.get_runtime_context().get_node_id()
            # An exported encoder on S3 is resolved here, in the actor's own process, which
            # knows the endpoint only from the stage's storage config.
            storage.configure(storage.StorageConfig(**spec.storage_cfg))
            self.encoders = [build_encoder(resolve_ref(ref), weights=w, device=device)
                             for ref, w in spec.encoders]
        if spec.compile:
            for enc in self.encoders:
                enc.compile()  # compiles forward in place (the module keeps its attributes)

    def _embed(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """(n, S, 3, t, t) uint8 -> {encoder: (n, S, D) float32}; n == 0 runs no model."""
        torch = self.torch
        n, s = images.shape[:2]
        if n == 0:
            return {e.spec.name: np.zeros((0, s, e.spec.dim), np.float32) for e in self.encoders}
        with warnings.catch_warnings():
            # Ray hands over a read-only view; the encoders only read it, so no copy is made.
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(images)).reshape(-1, *images.shape[2:])
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        out = {}
        for enc in self.encoders:
            with torch.inference_mode():
                out[enc.spec.name] = enc.embed(x).float().cpu().numpy().reshape(n, s, -1)
        return out

    def _nan_error(self, shard: str, keys: list[str], feats: dict[str, np.ndarray]) -> str:
        for name, f in feats.items():
            bad = ~np.isfinite(f).all(axis=(1, 2))
            if bad.any():
                return (f"{storage.join(self.spec.tiles_url, shard)}: encoder {name} produced "
                        f"NaN/inf features for key {keys[int(np.argmax(bad))]}; check its "
                        "weights (a NaN parameter?) and inputs")
        return ""

    def __call__(self, batch: dict) -> dict:
        out = {k: batch[k] for k in ("shard", "chunk", "n_chunks", "n", "error", "sha256",
                                     "decode_pid")}
        rows = len(out["shard"])
        out["actor_pid"] = np.full(rows, os.getpid())
        out["actor_node"] = np.array([self.node] * rows)
        errors = list(out["error"])
        # Wall-clock bounds of each chunk's work here (EngineStats.steady_rate).
        out["t_start"], out["t_done"] = np.zeros(rows), np.zeros(rows)
        for r in range(rows):
            out["t_start"][r] = time.time()
            if errors[r]:
                continue
            shard, n = str(out["shard"][r]), int(out["n"][r])
            keys = str(batch["keys"][r]).split("\n") if n else []
            feats = self._embed(batch["images"][r][:n])
            errors[r] = self._nan_error(shard, keys, feats)
            if not errors[r]:
                write_part(self.spec.staging, shard, int(out["chunk"][r]), keys, feats)
            out["t_done"][r] = time.time()
        out["error"] = np.array(errors)
        return out


@dataclass
class EngineStats:
    """What the driver saw: how much it received and where the work ran."""

    rows: int = 0
    bytes_received: int = 0  # row arrays + pickled done-entries, the driver's whole intake
    groups: int = 0
    decode_pids: set[int] = field(default_factory=set)
    actor_pids: set[int] = field(default_factory=set)
    actor_nodes: set[str] = field(default_factory=set)
    # Seconds from the engine's start to the first chunk's row: the fixed cost (Ray Data
    # start, actors spawned and their encoders built, the first chunk's forward).
    first_row_s: float | None = None
    # (wall-clock start, end, encoder inputs) of each chunk's work in an actor.
    chunk_times: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def steady_rate(self) -> float | None:
        """Encoder inputs per second once the first chunk is done: the inputs of the chunks
        that started after it, over the time from its end to the last chunk's end (None with
        fewer than 2 chunks). Start-up is excluded; decode, transfer and writes are not."""
        if len(self.chunk_times) < 2:
            return None
        first = min(end for _, end, _ in self.chunk_times)
        later = [(end, n) for start, end, n in self.chunk_times if start >= first]
        span = max((end for end, _ in later), default=first) - first
        return sum(n for _, n in later) / span if later and span > 0 else None


def decode_memory(spec: EngineSpec) -> int:
    """Bytes a decode task holds: the worker itself (~450 MiB measured with its imports) plus a
    chunk of decoded uint8 inputs three times over (list, stack, JPEG bytes in flight)."""
    chunk = spec.chunk * spec.per_sample * 3 * spec.tile_px * spec.tile_px
    return 640 * 2**20 + 3 * chunk


class Rows:
    """The driver's bookkeeping of chunk rows, shared by the Ray and the local engine: stats,
    failed groups (reported at once), and the finish task of each group whose shards are all
    done."""

    def __init__(self, spec: EngineSpec, groups: dict[str, Group], finish: Finish,
                 on_group: Callable[[str, dict | None, str], None], stats: EngineStats,
                 t0: float):
        self.spec, self.groups, self.finish = spec, groups, finish
        self.on_group, self.stats, self.t0 = on_group, stats, t0
        self.group_of = {s: g for g, grp in groups.items() for s in grp.shards}
        self.chunks: dict[str, set[int]] = {}
        self.n_chunks: dict[str, int] = {}
        self.sha_read: dict[str, str] = {}  # shard -> sha256 of the bytes its decode task read
        self.complete: dict[str, set[str]] = {}
        self.failed: set[str] = set()

    def add(self, row: dict) -> tuple[str, FinishTask] | None:
        """Record one row (one value per field); a group's (id, finish task) once complete."""
        stats, spec = self.stats, self.spec
        stats.rows += 1
        if stats.first_row_s is None:
            stats.first_row_s = time.perf_counter() - self.t0
        stats.chunk_times.append((float(row["t_start"]), float(row["t_done"]),
                                  int(row["n"]) * spec.per_sample))
        name = str(row["shard"])
        gid = self.group_of[name]
        stats.decode_pids.add(int(row["decode_pid"]))
        stats.actor_pids.add(int(row["actor_pid"]))
        stats.actor_nodes.add(str(row["actor_node"]))
        if gid in self.failed:
            return None
        if row["error"]:
            self.failed.add(gid)
            self.on_group(gid, None, str(row["error"]))
            return None
        self.n_chunks[name] = int(row["n_chunks"])
        if row["sha256"]:
            self.sha_read[name] = str(row["sha256"])
        self.chunks.setdefault(name, set()).add(int(row["chunk"]))
        if len(self.chunks[name]) < self.n_chunks[name]:
            return None
        self.complete.setdefault(gid, set()).add(name)
        group = self.groups[gid]
        if len(self.complete[gid]) < len(group.shards):
            return None
        stats.groups += 1
        return gid, FinishTask(spec.staging, spec.storage_cfg, self.finish, gid, group,
                               {s: self.n_chunks[s] for s in group.shards},
                               {s: self.sha_read.get(s, "") for s in group.shards})


def clear_staging(staging: str) -> None:
    """Parts left by failed groups (finished groups delete their own), and local folders."""
    if not storage.is_s3(staging):
        shutil.rmtree(storage.local_path(staging), ignore_errors=True)
        return
    for name in storage.walk_files(staging):
        storage.delete(storage.join(staging, name))
