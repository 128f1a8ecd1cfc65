"""Feature parts: how the engine's workers, not its driver, turn features into outputs.

Each encoder actor writes the features of the chunk it embedded as a *part* under a staging
folder (``<staging>/<shard>/<chunk>.npz``: keys + one float32 array per encoder) and returns a
small row. When every chunk of every shard of a *group* (cache: one shard; embed: one slide's
shards) has a part, the driver hands a finish call to a finisher actor on a worker (one per
node, engine.py ``Finisher``; a plain retried task if that node is lost) that reads the parts,
calls the stage's ``finish`` function (write feature shards / bags and their done-entries)
and deletes the parts. The driver only ever receives those rows and the finish function's
done-entry, so its traffic and memory do not grow with the features (docs/benchmarks.md
measures it).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fusedist import storage


@dataclass
class ShardResult:
    """A finished shard: its keys and, per encoder, features (N, S, D) in key order."""

    name: str
    keys: list[str]
    features: dict[str, np.ndarray]
    error: str = ""
    sha256: str = ""  # of the tile shard's bytes as read (checked against the manifest)


@dataclass(frozen=True)
class Group:
    """Shards whose features one ``finish`` call turns into outputs, and what it needs."""

    shards: tuple[str, ...]
    payload: Any = None


# finish(group id, payload, {shard: ShardResult}) -> done-entry (small, JSON-serialisable:
# it goes to the driver and is saved in the staging folder, see run_finish).
Finish = Callable[[str, Any, dict[str, ShardResult]], dict]


def part_url(staging: str, shard: str, chunk: int) -> str:
    return storage.join(staging, shard, f"{chunk:06d}.npz")


def write_part(staging: str, shard: str, chunk: int, keys: list[str],
               feats: dict[str, np.ndarray]) -> None:
    """One chunk's keys and features (float32, exact), atomically."""
    buf = io.BytesIO()
    arrays = {f"feat:{k}": np.ascontiguousarray(v, np.float32) for k, v in feats.items()}
    np.savez(buf, keys=np.array(keys, dtype=str), **arrays)
    storage.write_bytes(part_url(staging, shard, chunk), buf.getvalue())


def read_shard(staging: str, shard: str, n_chunks: int) -> ShardResult:
    """Concatenate a shard's parts in chunk order."""
    keys: list[str] = []
    feats: dict[str, list[np.ndarray]] = {}
    for c in range(n_chunks):
        with np.load(io.BytesIO(storage.read_bytes(part_url(staging, shard, c))),
                     allow_pickle=False) as z:
            keys += [str(k) for k in z["keys"]]
            for name in z.files:
                if name.startswith("feat:"):
                    feats.setdefault(name[5:], []).append(z[name])
    return ShardResult(shard, keys, {k: np.concatenate(v) for k, v in feats.items()})


def done_url(staging: str, group: Group) -> str:
    """Where a finished group's done-entry is kept until the run ends (its first shard's folder)."""
    return storage.join(staging, group.shards[0], "done.json")


def delete_parts(staging: str, shard: str, n_chunks: int) -> None:
    for c in range(n_chunks):
        storage.delete(part_url(staging, shard, c))


@dataclass
class FinishTask:
    """Everything a finish call needs (plain data: it travels to a worker)."""

    staging: str
    storage_cfg: dict
    finish: Finish
    group_id: str
    group: Group
    n_chunks: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # shard -> hash its decode task read


def run_finish(task: FinishTask) -> dict:
    """Body of a finish call (finisher actor or task): parts -> ``finish`` -> done-entry;
    the parts are removed after.

    Idempotent, because a call can be run twice: a node lost after the call deleted the parts
    but before its reply reached the driver makes the driver run it again elsewhere. The entry
    is saved (atomically) before any part is deleted, so a second call either finds every part
    (and redoes ``finish``, whose writes are atomic) or finds the saved entry and returns it."""
    storage.configure(storage.StorageConfig(**task.storage_cfg))
    marker = done_url(task.staging, task.group)
    if storage.exists(marker):
        entry = json.loads(storage.read_bytes(marker))
    else:
        results = {s: read_shard(task.staging, s, task.n_chunks[s]) for s in task.group.shards}
        for s, res in results.items():
            res.sha256 = task.sha256.get(s, "")
        entry = task.finish(task.group_id, task.group.payload, results)
        storage.write_bytes(marker, json.dumps(entry).encode())
    for s in task.group.shards:
        delete_parts(task.staging, s, task.n_chunks[s])
    return entry
