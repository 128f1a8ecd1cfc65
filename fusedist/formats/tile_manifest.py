"""The tile manifest: ``<tiles>/<dataset>/manifest.json``, written last by ``fusedist tile``.

It names the tiling config (and its digest), every slide seen (ok, failed or skipped) and
every shard with its sample count and sha256 (docs/formats.md). Every reader of a tile
dataset goes through this module: :func:`read_tile_manifest` (a tile dataset, checked),
:func:`read_manifest` (a dataset folder's manifest as is: the shard reader reads tile and
feature datasets alike), :func:`tiled_slides`; ``fusedist tile`` writes it with :func:`write`.
"""

from __future__ import annotations

from fusedist import storage
from fusedist.config import ConfigError

MANIFEST = "manifest.json"
FORMAT = "fusedist.tiles/1"


def manifest_url(dataset_url: str) -> str:
    """``<dataset_url>/manifest.json``."""
    return storage.join(dataset_url.rstrip("/"), MANIFEST)


def exists(dataset_url: str) -> bool:
    return storage.exists(manifest_url(dataset_url))


def read_manifest(dataset_url: str) -> dict:
    """The manifest of a dataset folder, as written; ``FileNotFoundError`` when it has none."""
    return storage.read_json(manifest_url(dataset_url))


def read_tile_manifest(url: str) -> dict:
    """The tile dataset's manifest, or a clear error saying to run ``fusedist tile``."""
    murl = manifest_url(url)
    if not storage.exists(murl):
        raise ConfigError(f"no tile dataset at {url} (no manifest.json); make one with "
                          "`fusedist tile`, or point --tiles at <tiles>/<dataset>")
    m = storage.read_json(murl)
    if not str(m.get("format", "")).startswith("fusedist.tiles/"):
        raise ConfigError(f"{murl} is not a fusedist tile manifest (format "
                          f"{m.get('format')!r})")
    return m


def tiled_slides(dataset_url: str) -> set[str]:
    """Slides a tile dataset's manifest lists (ok, failed or skipped: all were seen); none
    when the dataset has no manifest yet."""
    if not exists(dataset_url):
        return set()
    return {s["slide_id"] for s in read_manifest(dataset_url)["slides"]}


def write(dataset_url: str, manifest: dict) -> None:
    """Write the manifest (last: it lists only shards that are done)."""
    storage.write_json(storage.join(dataset_url, MANIFEST), manifest)
