"""Student data: ``lo.jpg`` from tile shards zipped with the teacher's cached feature shards.

Each rank streams its part of every epoch through :class:`~fusedist.data.ShardReader`
(``equal=True``: all ranks take the same number of steps) and a resumable
:class:`~fusedist.data.Cursor`; JPEG decode happens in the DataLoader workers.
An epoch has the same number of optimiser steps on every rank and in every epoch:
``steps_per_epoch`` below, after dropping each slot's tail that does not fill a micro-batch and
the micro-batches that do not fill an accumulation step.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.data import Cursor, ShardReader
from fusedist.data.reader import DatasetMismatchError, slot_block
from fusedist.distill.check import pair_manifests
from fusedist.distill.config import DistillConfig
from fusedist.distill.split import split_by_slide


@dataclass(frozen=True)
class DataInfo:
    """What the driver learns from the manifests before any worker starts."""

    teacher: str
    dim: int
    samples: int
    teacher_weights_digest: str
    teacher_random_weights: bool
    data_digest: str
    train_shards: tuple[str, ...] | None = None
    """The shards training reads (``None``: all); the validation slides' shards are not."""
    val_shards: tuple[str, ...] = ()
    """The held-out validation slides' shards (``fusedist.distill.validation``)."""
    split: dict[str, Any] | None = None
    """``Split.to_dict()``: the validation slides, their tiles, the training counts."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def dataset_info(cfg: DistillConfig) -> DataInfo:
    """Check that ``tiles`` is a pairs dataset mirrored by a teacher feature dataset, and
    split its slides into training and validation (``samples``: the training samples)."""
    tiles, feats = cfg.tiles.rstrip("/"), cfg.features.rstrip("/")
    tm, fm = pair_manifests(cfg)
    if tm.get("mode") != "pairs" or fm.get("mode") != "pairs":
        raise ConfigError(f"XMAG needs pairs tiles and pairs features; {tiles} is "
                          f"'{tm.get('mode')}', {feats} is '{fm.get('mode')}'")
    if cfg.teacher is not None and fm.get("teacher") != cfg.teacher:
        raise ConfigError(f"{feats} holds features of '{fm.get('teacher')}', not of "
                          f"teacher={cfg.teacher}; point `features` at "
                          f"<features>/{cfg.teacher}/<dataset>")
    split = split_by_slide(tm, cfg.validation.fraction, cfg.validation.seed)
    try:
        reader = ShardReader([tiles, feats], equal=True, rank=0,
                             world_size=cfg.scaling.num_workers, shards=split.train_shards)
    except DatasetMismatchError as e:
        raise ConfigError(f"tiles and features do not mirror each other: {e}") from None
    # Content digest: the exact shards (by sha256) of both datasets.
    digest = hashlib.sha256(json.dumps(
        [[s.get("sha256") for s in tm["shards"]], [s.get("sha256") for s in fm["shards"]]]
    ).encode()).hexdigest()
    return DataInfo(teacher=str(fm["teacher"]), dim=int(fm["dim"]), samples=reader.total,
                    teacher_weights_digest=str(fm.get("weights_digest", "")),
                    teacher_random_weights=bool(fm.get("random_weights", False)),
                    data_digest=digest, train_shards=split.train_shards,
                    val_shards=split.val_shards, split=split.to_dict())


def steps_per_epoch(total: int, world: int, loader_workers: int, micro_batch: int,
                    accumulation: int) -> int:
    """Optimiser steps per epoch (the same on every rank; see the module docstring)."""
    w = max(1, loader_workers)
    per_slot = slot_block(total, world * w, 0, equal=True)[1]  # equal: every slot the same
    return (w * (per_slot // micro_batch)) // accumulation


class PairDecoder:
    """Runs in DataLoader workers: ``lo.jpg`` -> uint8 (3, H, W); ``<teacher>.npy`` -> float16
    (16, D) (kept half precision: half the bytes through the worker pipes)."""

    def __init__(self, teacher: str):
        self.member = f"{teacher}.npy"

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        from PIL import Image

        with Image.open(io.BytesIO(sample["lo.jpg"])) as im:
            img = np.asarray(im.convert("RGB"))
        feats = np.load(io.BytesIO(sample[self.member]), allow_pickle=False)
        out = {k: v for k, v in sample.items() if k.startswith("__")}
        out["image"] = torch.from_numpy(img.copy()).permute(2, 0, 1)
        out["target"] = torch.from_numpy(feats.astype(np.float16, copy=False))
        return out


class DistillData:
    """One rank's micro-batches, epoch by epoch, resumable mid-epoch from a merged cursor."""

    def __init__(self, cfg: DistillConfig, teacher: str, rank: int, world: int,
                 cursor: Mapping[str, Any] | None = None, pin_memory: bool = False,
                 shards: Sequence[str] | None = None):
        b = cfg.batch
        # shards: the training slides' shards only (validation slides are never read here).
        self.reader = ShardReader([cfg.tiles, cfg.features], seed=b.seed,
                                  shuffle_buffer=b.shuffle_buffer, interleave=b.interleave,
                                  equal=True, rank=rank, world_size=world, cursor=cursor,
                                  decode=PairDecoder(teacher), shards=shards)
        self.loader_workers, self.micro_batch = b.loader_workers, b.micro_batch
        self.accumulation = b.accumulation
        self.pin_memory = pin_memory
        self.cursor = (Cursor.from_dict(cursor) if cursor is not None
                       else self.reader.cursor(self.loader_workers))
        self.steps_per_epoch = steps_per_epoch(self.reader.total, world, b.loader_workers,
                                               b.micro_batch, b.accumulation)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{self.reader.total} samples are too few for {world} worker(s) x "
                              f"{max(1, b.loader_workers)} loader worker(s) x micro_batch "
                              f"{b.micro_batch} x accumulation {b.accumulation}")

    def epoch(self, epoch: int, step: int) -> Iterator[dict[str, Any]]:
        """The micro-batches of ``epoch`` still to train, given ``step`` optimiser steps done."""
        if self.cursor.epoch != epoch:
            self.cursor = Cursor(epoch, self.cursor.world, {}, self.cursor.fingerprint)
        self.reader.set_epoch(epoch)
        left = (self.steps_per_epoch * (epoch + 1) - step) * self.accumulation
        loader = DataLoader(self.reader, batch_size=self.micro_batch,
                            num_workers=self.loader_workers, drop_last=True,
                            pin_memory=self.pin_memory,
                            # Non-persistent: workers must see set_epoch (ShardReader docs).
                            persistent_workers=False)
        # Stop at the last full accumulation step: every rank stops at the same step.
        yield from itertools.islice(loader, max(0, left))

    def consumed(self, batch: Mapping[str, Any]) -> None:
        self.cursor.update(batch)

    def end_epoch(self) -> None:
        self.cursor = self.cursor.next_epoch()
