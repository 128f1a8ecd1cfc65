"""``fusedist distill``'s input check, run before Ray and torch: the pairs tile dataset and
the teacher's feature dataset both have their manifests."""

from __future__ import annotations

from typing import Any

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.formats.feature_manifest import read_feature_manifest
from fusedist.formats.tile_manifest import read_manifest


def pair_manifests(cfg: Any) -> tuple[dict, dict]:
    """The tile and feature manifests of ``cfg.tiles`` / ``cfg.features`` (both must exist)."""
    storage.configure(cfg.storage)
    tiles, feats = cfg.tiles.rstrip("/"), cfg.features.rstrip("/")
    try:
        return read_manifest(tiles), read_feature_manifest(feats)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; make tiles with `fusedist tile --mode pairs` and features with "
                          "`fusedist cache`") from None


def check(cfg: Any) -> None:
    pair_manifests(cfg)
