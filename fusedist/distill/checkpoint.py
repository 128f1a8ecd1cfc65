"""Checkpoints of a distill run, and the sample log committed with them.

A checkpoint is one Ray Train checkpoint folder that every rank contributes to (Ray merges the
ranks' folders into one):

- ``ds/``: DeepSpeed's state (``engine.save_checkpoint``): the module, and each rank's ZeRO
  partition of the optimizer state;
- ``ema.pt`` (rank 0): the fp32 EMA student, the model that is exported;
- ``fusedist_state.json`` (rank 0): step, epoch, the merged data cursor (every rank's slots),
  the digest of the training weights, and what the student is (for ``fusedist export``).

Every rank saves then calls ``ray.train.report`` the same number of times (it is a barrier;
a rank that skips one hangs the job). Restore goes through ``ray.train.get_checkpoint()``,
which is the newest checkpoint of this run, also when the command is run again.

**Sample log.** Each rank appends the keys it trained on; at each checkpoint it writes them to
``<run>/sample_log/step-<step>/rank-<rank>.jsonl``; once Ray Train's controller has
committed that checkpoint (``get_all_reported_checkpoints(COMMITTED)``; a ``report`` that
returned is not yet committed: a rank dying before the controller's next poll loses it), rank
0 writes ``COMMITTED`` beside them. That wait is deferred to the next checkpoint, so it costs
nothing in steady state. The checkpoint a run resumes from is the truth: at (re)start rank 0
commits its step and un-commits every later one. Rolled-back steps are trained again and
their segments rewritten, so :func:`read_sample_log` shows exactly what the model learned from.

At scale the log is a sampled audit: with more samples per epoch than ``sample_log_keys``
it keeps only the keys :func:`logs_key` picks (a hash of the key alone, so the same subset in
every epoch, on every rank and after every resume). "Each logged key exactly once per epoch"
stays exact for that subset, and the log stays ~0.1 % of a checkpoint at 3.49M samples instead
of ~4 % (``benchmarks/scale_sim.py``). The fraction is recorded in each ``COMMITTED`` marker.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from fusedist import storage
from fusedist.data import Cursor
from fusedist.models import state_dict_digest
from fusedist.models.arch import create_model
from fusedist.models.registry import get_spec
from fusedist.models.student import XmagStudent

log = logging.getLogger("fusedist.distill")

STATE_FILE = "fusedist_state.json"
EMA_FILE = "ema.pt"
DS_TAG = "ds"  # one checkpoint per folder, so a fixed tag
COMMITTED = "COMMITTED"


@dataclass
class TrainState:
    """What a checkpoint says about the run besides the weights."""

    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    """The epoch the next step belongs to."""
    cursor: dict[str, Any] | None = None
    """Merged data cursor (``Cursor.to_dict``) of ``epoch``."""
    samples: int = 0
    """Samples trained, all ranks."""
    weights_digest: str | None = None
    """sha256 of the training module's state dict at save (checked at restore)."""
    resumes: list[int] = field(default_factory=list)
    """Steps this run resumed from (worker restarts and re-runs), oldest first."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The student and its provenance: backbone, teacher, teacher_dim, grid, digests."""
    validation: dict[str, Any] | None = None
    """The EMA student's last validation (``global_cos``, ``local_cos``, ``tiles``, ``step``;
    ``fusedist.distill.validation``); ``None`` before the first or without validation."""


# ----------------------------------------------------------------------------- sample log

def _segment_url(run_url: str, step: int) -> str:
    return storage.join(run_url, "sample_log", f"step-{step:09d}")


def sample_log_fraction(max_keys: int | None, samples: int) -> float:
    """Share of an epoch's keys the sample log keeps: all up to ``max_keys``, else about
    ``max_keys`` of them (``None``: all, however many)."""
    if max_keys is None or samples <= max_keys:
        return 1.0
    return max_keys / samples


def logs_key(key: str, fraction: float) -> bool:
    """Whether a sample log at ``fraction`` records ``key``: a function of the key alone (crc32:
    the same answer in every process, epoch and resume), so an audit knows the expected subset."""
    return fraction >= 1.0 or zlib.crc32(key.encode()) < fraction * 2**32


class SampleLog:
    """One rank's trained sample keys since the last checkpoint (the :func:`logs_key` subset
    of them when ``fraction`` < 1)."""

    def __init__(self, run_url: str, rank: int, enabled: bool = True, fraction: float = 1.0):
        self.run_url, self.rank, self.enabled = run_url, rank, enabled
        self.fraction = fraction
        self._rows: list[str] = []

    def add(self, epoch: int, step: int, keys: Iterable[str]) -> None:
        if self.enabled:
            self._rows += [json.dumps({"epoch": epoch, "step": step, "key": k}) for k in keys
                           if logs_key(k, self.fraction)]

    def flush(self, step: int) -> None:
        """Write this rank's segment for the checkpoint at ``step`` (not yet committed)."""
        if self.enabled:
            url = storage.join(_segment_url(self.run_url, step), f"rank-{self.rank:05d}.jsonl")
            storage.write_text(url, "".join(r + "\n" for r in self._rows))
        self._rows = []

    def commit(self, step: int, checkpoint: str) -> None:
        """Mark the segments of ``step`` as part of a persisted checkpoint (rank 0)."""
        if self.enabled and self.rank == 0 and step > 0:
            storage.write_json(storage.join(_segment_url(self.run_url, step), COMMITTED),
                               {"step": step, "checkpoint": checkpoint,
                                "fraction": self.fraction})

    def rollback(self, after: int) -> None:
        """Un-commit the segments of steps after ``after``: the run resumes from there (rank 0)."""
        if not (self.enabled and self.rank == 0):
            return
        root = storage.join(self.run_url, "sample_log")
        for seg in storage.listdir(root):
            if seg.startswith("step-") and int(seg.strip("/").split("-")[1]) > after:
                storage.delete(storage.join(root, seg.rstrip("/"), COMMITTED))


def read_sample_log(run_url: str) -> dict[int, list[str]]:
    """Committed trained keys per epoch (a list: a key trained twice would appear twice)."""
    root = storage.join(run_url, "sample_log")
    out: dict[int, list[str]] = {}
    for seg in storage.listdir(root):
        seg_url = storage.join(root, seg.rstrip("/"))
        names = storage.listdir(seg_url)
        if COMMITTED not in names:
            continue
        for name in names:
            if name.endswith(".jsonl"):
                for line in storage.read_text(storage.join(seg_url, name)).splitlines():
                    row = json.loads(line)
                    out.setdefault(int(row["epoch"]), []).append(row["key"])
    return out


# ----------------------------------------------------------------------------- checkpoints

def _digest(module: torch.nn.Module) -> str:
    return state_dict_digest(module.state_dict())


@contextlib.contextmanager
def _local_copy(ckpt: Any, rank: int) -> Iterator[str]:
    """The checkpoint as a local folder: its own path on a local filesystem, else a download
    private to this rank. ``Checkpoint.as_directory`` shares one temp folder between the
    processes of a node, and the first rank done deletes it while another still waits on its
    lock ("Checkpoint directory ... does not exist, even though it should have been created
    by another process"): with two ranks on one node that failed a restore from S3."""
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        yield ckpt.path
        return
    tmp = tempfile.mkdtemp(prefix=f"fusedist-restore-rank{rank}-")
    try:
        yield ckpt.to_directory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Checkpointer:
    """Save/restore the DeepSpeed engine, the EMA and the train state inside a Ray Train loop."""

    def __init__(self, run_url: str, rank: int, world: int, sample_log: bool = True,
                 sample_fraction: float = 1.0):
        self.rank, self.world = rank, world
        self.samples = SampleLog(run_url, rank, sample_log, sample_fraction)
        self._pending: int | None = None  # step of a reported, not yet committed checkpoint

    def restore(self, engine: Any, ema: Any) -> TrainState | None:
        """Load the run's newest checkpoint into ``engine`` and ``ema``; None on a fresh run."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            self.samples.rollback(after=0)
            return None
        with _local_copy(ckpt, self.rank) as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            state = TrainState(**json.loads((Path(d) / STATE_FILE).read_text()))
            ema.load_state_dict(torch.load(Path(d) / EMA_FILE, map_location="cpu",
                                           weights_only=True))
        # A checkpoint missing a rank's partition or holding other weights must not train on.
        got = _digest(engine.module)
        if got != state.weights_digest:
            raise RuntimeError(f"checkpoint {ckpt.path} restored weights with digest {got[:12]} "
                               f"but was saved with {str(state.weights_digest)[:12]}")
        state.resumes.append(state.step)
        self.samples.rollback(after=state.step)
        self.samples.commit(state.step, ckpt.path)  # repairs a crash between report and commit
        log.info("rank %d: resumed at step %d (epoch %d) from %s", self.rank, state.step,
                 state.epoch, ckpt.path)
        return state

    def save(self, engine: Any, ema: Any, state: TrainState, cursor: Any,
             metrics: dict[str, Any]) -> None:
        """Every rank: save its DeepSpeed part, report the checkpoint, commit the sample log."""
        import ray.train
        import torch.distributed as dist
        from ray.train import Checkpoint

        # Each rank knows only its own slots' progress: merge so any rank can resume all.
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, cursor)
        state.cursor = Cursor.merge(parts).to_dict()
        state.weights_digest = _digest(engine.module)
        with tempfile.TemporaryDirectory(prefix="fusedist-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if self.rank == 0:
                torch.save(ema.state_dict(), Path(tmp) / EMA_FILE)
                (Path(tmp) / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            self.samples.flush(state.step)
            self.wait_committed()  # the previous one: long done by now
            ray.train.report({**metrics, "step": state.step, "epoch": state.epoch},
                             checkpoint=Checkpoint.from_directory(tmp))
        self._pending = state.step

    def wait_committed(self) -> None:
        """Block until the last reported checkpoint is committed by Ray Train's controller;
        rank 0 then commits its sample-log segments. Call once more after the last save."""
        if self._pending is None:
            return
        import ray.train
        from ray.train import CheckpointConsistencyMode

        done = ray.train.get_all_reported_checkpoints(
            consistency_mode=CheckpointConsistencyMode.COMMITTED)
        self.samples.commit(self._pending, done[-1].checkpoint.path if done else "")
        self._pending = None


# ----------------------------------------------------------------------------- reading back

def find_checkpoint(url: str) -> str:
    """``url`` itself if it is a checkpoint folder, else the newest checkpoint in a run folder."""
    url = url.rstrip("/")
    if storage.exists(storage.join(url, STATE_FILE)):
        return url
    best: tuple[int, str] | None = None
    for name in storage.listdir(url):
        sub = storage.join(url, name.rstrip("/"))
        if name.startswith("checkpoint_") and storage.exists(storage.join(sub, STATE_FILE)):
            step = int(storage.read_json(storage.join(sub, STATE_FILE))["step"])
            if best is None or step > best[0]:
                best = (step, sub)
    if best is None:
        raise FileNotFoundError(f"{url}: no distill checkpoint here ({STATE_FILE} missing) and "
                                "no checkpoint_* folder holding one")
    return best[1]


def read_state(checkpoint_url: str) -> TrainState:
    return TrainState(**storage.read_json(storage.join(checkpoint_url, STATE_FILE)))


def load_ema_student(checkpoint_url: str):
    """The EMA student of a checkpoint (local or s3://) as an fp32 XmagStudent, and its state."""
    state = read_state(checkpoint_url)
    m = state.meta
    spec = get_spec(m["student"])
    # Any init does: every weight is replaced by the EMA's (strict load below).
    student = XmagStudent(create_model(spec, "cpu", seed=0), teacher_dim=int(m["teacher_dim"]),
                          grid=int(m["grid"]), spec=spec,
                          weights_source=str(m.get("init_weights", "unknown")))
    raw = storage.read_bytes(storage.join(checkpoint_url, EMA_FILE))
    ema = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    student.load_state_dict(ema["module"], strict=True)
    return student.eval(), state
