"""Lineage: every stage's MLflow run lists the data it read and wrote as MLflow datasets.

A dataset here is metadata only (an MLflow ``MetaDataset``): a name, the URL it lives at (its
source) and a digest that changes when its content does. The same data gets the same name and
digest in every run that touches it, so MLflow's UI (a run's *Datasets* panel, the
experiment's dataset filter) links the run that wrote it to the runs that read it: from a
registered fused model's run to its labels and bag folders, from those to the embed run that
wrote them and its tile dataset, whose manifest lists the slides.

=================================  ==========================================================
name                               digest
=================================  ==========================================================
``tiles/<dataset>``                sha256 of the tile dataset's ``manifest.json`` (which
                                   holds every shard's sha256 and every slide)
``features/<teacher>/<dataset>``   sha256 of the feature dataset's ``manifest.json``
``bags/<encoder>``                 each bag's file name and size and, for bags fusedist
                                   embedded, the weights and source digests it was made from
``labels/<file>``                  sha256 of the labels file
=================================  ==========================================================

Digests are the first 32 hex characters of the sha256 (MLflow keeps at most 36). The role is
MLflow's ``mlflow.data.context`` input tag: ``input`` or ``output``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

from fusedist import storage
from fusedist.secrets import mask_text
from fusedist.state import StageState

INPUT, OUTPUT = "input", "output"
DIGEST_CHARS = 32  # of the sha256 hex; MLflow's dataset digest holds at most 36
MANIFEST = "manifest.json"
_USERINFO_RE = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


@dataclass(frozen=True)
class DataRef:
    """One dataset a run read or wrote."""

    name: str
    url: str
    digest: str
    role: str = INPUT


def _short(h: Any) -> str:
    return h.hexdigest()[:DIGEST_CHARS]


def source_url(url: str) -> str:
    """``url`` as a dataset source: local paths absolute, no user info (credentials) in it."""
    if "://" not in url:
        return str(storage.local_path(url).expanduser().resolve())
    return mask_text(_USERINFO_RE.sub(r"\g<scheme>", url))


def file_ref(name: str, url: str, role: str = INPUT) -> DataRef:
    """A dataset whose digest is that of one file (a manifest, a labels table)."""
    return DataRef(name, url, _short(hashlib.sha256(storage.read_bytes(url))), role)


def tiles_ref(dataset_url: str, role: str = INPUT) -> DataRef:
    """A tile dataset (``<tiles>/<dataset>``), by its manifest."""
    url = storage.join(dataset_url.rstrip("/"), MANIFEST)
    dataset = storage.read_json(url).get("dataset") or storage.basename(dataset_url)
    return file_ref(f"tiles/{dataset}", url, role)


def features_ref(dataset_url: str, role: str = INPUT) -> DataRef:
    """A cached-feature dataset (``<features>/<teacher>/<dataset>``), by its manifest."""
    url = storage.join(dataset_url.rstrip("/"), MANIFEST)
    m = storage.read_json(url)
    teacher = m.get("teacher") or m.get("encoder") or storage.basename(
        dataset_url.rstrip("/").rsplit("/", 1)[0])
    dataset = m.get("dataset") or storage.basename(dataset_url)
    return file_ref(f"features/{teacher}/{dataset}", url, role)


def labels_ref(url: str, role: str = INPUT) -> DataRef:
    return file_ref(f"labels/{storage.basename(url)}", url, role)


def bags_ref(folder: str, encoder: str, role: str = INPUT) -> DataRef:
    """A bag folder (``<bags>/<encoder>``): one listing, plus the done-entries of the bags
    fusedist embedded (what made each bag), so re-embedding with other weights changes it."""
    from fusedist.formats.bags import list_bags  # lazy: keeps h5py out of the CLI's start-up

    folder = folder.rstrip("/")
    urls = list_bags(folder)
    sizes: dict[str, int] = {}
    for parent in sorted({u.rsplit("/", 1)[0] for u in urls.values()}):
        sizes.update({storage.join(parent, n): b for n, b in storage.file_sizes(parent).items()})
    state = StageState(folder.rsplit("/", 1)[0] if "/" in folder else ".", "bags",
                       storage.basename(folder))
    have = set(state.names())  # one listing; none for bags fusedist did not write
    entries = state.read_many(sid for sid in urls if sid in have)
    rows = [[sid, storage.basename(u), sizes.get(u),
             (entries.get(sid) or {}).get("weights_digest"),
             (entries.get(sid) or {}).get("source_digest")] for sid, u in sorted(urls.items())]
    digest = _short(hashlib.sha256(json.dumps(rows).encode()))
    return DataRef(f"bags/{encoder}", folder, digest, role)


def dataset_inputs(refs: Iterable[DataRef]) -> list[Any]:
    """MLflow ``DatasetInput`` entities of ``refs`` (duplicates dropped)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out, seen = [], set()
    for r in refs:
        if (r.name, r.digest, r.role) in seen:
            continue
        seen.add((r.name, r.digest, r.role))
        ds = MetaDataset(_source(source_url(r.url)), name=r.name, digest=r.digest)
        out.append(DatasetInput(ds._to_mlflow_entity(),
                                [InputTag(MLFLOW_DATASET_CONTEXT, r.role)]))
    return out


def _source(url: str) -> Any:
    """MLflow's source for ``url`` (local, s3 or http artifact source)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all alike here
        warnings.simplefilter("ignore")
        return resolve_dataset_source(url)
