"""``fusedist tile``'s input check: the slides exist (cheap: a listing, no Ray, no torch)."""

from __future__ import annotations

from fusedist import storage
from fusedist.tiling.config import TileConfig
from fusedist.tiling.job import discover


def check(cfg: TileConfig) -> None:
    """The input names at least one slide (``discover``'s own ConfigError otherwise)."""
    storage.configure(cfg.storage)
    discover(cfg)
