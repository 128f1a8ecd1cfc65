"""Export the EMA student as a registry-compatible encoder, and register it (registry, MLflow).

An export folder (local or ``s3://``) holds two files:

- ``model.safetensors``: the backbone's state dict only (heads dropped), fp32, with the keys
  the backbone architecture has, so ``fusedist.models`` loads it strictly like any encoder;
- ``card.json``: what the encoder is (arch/kwargs, mean/std, input size, 5x mpp, CLS output,
  dim), where it came from (backbone, teacher + weights digest, data digest) and the weights'
  sha256. Written last: a folder with a card is a complete export.

This module writes exports; reading and verifying one is :mod:`fusedist.formats.export_card`,
and :func:`fusedist.models.refs.register_exported` turns a folder (or its card) into a registry
name, so ``build_encoder(name)`` and ``fusedist embed --encoder <folder or name>`` use the
student.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fusedist import mlmodels, storage
from fusedist.distill.ema import unwrap
from fusedist.distill.validation import validation_tags
from fusedist.formats.export_card import CARD, FORMAT, WEIGHTS, file_sha256
from fusedist.models.spec import TEST_PREFIX
from fusedist.models.student import XmagStudent
from fusedist.models.weights import state_dict_digest

log = logging.getLogger("fusedist.distill")

STUDENT_MPP = 2.0  # the student sees 5x tiles (methods.md §1)
ARTIFACT_PATH = "xmag_student"

# Card keys that describe the saved file; a caller's card may not contradict them.
_DERIVED = ("format", "arch", "kwargs", "loader", "backbone", "input_size", "mean", "std", "dim",
            "output", "precision", "weights_file", "weights_sha256", "weights_digest")


# -- writing ------------------------------------------------------------------------------------
def _fp32_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    # fp32 on disk: the registry computes in fp32 anyway, and the digest then equals the one a
    # loaded Encoder reports (it hashes the fp32 tensors it holds).
    # clone(): safetensors refuses tensors that share storage.
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
            .contiguous().clone() for k, v in module.state_dict().items()}


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


# -- MLflow ----------------------------------------------------------------------------------
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
    # lazy: distill.pyfunc imports mlflow, which only registering in MLflow needs
    from fusedist.distill.pyfunc import log_student

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
