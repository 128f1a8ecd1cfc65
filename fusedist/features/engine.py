"""The batch-inference engine behind ``fusedist cache`` and ``fusedist embed``.

Ray Data pipeline: shard names -> (CPU tasks) read + JPEG-decode each shard into fixed-size
chunks of uint8 images -> (actor pool, one GPU per actor when there are GPUs) every encoder on
the same decoded chunk -> the driver, which reassembles shards and hands each finished one to
the caller. Chunks are cut at fixed sample offsets inside a shard and each forward sees
exactly one chunk, so a re-run computes every feature from the same batch and writes the same
bytes.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from fusedist import storage

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
    compile: bool = False
    storage_cfg: dict = field(default_factory=dict)

    @property
    def per_sample(self) -> int:
        return GRID * GRID if self.mode == "pairs" else 1


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


def _row(spec: EngineSpec, shard: str, index: int, n_chunks: int, keys: list[str],
         images: np.ndarray, error: str = "", sha256: str = "") -> dict:
    n = len(keys)
    if n < spec.chunk:  # pad to a fixed shape: Ray Data tensor columns stay uniform
        pad = np.zeros((spec.chunk - n, *images.shape[1:]), np.uint8)
        images = np.concatenate([images, pad]) if n else pad
    return {"shard": np.array([shard]), "chunk": np.array([index]),
            "n_chunks": np.array([n_chunks]), "n": np.array([n]),
            "keys": np.array(["\n".join(keys)]), "error": np.array([error]),
            "sha256": np.array([sha256]),
            "decode_pid": np.array([os.getpid()]), "images": images[None]}


def decode_shard(batch: dict, spec: EngineSpec) -> Iterator[dict]:
    """Ray Data map_batches fn (CPU): one shard name in, one row per chunk of decoded images.

    A sample that cannot be decoded ends the shard with an error row naming the shard and key;
    the driver records the shard as failed and the other shards proceed. The shard is hashed as
    it streams (the reader yields its last sample only once the hash matches the manifest's),
    so the last chunk of a shard whose bytes changed never leaves: an error row takes its
    place, and the last row carries the hash actually read.
    """
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
                    yield _row(spec, shard, index, n_chunks, keys, np.stack(images),
                               sha256=digest.get("sha256", ""))
                    index, keys, images = index + 1, [], []
            if seen != expected:
                raise ValueError(f"holds {seen} samples but its manifest says {expected}")
            if keys or index == 0:
                yield _row(spec, shard, index, n_chunks, keys,
                           np.stack(images) if images else np.zeros(
                               (0, spec.per_sample, 3, spec.tile_px, spec.tile_px), np.uint8),
                           sha256=digest.get("sha256", ""))
        except Exception as e:  # noqa: BLE001 - recorded per shard, never fatal to the job
            # The reader's own errors name the file, the sample and one last key already.
            msg = str(e) if isinstance(e, ShardError) else f"{url}: sample {seen} (key {key}): {e}"
            yield _row(spec, shard, index, n_chunks, [],
                       np.zeros((0, spec.per_sample, 3, spec.tile_px, spec.tile_px), np.uint8),
                       error=msg)


class EncoderActor:
    """Ray Data actor: loads every encoder once, then embeds each decoded chunk with all."""

    def __init__(self, spec: EngineSpec):
        import torch

        from fusedist.features.runtime import resolve_ref
        from fusedist.models import build_encoder

        self.spec = spec
        self.torch = torch
        self.device = torch.device(spec.device)
        # An exported encoder on S3 is resolved here, in the actor's own process, which
        # knows the endpoint only from the stage's storage config.
        storage.configure(storage.StorageConfig(**spec.storage_cfg))
        self.encoders = [build_encoder(resolve_ref(ref), weights=w, device=spec.device)
                         for ref, w in spec.encoders]
        if spec.compile:
            for enc in self.encoders:
                enc.compile()  # compiles forward in place (the module keeps its attributes)

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        out = {k: batch[k] for k in ("shard", "chunk", "n_chunks", "n", "keys", "error",
                                     "sha256", "decode_pid")}
        out["actor_pid"] = np.full(len(out["shard"]), os.getpid())
        images = batch["images"]  # (rows, chunk, S, 3, t, t) uint8
        rows, chunk, s = images.shape[:3]
        with warnings.catch_warnings():
            # Ray hands over a read-only view; the encoders only read it, so no copy is made.
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(images)).reshape(-1, *images.shape[3:])
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        errors = list(out["error"])
        for enc in self.encoders:
            with torch.inference_mode():
                feats = enc.embed(x).float().cpu().numpy()
            feats = feats.reshape(rows, chunk, s, -1)
            for r in range(rows):
                n = int(out["n"][r])
                bad = ~np.isfinite(feats[r, :n]).all(axis=(1, 2))
                if bad.any() and not errors[r]:
                    key = str(out["keys"][r]).split("\n")[int(np.argmax(bad))]
                    errors[r] = (f"{storage.join(self.spec.tiles_url, str(out['shard'][r]))}: "
                                 f"encoder {enc.spec.name} produced NaN/inf features for key "
                                 f"{key}; check its weights (a NaN parameter?) and inputs")
            out[f"feat:{enc.spec.name}"] = feats  # float32; callers choose what they store
        out["error"] = np.array(errors)
        return out


@dataclass
class ShardResult:
    """A finished shard: its keys and, per encoder, features (N, S, D) in key order."""

    name: str
    keys: list[str]
    features: dict[str, np.ndarray]
    error: str = ""
    pids: tuple[set[int], set[int]] = (set(), set())  # (decode, encoder) processes: kept apart
    sha256: str = ""  # of the tile shard's bytes as they were read (checked against the manifest)


def decode_memory(spec: EngineSpec) -> int:
    """Bytes a decode task holds: the worker itself (~450 MiB measured with its imports) plus a
    chunk of decoded uint8 inputs three times over (list, stack, JPEG bytes in flight)."""
    chunk = spec.chunk * spec.per_sample * 3 * spec.tile_px * spec.tile_px
    return 640 * 2**20 + 3 * chunk


def run_engine(spec: EngineSpec, shards: list[tuple], on_shard: Callable[[ShardResult], None],
               num_actors: int, gpus_per_actor: float, cpus_per_actor: float,
               decode_cpus: float = 1.0) -> None:
    """Embed ``shards`` [(name, sample count[, manifest sha256])] and call ``on_shard`` as each
    one completes (a shard whose bytes do not hash to its given sha256 fails)."""
    import ray

    if not shards:
        return
    ds = ray.data.from_items([{"shard": s[0], "samples": s[1],
                               "sha256": (s[2] if len(s) > 2 else None) or ""} for s in shards],
                             override_num_blocks=len(shards))
    # Decode must stay a separate pool of CPU tasks. Ray Data fuses consecutive maps whose
    # resource requests match (on CPU-only clusters they do), which would move JPEG decoding
    # into the encoder actor, in series with the model. Decode tasks reserve the memory their
    # decoded chunks need and the actors do not, so the requests differ and they never fuse
    # (tests/test_cache.py checks decoding runs in other processes than the encoders).
    ds = ds.map_batches(decode_shard, fn_kwargs={"spec": spec}, batch_size=1,
                        num_cpus=decode_cpus, memory=decode_memory(spec))
    ds = ds.map_batches(EncoderActor, fn_constructor_kwargs={"spec": spec}, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=num_actors),
                        num_gpus=gpus_per_actor, num_cpus=cpus_per_actor)
    pending: dict[str, dict[int, dict]] = {}
    failed: set[str] = set()
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2):
        row = {k: v[0] for k, v in batch.items()}
        name = str(row["shard"])
        if name in failed:
            continue
        if row["error"]:
            failed.add(name)
            pending.pop(name, None)
            on_shard(ShardResult(name, [], {}, error=str(row["error"])))
            continue
        chunks = pending.setdefault(name, {})
        chunks[int(row["chunk"])] = row
        if len(chunks) == int(row["n_chunks"]):
            on_shard(_assemble(name, pending.pop(name)))


def _assemble(name: str, chunks: dict[int, dict]) -> ShardResult:
    ordered = [chunks[i] for i in sorted(chunks)]
    keys = [k for c in ordered for k in (str(c["keys"]).split("\n") if int(c["n"]) else [])]
    feats = {}
    for col in ordered[0]:
        if col.startswith("feat:"):
            feats[col[5:]] = np.concatenate([c[col][: int(c["n"])] for c in ordered])
    pids = ({int(c["decode_pid"]) for c in ordered}, {int(c["actor_pid"]) for c in ordered})
    return ShardResult(name, keys, feats, pids=pids, sha256=str(ordered[-1]["sha256"]))
