"""Cheap input checks a stage runs before Ray starts and before torch/scipy are imported.

A missing path, an empty folder, an unknown encoder or a bad labels file should fail in about
a second with the message the stage itself would give, not after Ray (~10 s) and torch (~3 s)
have started. Each check reads only manifests, folder listings and CSV headers, and raises the
same ``ConfigError`` the stage raises later (it calls the stage's own helpers), so the message
is the same whichever runs first. Stages call their check before ``init_ray``; the CLI calls
it before importing the stage's module (``fusedist fuse`` and ``distill`` import torch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fusedist import storage
from fusedist.config import ConfigError


def known_encoder_names() -> set[str]:
    """Built-in encoder names, plus any registered in this process (without importing torch:
    the registry module is only consulted once something else has imported it)."""
    from fusedist.models.catalog import BUILTIN

    names = {s.name for s in BUILTIN}
    registry = sys.modules.get("fusedist.models.registry")
    if registry is not None:
        names |= set(registry._REGISTRY)
    return names


def _is_export_ref(ref: str) -> bool:
    # The same test as fusedist.distill.export.resolve_encoder: these are loaded later.
    return (storage.is_s3(ref) or ref.startswith(("file://", "models:/")) or ref.endswith(".json")
            or Path(ref).expanduser().exists())


def check_encoder_refs(refs: list[Any]) -> None:
    """Every encoder reference is a registered name or an export folder/card."""
    from fusedist.models.spec import unknown_encoder_message

    names = known_encoder_names()
    for ref in refs:
        if ref.name not in names and not _is_export_ref(ref.name):
            raise ConfigError(unknown_encoder_message(ref.name, names))


def check_cache(cfg: Any) -> None:
    """``fusedist cache``: the tile dataset exists and every teacher is known."""
    storage.configure(cfg.storage)
    from fusedist.features.runtime import read_tile_manifest

    read_tile_manifest(cfg.tiles)
    check_encoder_refs(cfg.teachers)


def check_embed(cfg: Any) -> None:
    """``fusedist embed``: the grid tiles (or the slides to tile) exist; encoders are known."""
    storage.configure(cfg.storage)
    check_encoder_refs(cfg.encoders)
    if cfg.tiles:
        from fusedist.features.embed import grid_manifest

        grid_manifest(cfg.tiles)
    elif cfg.slides:
        from fusedist.tiling import TileConfig
        from fusedist.tiling.job import discover

        discover(TileConfig(input=cfg.slides, output=cfg.output, storage=cfg.storage))


def check_fuse(cfg: Any) -> None:
    """``fusedist fuse``: the labels CSV parses for the task and the bags folder has bags."""
    storage.configure(cfg.storage)
    from fusedist.fusion.data import (bag_index, discover_encoders, keyed_rows,
                                      parse_targets, read_labels)

    rows, cols = read_labels(cfg.labels)
    parse_targets(cfg, keyed_rows(rows, cols), cols)
    from fusedist.fusion.units import join_patients, label_key, resolve_unit

    key = label_key(cfg.labels, cols)
    if resolve_unit(cfg, key) == "patient":  # the clinical table meets the slide table
        join_patients(cfg, keyed_rows(rows, cols), key)
    elif cfg.slides:
        from fusedist.formats.slide_table import read_slide_table

        read_slide_table(cfg.slides)
    bag_index(cfg, discover_encoders(cfg))


def pair_manifests(cfg: Any) -> tuple[dict, dict]:
    """``fusedist distill``: the tile and feature manifests (both must exist)."""
    storage.configure(cfg.storage)
    tiles, feats = cfg.tiles.rstrip("/"), cfg.features.rstrip("/")
    try:
        return (storage.read_json(storage.join(tiles, "manifest.json")),
                storage.read_json(storage.join(feats, "manifest.json")))
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; make tiles with `fusedist tile --mode pairs` and features with "
                          "`fusedist cache`") from None


def check_distill(cfg: Any) -> None:
    pair_manifests(cfg)
