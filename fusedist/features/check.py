"""Cheap input checks of ``fusedist cache`` and ``fusedist embed``, run before Ray starts and
before torch is imported: a missing tile dataset, a pairs dataset given to embed, an empty
slide folder or an unknown encoder fails in about a second with the stage's own message."""

from __future__ import annotations

from typing import Any

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.formats.tile_manifest import read_tile_manifest
from fusedist.models.refs import check_encoder_refs


def grid_manifest(url: str) -> dict:
    """The manifest of a grid tile dataset (a pairs dataset cannot be embedded)."""
    tm = read_tile_manifest(url)
    if tm["mode"] != "grid":
        raise ConfigError(f"{url} holds '{tm['mode']}' tiles; embed needs a grid "
                          "dataset (fusedist tile --mode grid)")
    return tm


def check_cache(cfg: Any) -> None:
    """``fusedist cache``: the tile dataset exists and every teacher is known."""
    storage.configure(cfg.storage)
    read_tile_manifest(cfg.tiles)
    check_encoder_refs(cfg.teachers)


def check_embed(cfg: Any) -> None:
    """``fusedist embed``: the grid tiles (or the slides to tile) exist; encoders are known."""
    storage.configure(cfg.storage)
    check_encoder_refs(cfg.encoders)
    if cfg.tiles:
        grid_manifest(cfg.tiles)
    elif cfg.slides:
        # lazy: tiling imports scipy and PIL, which checking a tile dataset does not need
        from fusedist.tiling import TileConfig
        from fusedist.tiling.check import check as check_tile

        check_tile(TileConfig(input=cfg.slides, output=cfg.output, storage=cfg.storage))
