"""The feature manifest: ``<features>/<teacher>/<dataset>/manifest.json``, written by
``fusedist cache`` once its shards are done.

It mirrors the tile manifest's shard list (same names and sample counts) and adds the
teacher, its weights digest, the feature ``dim``/dtype/sample shape and the source tile
dataset (docs/formats.md). ``fusedist distill`` reads it with :func:`read_feature_manifest`.
"""

from __future__ import annotations

from fusedist import storage
from fusedist.formats.tile_manifest import manifest_url

MANIFEST = "manifest.json"
FORMAT = "fusedist.features/1"


def read_feature_manifest(dataset_url: str) -> dict:
    """The feature dataset's manifest; ``FileNotFoundError`` when there is none."""
    return storage.read_json(manifest_url(dataset_url))


def write(dataset_url: str, manifest: dict) -> None:
    storage.write_json(storage.join(dataset_url, MANIFEST), manifest)
