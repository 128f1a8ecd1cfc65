"""The fused model as an ``mlflow.pyfunc`` model.

Input: a pandas DataFrame, one row per slide (a dict is one slide), with columns

    slide_id           string; FuseCPath seeds its sub-bag plan with it, as in training
    patient_id         the slide's patient: needed by a model fused with ``unit: patient``
                       (its card), which predicts patients; a slide model's signature has no
                       such column (MLflow drops it, predict_rows ignores it)
    <encoder>          that encoder's bag features, an (N, D) array (or list of rows), one
                       column per encoder the card names
    <encoder>.coords   optional (N, 2) level-0 tile coordinates. The feature group's
                       encoders are matched on shared tiles by these, like `fusedist predict`
                       does; without them the group's bags must list the same tiles in the
                       same order (same N)

A column of 2-D arrays, not a tensor input: bags of different slides (and encoders) have
different tile counts, which MLflow tensors (one fixed shape per call) cannot hold.
:func:`bags_frame` builds the frame from a folder of bags (fusedist, TRIDENT or CLAM), with
``patient_id`` from a slide table when given one.

A patient model groups the rows by ``patient_id`` and pools each patient's slides as ``fuse``
and ``fusedist predict`` do (``FusedModel.predict_unit``: tiles concatenated per encoder in
slide-id order; FuseCPath seeds with the patient id), so a patient needs all its slides in
one call. A slide model predicts each row on its own and ignores ``patient_id``: its output is
what it was before the column existed.

Output: a DataFrame with the columns of ``fusedist predict``'s predictions.csv: (patient
models) ``patient_id``, then ``slide_id`` (a patient's slide ids sorted and joined by ``;``),
``method``, then ``prob_<class>`` + ``predicted`` (classification), ``risk`` (survival) or
``pred_<target>`` (regression), then LogitProd's ``weight_<encoder>`` (missing on other
methods' rows); one row per slide (patient) per method, slides (patients) in the order they
first appear in the input, methods in the card's order. Values are the same
numbers, unrounded (the CSV writes 6 significant digits); numeric columns are pandas'
nullable ``Float64``, so a missing value is ``<NA>`` and ``null`` in the scoring server's
JSON (``mlflow models serve``), never ``NaN``.

The model's one artifact, ``model``, is the ``<output>/model/`` folder ``fuse`` writes, so
``fusedist predict --model models:/<name>@<alias>`` reads the same files. ``model_config``
``{"device": "cuda"}`` (or ``auto``) moves the heads to a GPU; default CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from fusedist import mlmodels, storage
from fusedist.formats.bags import Bag, list_bags, read_bag
from fusedist.formats.slide_table import patients as patient_of, read_slide_table
from fusedist.fusion.model import (CARD, SlideError, flat_reason, load_model, model_files,
                                   is_patient_model, prediction_columns, weight_experts)
from fusedist.fusion.units import SEP

ARTIFACT = "model"
MODEL_NAME = "fused_model"  # the LoggedModel's name on the fuse run
COORDS = ".coords"
PATIENT = "patient_id"


# ----------------------------------------------------------------------------- schema

def signature(card: dict):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    # double, not float: MLflow upcasts float16/float32 bags to it losslessly but would refuse
    # float64 input for a float column; predict casts back to float32 as training did.
    # patient_id only for a patient model, so a slide model's signature stays as it was (a
    # patient_id sent to it is dropped by MLflow's schema check, with a warning). Optional
    # even there: its absence gets predict_rows' error, which names the fix.
    inputs = [ColSpec(DataType.string, "slide_id")]
    if is_patient_model(card):
        inputs.append(ColSpec(DataType.string, PATIENT, required=False))
    for e in card["encoders"]:
        inputs += [ColSpec(Array(Array(DataType.double)), e),
                   ColSpec(Array(Array(DataType.long)), e + COORDS, required=False)]
    outputs = [ColSpec(DataType.string if c in (PATIENT, "slide_id", "method", "predicted")
                       else DataType.double, c) for c in prediction_columns(card)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


# ----------------------------------------------------------------------------- model

def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _row_bags(card: dict, row: dict) -> tuple[str, dict]:
    """One input row -> (slide id, encoder -> Bag), with checks that name the column."""
    sid = str(row["slide_id"])
    feats, coords = {}, {}
    for e in card["encoders"]:
        f = np.asarray(row[e], np.float32)
        if f.ndim != 2 or len(f) == 0:
            raise ValueError(f"slide {sid}: column {e!r} must hold a non-empty (tiles, dim) "
                             f"array of {e}'s bag features, got shape {f.shape}")
        feats[e] = f
        c = row.get(e + COORDS)
        if not _missing(c):
            c = np.asarray(c, np.int64).reshape(-1, 2)
            if len(c) != len(f):
                raise ValueError(f"slide {sid}: column {e + COORDS!r} has {len(c)} tiles but "
                                 f"{e!r} has {len(f)}")
            coords[e] = c
    group = [e for e in card["feature_group"] if e in feats]
    if any(e not in coords for e in group):
        # Without coordinates the group's bags can only be matched row by row.
        counts = {e: len(feats[e]) for e in group}
        if len(set(counts.values())) > 1:
            raise ValueError(f"slide {sid}: encoders {group} have different tile counts "
                             f"{counts} and no {COORDS} columns to match tiles by; add the "
                             f"'<encoder>{COORDS}' columns (bags_frame does)")
        for e in group:
            coords[e] = np.stack([np.arange(len(feats[e])), np.zeros(len(feats[e]), int)], 1)
    return sid, {e: Bag(slide_id=sid, features=f, encoder=e,
                        coords=coords.get(e, np.zeros((len(f), 2), np.int64)))
                 for e, f in feats.items()}


def _units(card: dict, records: list[dict]) -> list[tuple[str | None, list[dict]]]:
    """(patient id, its rows) per patient of a patient model, in order of first appearance;
    (None, [row]) per row of a slide model."""
    if not is_patient_model(card):
        return [(None, [r]) for r in records]
    lacking = [str(r.get("slide_id")) for r in records
               if _missing(r.get(PATIENT)) or str(r.get(PATIENT)).strip() == ""]
    if lacking:
        raise ValueError(f"this model was fused with unit: patient (its card) and predicts "
                         f"patients: give every row a {PATIENT!r} column naming the slide's "
                         f"patient (none for slide(s) {lacking[:3]}); bags_frame(..., "
                         "patients=<slide table>) fills it from a slide table")
    ids = [str(r["slide_id"]) for r in records]
    twice = sorted({s for s in ids if ids.count(s) > 1})
    if twice:
        raise ValueError(f"slide(s) {twice[:3]} appear in more than one row; a patient model "
                         "pools each slide once, give each slide one row")
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r[PATIENT]), []).append(r)
    return list(groups.items())


def predict_rows(model, card: dict, frame: pd.DataFrame, device) -> pd.DataFrame:
    """The prediction table of ``frame`` (see the module docstring), as numbers."""
    experts = weight_experts(card)
    classes = card["task"] in ("classification", "tile_classification")
    rows = []
    for patient, recs in _units(card, frame.to_dict("records")):
        per_slide = dict(_row_bags(card, r) for r in recs)
        uid = patient if patient is not None else next(iter(per_slide))
        try:
            p = model.predict_unit(per_slide, uid,
                                   {s: {e: f"column {e!r}" for e in b}
                                    for s, b in per_slide.items()},
                                   device, patient is not None)
        except SlideError as err:
            raise ValueError(f"{'slide' if patient is None else 'patient'} {uid}: "
                             f"{err}") from None
        lead = [] if patient is None else [patient]
        for name in card["methods"]:
            pred, w = p.methods[name]
            vals: list[Any] = np.atleast_1d(pred).tolist()
            if classes:
                vals.append(card["targets"]["classes"][int(np.argmax(pred))]
                            if np.isfinite(pred).all() else "")
            w = w.tolist() if w is not None else [math.nan] * len(experts)
            rows.append(lead + [SEP.join(p.slides), name] + vals + w)
    return strict_numbers(pd.DataFrame(rows, columns=prediction_columns(card)))


def strict_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns as pandas' nullable ``Float64``, a missing value (LogitProd's weights
    on another method's rows, a slide FuseCPath could not predict) as ``<NA>``: the scoring
    server's JSON then says ``null`` where a float NaN would print ``NaN``, which is not JSON
    and which strict clients refuse. The CSV still writes an empty field."""
    out = frame.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = pd.array(out[col].to_numpy(np.float64), dtype="Float64")
    return out


class FusedPyfunc(mlflow.pyfunc.PythonModel):
    """Bags per slide (DataFrame) -> the prediction table; state lives in the artifact."""

    def load_context(self, context) -> None:
        # lazy: fusion.train imports torch
        from fusedist.fusion.training import pick_device

        self.model = load_model(str(context.artifacts[ARTIFACT]))  # checks every digest
        self.device = pick_device(str((context.model_config or {}).get("device", "cpu")))

    # pd.DataFrame: a hint MLflow 3 infers no schema from, so the logged signature checks
    # the input (and no "add type hints" warning at every log).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, dict):  # called on the unwrapped model with one slide
            model_input = pd.DataFrame([model_input])
        return predict_rows(self.model, self.model.card, model_input, self.device)


def bags_frame(bags: str, encoders: list[str], slide_ids: list[str] | None = None,
               patients: str | None = None) -> pd.DataFrame:
    """The model input for slides' bags under ``<bags>/<encoder>/``: one row per slide with
    every encoder's features and coords (default: the slides every encoder has a bag for).
    ``patients``: a slide table (slide_id, patient_id; the one ``fusedist predict
    --patients`` reads) whose patient ids fill a ``patient_id`` column, as a patient model
    needs; by default only the slides it lists are taken."""
    index = {e: list_bags(storage.join(bags, e)) for e in encoders}
    of = None if patients is None else patient_of(read_slide_table(patients))
    if slide_ids is None:
        common = set.intersection(*(set(v) for v in index.values()))
        slide_ids = sorted(common if of is None else common & set(of))
    rows = []
    for sid in slide_ids:
        rec: dict[str, Any] = {"slide_id": sid}
        if of is not None:
            if sid not in of:
                raise ValueError(f"slide {sid!r} is not in the slide table {patients}, so "
                                 "its patient is unknown; add a row (slide_id, patient_id)")
            rec[PATIENT] = of[sid]
        for e in encoders:
            if sid not in index[e]:
                raise FileNotFoundError(f"{storage.join(bags, e)}: no bag for slide {sid!r}")
            b = read_bag(index[e][sid], sid)
            rec[e], rec[e + COORDS] = b.features, b.coords
        rows.append(rec)
    lead = ["slide_id"] + ([PATIENT] if of is not None else [])
    return pd.DataFrame(rows, columns=lead + [c for e in encoders for c in (e, e + COORDS)])


# ----------------------------------------------------------------------------- logging

FLAT_TAG = "fusedist.flat_refit"


def flat_tags(card: dict) -> dict[str, str]:
    """``fusedist.flat_refit``: ``true`` when a component's refit barely varies over its
    training slides (``card["refit"]["flat"]``), with the components and why in
    ``fusedist.flat_refit.reason``; ``false`` otherwise. Cards written before the check: none."""
    if card.get("refit") is None:
        return {}
    why = flat_reason(card)
    return {FLAT_TAG: "false"} if why is None else \
        {FLAT_TAG: "true", f"{FLAT_TAG}.reason": why[:5000]}


def log_fused_model(run, model_url: str, registered_model: str | None,
                    alias: str | None) -> dict[str, Any] | None:
    """Log ``fuse``'s model folder as a pyfunc model of ``run`` and, when
    ``registered_model`` is set, register it with ``alias`` (:func:`fusedist.mlmodels.publish`:
    a version that already holds these files is reused). Returns what to record in the
    manifest (``model_uri``; ``registered_model``, ``version``, ``alias``, ``uri``,
    ``reused``), ``None`` for an inactive run."""
    if not getattr(run, "active", False):
        return None
    files = model_files(model_url)
    card = json.loads(files[CARD])
    tags = {"fusedist.task": card["task"], "methods": ",".join(card["methods"]),
            "encoders": ",".join(card["encoders"]),
            "card_sha256": hashlib.sha256(files[CARD]).hexdigest(), **flat_tags(card)}
    with tempfile.TemporaryDirectory(prefix="fusedist-fused-mlflow-") as tmp:
        local = Path(tmp) / "model"
        local.mkdir()
        for name, data in files.items():
            (local / name).write_bytes(data)
        pub = mlmodels.publish(
            run, local, lambda: mlmodels.log_pyfunc(
                run, MODEL_NAME, FusedPyfunc(), {ARTIFACT: str(local)}, signature(card),
                metadata={"fusedist_card": card},
                tags={"fusedist.kind": "fused-model", "fusedist.task": card["task"]}),
            registered_model, alias, tags=tags,
            description=f"fusedist fused model ({card['task']}; {', '.join(card['methods'])} "
                        f"over {', '.join(card['encoders'])})")
    out: dict[str, Any] = {"model_uri": pub.model_uri, "model_id": pub.model_id}
    if pub.version is not None:
        out.update(registered_model=registered_model, version=pub.version,
                   alias=alias if pub.aliased else None,
                   uri=f"models:/{registered_model}/{pub.version}", reused=pub.reused)
    return out
