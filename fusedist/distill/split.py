"""The train/validation split of a distillation's tile manifest, by slide (no torch).

The slides of the tile manifest (each shard names its ``slide_id``) are ranked by
``sha256(seed, slide_id)`` and the first ``round(fraction * n)`` are held out (at least one
when ``fraction > 0`` and there are two or more slides, never all); every shard of a held-out
slide goes to validation (:mod:`fusedist.distill.validation` scores the student on them). A
slide's side depends only on its id, the seed and the count, not on the order of the manifest.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

from fusedist.shards import shard_slide_id


@dataclass(frozen=True)
class Split:
    """Which slides (and so which shards) train and which validate."""

    fraction: float
    seed: int
    val_slides: tuple[str, ...]
    val_shards: tuple[str, ...]
    train_shards: tuple[str, ...]
    val_tiles: int
    train_tiles: int
    train_slides: int

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "slides": list(self.val_slides),
                "shards": list(self.val_shards), "tiles": self.val_tiles,
                "train_slides": self.train_slides, "train_tiles": self.train_tiles}


def shard_slide(entry: Mapping[str, Any]) -> str:
    """The slide a tile-manifest shard entry belongs to (``slide_id``, else its name
    ``<slide_id>-<part>.tar``, which parses back to one slide: docs/formats.md)."""
    if entry.get("slide_id"):
        return str(entry["slide_id"])
    return shard_slide_id(str(entry["name"]))


def _rank_key(seed: int, slide: str) -> str:
    return hashlib.sha256(f"fusedist.validation:{seed}:{slide}".encode()).hexdigest()


def held_out_count(n_slides: int, fraction: float) -> int:
    """Slides held out of ``n_slides``: ``fraction`` rounded half up, at least one when
    ``fraction > 0`` and two or more slides exist, always leaving one to train on."""
    if fraction <= 0 or n_slides < 2:
        return 0
    return min(n_slides - 1, max(1, math.floor(fraction * n_slides + 0.5)))


def split_by_slide(manifest: Mapping[str, Any], fraction: float, seed: int) -> Split:
    """The deterministic train/validation split of a tile manifest's shards, by slide."""
    by_slide: dict[str, list[Mapping[str, Any]]] = {}
    for s in manifest["shards"]:
        by_slide.setdefault(shard_slide(s), []).append(s)
    ranked = sorted(by_slide, key=lambda sid: (_rank_key(seed, sid), sid))
    val = set(ranked[:held_out_count(len(ranked), fraction)])
    val_shards = [s for s in manifest["shards"] if shard_slide(s) in val]
    train_shards = [s for s in manifest["shards"] if shard_slide(s) not in val]
    return Split(fraction=fraction, seed=seed, val_slides=tuple(sorted(val)),
                 val_shards=tuple(str(s["name"]) for s in val_shards),
                 train_shards=tuple(str(s["name"]) for s in train_shards),
                 val_tiles=sum(int(s["samples"]) for s in val_shards),
                 train_tiles=sum(int(s["samples"]) for s in train_shards),
                 train_slides=len(by_slide) - len(val))
