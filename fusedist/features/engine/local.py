"""The engine of ``cache`` and ``embed`` on one machine without Ray (``engine.executor``).

On a laptop or a single workstation Ray Data's machinery costs more than it gives: its start,
the encoder actor's own process importing torch and timm and building the encoders again,
and the helper actors, ~10-30 s before the first forward on 2 cores (docs/benchmarks.md,
"Engine"), and a process tree several GB large. This engine is the loop a user would write,
with the stage's bookkeeping kept: a torch ``DataLoader`` whose workers read and JPEG-decode
the shards (the same ``decode_shard`` the Ray decode tasks run, hashes checked the same way),
the encoders the driver already built for its weight checks computing in this process on
every core (or its GPU), parts written and groups finished exactly as on Ray
(``EncoderActor.__call__``, ``run_finish``, in a writer thread), so the outputs are
byte-identical to the Ray engine's.

A decode worker that dies (the OOM killer) fails the run, where Ray would retry its task; a
re-run resumes from the done-entries.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fusedist.features.engine.core import (EncoderActor, EngineSpec, EngineStats, Group, Rows,
                                           clear_staging, decode_shard)
from fusedist.features.parts import Finish, run_finish

log = logging.getLogger("fusedist.features")


class ShardRows(IterableDataset):
    """Decoded chunk rows of ``shards`` [(name, samples, sha256)], one ``decode_shard`` row per
    chunk; DataLoader workers split the shards between them (each shard read by one)."""

    def __init__(self, spec: EngineSpec, shards: list[tuple]):
        super().__init__()
        self.spec, self.shards = spec, shards

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, s in enumerate(self.shards):
            if i % workers == worker:
                yield from decode_shard({"shard": [s[0]], "samples": [s[1]],
                                         "sha256": [(s[2] if len(s) > 2 else None) or ""]},
                                        self.spec)


def _as_numpy(row: dict) -> dict:
    """DataLoader hands numeric arrays over as tensors (shared memory); back to numpy views."""
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in row.items()}


def run_engine_local(spec: EngineSpec, shards: list[tuple], groups: dict[str, Group],
                     finish: Finish, on_group: Callable[[str, dict | None, str], None],
                     encoders: list, decode_workers: int = 1) -> EngineStats:
    """:func:`fusedist.features.engine.raydata.run_engine`'s contract, in this process: ``encoders``
    are the built encoders of ``spec.encoders`` (the driver's), ``decode_workers`` the
    DataLoader workers that decode."""
    stats = EngineStats()
    if not shards:
        return stats
    t0 = time.perf_counter()
    actor = EncoderActor(spec, encoders)
    rows = Rows(spec, groups, finish, on_group, stats, t0)
    # batch_size=None: each item is one decode_shard row (arrays of one element), the batch
    # of one row Ray Data hands an actor; prefetch_factor bounds the decoded chunks in flight.
    loader = DataLoader(ShardRows(spec, shards), batch_size=None,
                        num_workers=max(1, decode_workers), prefetch_factor=2)
    pending: dict[Future, str] = {}

    def collect(wait: bool) -> None:
        for fut in [f for f in pending if wait or f.done()]:
            gid = pending.pop(fut)
            entry: Any = fut.result()  # a failed write fails the run, as on Ray
            on_group(gid, entry, "")

    # One writer thread: a group's parts -> outputs overlaps the next chunks' forwards.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusedist-finish") as writer:
        it = iter(loader)
        try:
            for row in it:
                out = actor(_as_numpy(row))
                done = rows.add({k: v[0] for k, v in out.items()})
                if done is not None:
                    pending[writer.submit(run_finish, done[1])] = done[0]
                collect(wait=False)
            collect(wait=True)
        finally:
            del it  # stops the decode workers (also on an error or Ctrl-C)
            for fut in pending:
                fut.cancel()
    clear_staging(spec.staging)
    return stats

