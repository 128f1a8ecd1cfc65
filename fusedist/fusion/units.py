"""What one sample of ``fuse`` is: a slide, or a patient whose slides are pooled.

TCGA labels are per patient (case) and a case often has several slides. With ``unit:
patient`` each patient is one sample: its slides' bags are pooled per encoder (tiles
concatenated in slide-id order, as CLAM and PORPOISE do for TCGA survival) in
:func:`pool_bags`, the one place bags become per-sample inputs, so every method (experts,
LogitProd, Meta-Encoder, FuseCPath, baselines) gets pooling without knowing of it; ``predict``
pools a new patient's slides with the same function.

Labels come slide-keyed (``slide_id``, today's table) or patient-keyed (``patient_id`` and
no ``slide_id``: a clinical table, STAMP's), joined to the slides through a slide table
(``FuseConfig.slides``, :mod:`fusedist.formats.slide_table`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fusedist.formats.bags import Bag
from fusedist.config import ConfigError
from fusedist.formats.slide_table import patients, read_slide_table

log = logging.getLogger("fusedist")

SEP = ";"
"""Joins a patient's slide ids in predictions.csv and folds.csv (``slide_id`` column)."""


@dataclass(frozen=True)
class Unit:
    """One sample: its id (the slide id, or the patient id), its patient, its slides."""

    id: str
    patient_id: str
    slides: tuple[str, ...]


def label_key(url: str, cols: list[str]) -> str:
    """``slide_id`` or ``patient_id``: what the labels table's rows are keyed by."""
    if "slide_id" in cols:
        return "slide_id"
    if "patient_id" in cols:
        return "patient_id"
    raise ConfigError(f"labels: {url} has no slide_id column, nor patient_id (columns: "
                      f"{cols}); the first row must name the columns: key the rows by slide "
                      "(slide_id) or by patient (patient_id, with `slides:` a slide table "
                      "mapping slides to patients)")


def resolve_unit(cfg, key: str) -> str:
    """The config's ``unit`` with ``auto`` decided: patient-keyed labels mean patients."""
    if cfg.unit != "auto":
        return cfg.unit
    return "patient" if key == "patient_id" else "slide"


def slide_patients(cfg, rows: list[dict[str, str]], key: str) -> dict[str, str] | None:
    """slide_id -> patient_id: from ``cfg.slides`` (read and checked), else from a
    slide-keyed labels table (None when neither knows the slides, e.g. patient-keyed labels
    without a slide table)."""
    table = {}
    if cfg.slides:
        table = patients(read_slide_table(cfg.slides))
    if key != "slide_id":
        return table or None
    # Slide-keyed labels: their own patient_id wins, the slide table fills the rest.
    return {**table, **{r["slide_id"]: (r.get("patient_id") or table.get(r["slide_id"])
                                        or r["slide_id"]) for r in rows}}


def join_patients(cfg, rows: list[dict[str, str]], key: str
                  ) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    """slide -> patient, patient -> slides, and the labelled patients (file order).
    Patient-keyed labels without a slide table, or whose patients match none of its, are a
    ConfigError (cheap: no bag is read; ``fuse``'s preflight runs it)."""
    of = slide_patients(cfg, rows, key)
    if of is None:
        raise ConfigError(f"labels: {cfg.labels} is keyed by patient_id; set `slides:` to a "
                          "slide table (slide_id, path, patient_id) so its patients can be "
                          "joined to their slides' bags")
    slides_of: dict[str, list[str]] = {}
    for s, p in of.items():
        slides_of.setdefault(p, []).append(s)
    labelled = list(dict.fromkeys(r[key] if key == "patient_id" else of[r["slide_id"]]
                                  for r in rows))
    if not any(p in slides_of for p in labelled):
        raise ConfigError(no_shared_ids(labelled, sorted(slides_of), "patient_id",
                                        f"labels {cfg.labels}", f"the slide table {cfg.slides}"))
    return of, slides_of, labelled


def patient_units(cfg, rows: list[dict[str, str]], key: str, targets: dict[str, object],
                  bad: dict[str, str], with_bags: set[str], exclude
                  ) -> tuple[list[Unit], dict[str, object]]:
    """The patients to fuse, each with its slides that have bags (slide-id order), and each
    patient's target.

    ``targets``/``bad`` are keyed by what the labels are keyed by; slide-keyed labels are
    merged per patient (its slides must agree). Patients without a usable slide, and slides
    without bags, are recorded through ``exclude(slide_id, reason, patient_id=...)``; no
    labelled patient with a slide is a ConfigError before any bag is read.
    """
    of, slides_of, labelled = join_patients(cfg, rows, key)
    if key == "slide_id":
        targets, bad = _merge_per_patient(cfg, of, targets, bad)
    units = []
    for p in labelled:
        if p not in slides_of:
            exclude("", f"patient in {cfg.labels} has no slide in {cfg.slides}", p)
            continue
        if p in bad:
            exclude("", bad[p], p)
            continue
        have = sorted(s for s in slides_of[p] if s in with_bags)
        for s in sorted(set(slides_of[p]) - set(have)):
            exclude(s, "slide of a labelled patient, but without a bag for every encoder", p)
        if have:
            units.append(Unit(p, p, tuple(have)))
        else:
            exclude("", "none of the patient's slides has a bag for every encoder", p)
    gone = sum(1 for p in labelled if p not in slides_of)
    if gone:
        log.warning("fuse: %d of %d labelled patient(s) have no slide in %s (e.g. %s); "
                    "they are left out (manifest.json lists them)", gone, len(labelled),
                    cfg.slides, next(p for p in labelled if p not in slides_of))
    if not units:
        wanted = sorted(s for p in labelled if p in slides_of for s in slides_of[p])
        raise ConfigError(no_shared_ids(wanted, sorted(with_bags), "slide_id",
                                        f"the slide table {cfg.slides}",
                                        f"the bags under {cfg.bags}"))
    for s in sorted(with_bags - set(of)):
        exclude(s, f"has bags but no row in {cfg.slides}", "")
    return units, targets


def _merge_per_patient(cfg, of: dict[str, str], targets: dict[str, object],
                       bad: dict[str, str]) -> tuple[dict[str, object], dict[str, str]]:
    """Slide-keyed targets -> patient-keyed: a patient's labelled slides must agree."""
    per: dict[str, dict[str, object]] = {}
    why: dict[str, str] = {}
    for s, t in targets.items():
        per.setdefault(of.get(s, s), {})[s] = t
    for s, reason in bad.items():
        why.setdefault(of.get(s, s), f"{s}: {reason}")
    merged = {}
    for p, ts in per.items():
        values = list(dict.fromkeys(map(repr, ts.values())))
        if len(values) > 1:
            raise ConfigError(f"labels: {cfg.labels}: patient {p!r} has slides with different "
                              f"targets ({', '.join(f'{s}: {t}' for s, t in sorted(ts.items()))}"
                              "); with unit: patient every slide of a patient needs the same "
                              "label, or use unit: slide")
        merged[p] = next(iter(ts.values()))
    return merged, {p: w for p, w in why.items() if p not in merged}


def no_shared_ids(labels: list[str], other: list[str], what: str, labels_url: str,
                  other_name: str) -> str:
    """The error for labels and bags (or slides) that share no id: a few ids of each side
    and the likely cause."""
    show = ", ".join(map(repr, labels[:3])) or "none"
    theirs = ", ".join(map(repr, other[:3])) or "none"
    return (f"{labels_url} and {other_name} share no {what}: {labels_url} has {len(labels)} "
            f"(e.g. {show}), {other_name} {len(other)} (e.g. {theirs}). "
            f"{likely_cause(labels, other, what)}")


def likely_cause(labels: list[str], other: list[str], what: str = "slide_id") -> str:
    """A guess at why two id lists do not meet, from what the ids look like."""
    lab, oth = labels[:200], other[:200]
    for a in lab:
        for b in oth:
            if a != b and (a in b or a.replace(".", "_") in b):
                return (f"Likely cause: the bag names contain the label ids ({b!r} holds "
                        f"{a!r}): they were named from the file's folder (GDC's one UUID "
                        "folder per file) or with dots replaced; embed from a slide table "
                        "(`--slides slides.csv`) so bags keep the ids verbatim, or rename the "
                        "label ids to the bag names")
            if a != b and b in a and len(b) >= 8:
                return (f"Likely cause: the labels' ids are longer than the bags' ({a!r} "
                        f"starts with or holds {b!r}): slide ids keyed as patients or with a "
                        "file suffix; key the labels as the bags are named")
    if lab and oth and {a.lower() for a in lab} & {b.lower() for b in oth}:
        return "Likely cause: the ids differ only in upper/lower case; ids are matched exactly"
    if what == "patient_id":
        return ("Likely cause: the two tables write patient ids differently or come from "
                "different cohorts (TCGA: the case is the barcode's first 12 characters, "
                "e.g. 'TCGA-2F-A9KO'); make the clinical table's patient_id match the slide "
                "table's")
    if lab and all(len(a) == 12 and a.startswith("TCGA-") for a in lab):
        return ("Likely cause: the labels are TCGA patient barcodes (12 characters) keyed as "
                "slides; name the column patient_id and set `slides:` to a slide table")
    return ("Likely cause: the labels come from another cohort or id scheme; the labels' ids "
            "must equal the bag file names without .h5 (slide_id) or, keyed by patient_id, "
            "the slide table's patient_id")


# -------------------------------------------------------------------------------- pooling

@dataclass
class Pooled:
    """One sample's bags, per encoder, and the feature group aligned on shared tiles."""

    bags: dict[str, Bag]
    aligned_coords: np.ndarray
    picks: list[np.ndarray | None]
    """Per feature-group encoder: rows of its pooled bag on the shared tiles (None: all)."""
    sizes: dict[str, list[int]]
    """encoder -> tiles of each pooled slide (to split a pooled bag back per slide)."""


def pool_bags(per_slide: list[dict[str, Bag]], group: list[str], align) -> Pooled:
    """Concatenate the slides' bags per encoder (tiles and coords, in the given order) and
    align the feature group slide by slide (tile coordinates repeat across slides, so they
    are matched within each slide, then offset). One slide passes through unchanged.

    ``align(bags) -> (coords, picks)`` is fusedist.fusion.data.align_picks."""
    encoders = list(per_slide[0])
    sizes = {e: [len(b[e].features) for b in per_slide] for e in encoders}
    parts = [align([b[e] for e in group]) for b in per_slide]
    if len(per_slide) == 1:
        (xy, picks), = parts
        return Pooled(per_slide[0], xy, picks, sizes)
    bags = {}
    for e in encoders:
        first = per_slide[0][e]
        bags[e] = Bag(**{**vars(first),
                         "features": np.concatenate([b[e].features for b in per_slide]),
                         "coords": np.concatenate([b[e].coords for b in per_slide])})
    picks: list[np.ndarray | None] = []
    for k, e in enumerate(group):
        rows = [np.arange(n) if p[k] is None else p[k] for (_, p), n in zip(parts, sizes[e])]
        offsets = np.cumsum([0] + sizes[e][:-1])
        whole = all(p[k] is None for _, p in parts)
        picks.append(None if whole else np.concatenate(
            [r + o for r, o in zip(rows, offsets)]).astype(np.int64))
    return Pooled(bags, np.concatenate([xy for xy, _ in parts]).reshape(-1, 2), picks, sizes)
