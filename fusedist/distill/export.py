"""Export the EMA student as a registry-compatible encoder, and register it (registry, MLflow).

An export folder (local or ``s3://``) holds two files:

- ``model.safetensors``: the backbone's state dict only (heads dropped), fp32, with the keys
  the backbone architecture has, so ``fusedist.models`` loads it strictly like any encoder;
- ``card.json``: what the encoder is (arch/kwargs, mean/std, input size, 5x mpp, CLS output,
  dim), where it came from (backbone, teacher + weights digest, data digest) and the weights'
  sha256. Written last: a folder with a card is a complete export.

``register_exported`` turns a folder (or its card) into a registry name, so
``build_encoder(name)`` and ``fusedist embed --encoder <folder or name>`` use the student.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fusedist import storage
from fusedist.distill.ema import unwrap
from fusedist.models import EncoderSpec, get_spec, register_from_dict, state_dict_digest
from fusedist.models.spec import TEST_PREFIX
from fusedist.models.student import XmagStudent

log = logging.getLogger("fusedist.distill")

CARD = "card.json"
WEIGHTS = "model.safetensors"
FORMAT = "fusedist.xmag-export/1"
STUDENT_MPP = 2.0  # the student sees 5x tiles (methods.md §1)
ARTIFACT_PATH = "xmag_student"

# Card keys that describe the saved file; a caller's card may not contradict them.
_DERIVED = ("format", "arch", "kwargs", "loader", "backbone", "input_size", "mean", "std", "dim",
            "output", "precision", "weights_file", "weights_sha256", "weights_digest")
# Card keys copied into the registry entry.
_SPEC_KEYS = ("name", "arch", "kwargs", "loader", "dim", "input_size", "mean", "std", "output",
              "precision", "mpp", "description", "license")

_EXPORTED: dict[str, str] = {}  # registry name -> local weights file, registered from a card
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


# -- writing ------------------------------------------------------------------------------------
def _fp32_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    # fp32 on disk: the registry computes in fp32 anyway, and the digest then equals the one a
    # loaded Encoder reports (it hashes the fp32 tensors it holds).
    # clone(): safetensors refuses tensors that share storage.
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
            .contiguous().clone() for k, v in module.state_dict().items()}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def build_card(student: XmagStudent, card: Mapping[str, Any], sha256: str,
               digest: str) -> dict[str, Any]:
    """The full card: derived fields from the student, the caller's provenance fields."""
    spec = student.spec
    if spec is None:
        raise ValueError("export_student needs a student built from the registry "
                         "(XmagStudent.from_registry): its spec names the architecture")
    derived: dict[str, Any] = {
        "format": FORMAT, "arch": spec.arch, "kwargs": dict(spec.kwargs), "loader": spec.loader,
        "backbone": spec.name, "input_size": spec.input_size, "mean": list(spec.mean),
        "std": list(spec.std), "dim": student.embed_dim, "output": "cls",
        "precision": spec.precision, "weights_file": WEIGHTS, "weights_sha256": sha256,
        "weights_digest": digest,
    }
    for key in _DERIVED:
        if key in card and card[key] != derived[key]:
            raise ValueError(f"card[{key!r}]={card[key]!r} contradicts the exported model "
                             f"({derived[key]!r}); leave derived keys out of the card")
    name = str(card.get("name") or f"xmag-{spec.name}-{sha256[:8]}")
    if name.startswith(TEST_PREFIX):
        raise ValueError(f"export name '{name}': '{TEST_PREFIX}*' names are reserved for "
                         "seeded random registry entries")
    teacher = card.get("teacher")
    base = {"name": name, "mpp": STUDENT_MPP, "teacher": teacher,
            "teacher_weights_digest": None, "data_digest": None, "created": _now(),
            "init_weights": getattr(student, "weights_source", "unknown"),
            "description": f"XMAG student ({spec.name} backbone, 5x) distilled from "
                           f"{teacher or 'a teacher'}",
            "license": card.get("license", "")}
    return {**base, **dict(card), **derived, "name": name}


def export_student(student: nn.Module, out_dir: str, card: Mapping[str, Any]) -> str:
    """Write ``<out_dir>/model.safetensors`` (backbone) and ``<out_dir>/card.json``; return
    ``out_dir``. ``student``: the EMA copy (an :class:`XmagStudent`, wrappers allowed)."""
    student = unwrap(student)
    if not isinstance(student, XmagStudent):
        raise TypeError(f"export_student expects an XmagStudent, got {type(student).__name__}")
    from safetensors.torch import save_file

    sd = _fp32_state_dict(student.backbone)
    # Re-exporting into a folder: drop the old card first, so no moment exists in which a
    # complete-looking export pairs the old card with the new weights.
    storage.delete(storage.join(out_dir, CARD))
    with tempfile.TemporaryDirectory(prefix="fusedist-export-") as tmp:
        path = Path(tmp) / WEIGHTS
        save_file(sd, str(path), metadata={"format": "pt"})
        full = build_card(student, card, file_sha256(path), state_dict_digest(sd))
        storage.upload_file(path, storage.join(out_dir, WEIGHTS))
    storage.write_json(storage.join(out_dir, CARD), full)  # last: marks the export complete
    log.info("exported XMAG student '%s' to %s (sha256 %s)", full["name"], out_dir,
             full["weights_sha256"][:12])
    return out_dir


# -- registering --------------------------------------------------------------------------------
def _card_url(path_or_url: str) -> str:
    u = str(path_or_url).rstrip("/")
    return u if u.endswith(".json") else storage.join(u, CARD)


def _folder(card_url: str) -> str:
    return card_url.rsplit("/", 1)[0] if "/" in card_url else "."


def _local_weights(card: Mapping[str, Any], card_url: str) -> Path:
    url = storage.join(_folder(card_url), str(card.get("weights_file", WEIGHTS)))
    path = (storage.fetch_local(url, subdir="models") if storage.is_s3(url)
            else storage.local_path(url).expanduser().resolve())
    if not path.is_file():
        raise FileNotFoundError(f"export card {card_url} names weights {url}, which is missing")
    _verify_sha(path, card, card_url)
    return path


def _verify_sha(path: Path, card: Mapping[str, Any], card_url: str) -> None:
    """A card describing other weights than the file beside it is an error, not a warning."""
    expected = card.get("weights_sha256")
    if not expected:
        return
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:  # hash a file once per version: re-registering stays cheap
        _SHA_CACHE[key] = file_sha256(path)
    if _SHA_CACHE[key] != expected:
        raise ValueError(f"{path}: sha256 {_SHA_CACHE[key][:12]} does not match "
                         f"{card_url} (weights_sha256 {str(expected)[:12]}); re-export the model")


def _spec_data(card: Mapping[str, Any], weights: Path) -> dict[str, Any]:
    data = {k: card[k] for k in _SPEC_KEYS if k in card}
    # Forward compatible: once EncoderSpec has a default local weights field, fill it, so
    # build_encoder(name) needs no weights= argument.
    if "weights" in {f.name for f in dataclasses.fields(EncoderSpec)}:
        data["weights"] = str(weights)
    return data


def register_exported(path_or_url: str) -> str:
    """Register the export at ``path_or_url`` (its folder or card.json, local or s3://) and
    return its encoder name. Idempotent; re-registering a re-exported name replaces it."""
    card_url = _card_url(path_or_url)
    try:
        card = storage.read_json(card_url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no exported model at {path_or_url}: {card_url} is missing "
                                "(an export is complete once its card.json exists)") from e
    if card.get("format") != FORMAT:
        raise ValueError(f"{card_url} is not a fusedist XMAG export card "
                         f"(format {card.get('format')!r}, expected {FORMAT!r})")
    weights = _local_weights(card, card_url)
    name = str(card["name"])
    try:
        register_from_dict(_spec_data(card, weights), overwrite=name in _EXPORTED)
    except ValueError as e:
        raise ValueError(f"cannot register export {card_url} as '{name}': {e}") from e
    _EXPORTED[name] = str(weights)
    return name


def exported_weights(name: str) -> str | None:
    """The local weights file of an encoder registered by :func:`register_exported`."""
    return _EXPORTED.get(name)


def resolve_encoder(name_or_path: str, tracking_uri: str | None = None) -> str:
    """A registry name as is; a path/URL to an export folder or its card -> its name; an
    MLflow model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, is downloaded
    (:func:`fetch_registered`, MLflow at ``tracking_uri``) and registered like a folder."""
    s = str(name_or_path)
    from fusedist import mlmodels

    if mlmodels.is_registry_uri(s):
        return register_exported(fetch_registered(s, tracking_uri))
    try:
        get_spec(s)
        return s
    except KeyError:
        pass
    if (storage.is_s3(s) or s.startswith("file://") or s.endswith(".json")
            or Path(s).expanduser().exists()):
        return register_exported(s)
    get_spec(s)  # raises the registry's KeyError, with close names
    return s


# -- MLflow ----------------------------------------------------------------------------------
def fetch_registered(uri: str, tracking_uri: str | None = None) -> str:
    """The local export folder of the MLflow model ``uri`` names (its ``export`` artifact),
    downloaded once per registry and version into ``<cache>/mlflow/`` (a version never
    changes; an alias is resolved to its version first)."""
    import os

    from fusedist import mlmodels
    from fusedist.distill.pyfunc import ARTIFACT

    tracking_uri = tracking_uri or mlmodels.default_tracking_uri()
    r = mlmodels.resolve(uri, tracking_uri)
    registry = hashlib.sha256(mlmodels.registry_uri(tracking_uri).encode()).hexdigest()[:16]
    dest = storage.cache_dir() / "mlflow" / registry / r.model_uri[len(mlmodels.SCHEME):]
    marker = dest / "export-path"  # written last: the download is complete
    if not marker.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
            try:
                folder, _ = mlmodels.download(r.model_uri, tmp, tracking_uri, ARTIFACT)
            except ValueError as e:
                raise ValueError(f"{uri}: {e}") from None
            (Path(tmp) / marker.name).write_text(folder.relative_to(tmp).as_posix())
            try:
                os.replace(tmp, dest)  # atomic: another process may have finished first
            except OSError:
                if not marker.is_file():
                    raise
            Path(tmp).mkdir(exist_ok=True)  # for TemporaryDirectory's cleanup
    log.info("%s is %s (%s)", uri, r.model_uri, dest)
    return str(dest / marker.read_text().strip())


def _local_copy(export_dir: str, tmp: Path) -> Path:
    if not storage.is_s3(export_dir):
        return storage.local_path(export_dir)
    for name in (WEIGHTS, CARD):
        shutil.copyfile(storage.fetch_local(storage.join(export_dir, name), subdir="models"),
                        tmp / name)
    return tmp


def register_in_mlflow(tracker: Any, export_dir: str, model_name: str, alias: str = "latest",
                       artifact_path: str = ARTIFACT_PATH) -> str | None:
    """Log the export folder as an ``mlflow.pyfunc`` model (``artifact_path``) of
    ``tracker``'s run and register it as a new version of ``model_name`` with ``alias``
    (MLflow 3: aliases, not stages); an export whose files a version already holds reuses
    that version (:func:`fusedist.mlmodels.publish`). Returns the version; ``None`` for a
    no-op tracker (rank != 0, tracking disabled). See :mod:`fusedist.distill.pyfunc` for what the model
    takes and gives; ``fusedist embed -e models:/<name>@<alias>`` uses it as an encoder.

    ``alias="latest"`` is MLflow's reserved name: it is not set (``models:/<name>/latest``
    already means the newest version); any other alias moves to the new version."""
    if not getattr(tracker, "active", False):
        return None
    from fusedist import mlmodels
    from fusedist.distill.pyfunc import log_student
    from fusedist.distill.validation import validation_tags

    card = storage.read_json(storage.join(export_dir, CARD))
    tags = {k: str(card[k]) for k in ("name", "backbone", "teacher", "weights_sha256",
                                      "data_digest", "init_weights") if card.get(k) is not None}
    tags.update(validation_tags(card))  # validation.global_cos, .local_cos, ... (if validated)
    with tempfile.TemporaryDirectory(prefix="fusedist-mlflow-") as tmp:
        local = _local_copy(export_dir, Path(tmp))
        pub = mlmodels.publish(tracker, local,
                               lambda: log_student(tracker, local, card, artifact_path),
                               model_name, alias, tags=tags,
                               description=card.get("description"))
    return pub.version
