"""Latent cues, how they map to morphology, and the labels derived from them.

Every slide has four standardised latent cues (z-scores). Each cue drives one visual property
that a different kind of feature extractor picks up (nuclear counts, nuclear shape, colour,
tissue architecture), and each cue is only partially informative about the class because of
its own noise, so a model that fuses several views should beat any single one:

- ``nuclear_density``: nuclei per area (cellularity);
- ``nuclear_size``: mean nuclear radius (and so nuclear area / chromatin amount);
- ``stain_hue``: a shift of the hematoxylin and eosin colours (cooler/bluer vs warmer);
- ``gland_texture``: gland frequency and the coarseness/strength of the stroma fibres.

Classes have prototype cue vectors; survival risk and gene-expression targets are linear in
the cues plus noise. Nothing here renders pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

CUES: tuple[str, ...] = ("nuclear_density", "nuclear_size", "stain_hue", "gland_texture")

# Reference H&E optical-density vectors (Macenko et al.), RGB order.
H_OD = np.array([0.5626, 0.7201, 0.4062])
E_OD = np.array([0.2159, 0.8012, 0.5581])
# Directions in which a positive ``stain_hue`` cue moves the stains: hematoxylin bluer,
# eosin more magenta/purple; negative: browner hematoxylin, more orange eosin.
H_SHIFT = np.array([0.45, 0.05, -0.45])
E_SHIFT = np.array([0.20, -0.05, -0.35])


@dataclass(frozen=True)
class Morphology:
    """Physical rendering parameters of one slide, derived from its cues."""

    density_per_100um2: float  # nuclei per 100 x 100 µm of tissue (outside glands)
    nucleus_radius_um: float
    h_od: np.ndarray           # unit OD vectors of the two stains (RGB)
    e_od: np.ndarray
    glands_per_mm2: float
    fibre_amplitude: float     # relative eosin modulation by the fibre texture
    fibre_width_um: float


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.02, None)
    return v / np.linalg.norm(v)


def morphology(cues: Mapping[str, float]) -> Morphology:
    """Map standardised cues (missing = 0) to physical parameters.

    The ranges are chosen so that cues at +-2 sd are clearly visible at 40x but still look like
    tissue: density 30-100 nuclei per (100 µm)^2, radius 2.5-4 µm, glands 3-30 per mm^2.
    """
    z = {c: float(cues.get(c, 0.0)) for c in CUES}
    unknown = set(cues) - set(CUES)
    if unknown:
        raise ValueError(f"unknown cue(s) {sorted(unknown)}; cues are {list(CUES)}")
    return Morphology(
        density_per_100um2=55.0 * math.exp(0.30 * z["nuclear_density"]),
        nucleus_radius_um=3.1 * math.exp(0.12 * z["nuclear_size"]),
        h_od=_unit(H_OD + 0.12 * z["stain_hue"] * H_SHIFT),
        e_od=_unit(E_OD + 0.12 * z["stain_hue"] * E_SHIFT),
        glands_per_mm2=10.0 * math.exp(0.55 * z["gland_texture"]),
        fibre_amplitude=0.38 * math.exp(0.25 * z["gland_texture"]),
        fibre_width_um=0.9 * math.exp(0.20 * z["gland_texture"]),
    )


def prototypes(num_classes: int, separation: float, num_cues: int = len(CUES)) -> np.ndarray:
    """Class prototype cue vectors, shape (K, C).

    ``p[k, c] = separation * cos(2 pi k / K + pi/4 + pi c / 2)``: every cue differs between
    classes (the pi/4 offset avoids a cue that is identical for all classes when K = 2), and
    for K >= 3 different cues order the classes differently, so no single cue separates all.
    """
    k = np.arange(num_classes)[:, None]
    c = np.arange(num_cues)[None, :]
    return separation * np.cos(2 * math.pi * k / num_classes + math.pi / 4 + math.pi * c / 2)


@dataclass
class LabelParams:
    """Everything that turns cues into labels (mirrors the fields of ``SynthConfig``)."""

    num_classes: int = 2
    class_separation: float = 0.8
    prototypes: Sequence[Sequence[float]] | None = None
    cue_noise: Mapping[str, float] = field(default_factory=dict)
    slide_noise: float = 0.25
    paired_fraction: float = 0.25
    risk_weights: Mapping[str, float] = field(default_factory=dict)
    risk_noise: float = 0.5
    weibull_shape: float = 1.5
    median_survival: float = 36.0
    follow_up: float = 120.0
    num_genes: int = 8
    gene_noise: float = 0.5
    id_prefix: str = "synth"


DEFAULT_CUE_NOISE = {"nuclear_density": 0.9, "nuclear_size": 1.0, "stain_hue": 1.1,
                     "gland_texture": 1.0}
DEFAULT_RISK_WEIGHTS = {"nuclear_density": 0.5, "nuclear_size": 0.4, "stain_hue": -0.2,
                        "gland_texture": -0.4}


@dataclass
class SlideLabels:
    slide_id: str
    patient_id: str
    label: int
    cues: dict[str, float]
    time: float
    event: int
    genes: dict[str, float]


def _patients(seed: int, n: int, paired_fraction: float) -> np.ndarray:
    """Patient index of each slide; ``paired_fraction`` of slides come two per patient.

    Each new patient has a second slide (the next slide id) with probability q, where
    2q / (1 + q) = paired_fraction. Decided slide by slide, so the first n slides of a larger
    data set are the same as those of a smaller one.
    """
    f = min(max(paired_fraction, 0.0), 0.999)
    q = f / (2 - f)
    patient = np.empty(n, np.int64)
    j, open_pair = -1, False
    for i in range(n):
        if open_pair:
            patient[i], open_pair = j, False
        else:
            j += 1
            patient[i] = j
            open_pair = np.random.default_rng([seed, 0xA1, j]).random() < q
    return patient


def gene_loadings(rng: np.random.Generator, num_genes: int) -> np.ndarray:
    """(G, C) loadings: gene g mostly follows cue g mod C, plus one weaker secondary cue."""
    c = len(CUES)
    w = np.zeros((num_genes, c))
    for g in range(num_genes):
        w[g, g % c] = 1.0
        w[g, (g + 1 + g // c) % c] += rng.choice([-0.5, 0.5])
    return w


def make_labels(seed: int, num_slides: int, p: LabelParams) -> list[SlideLabels]:
    """Draw patients, classes, cues, survival and gene targets for a data set.

    Slides of one patient share the class, the patient-level cues (their slides differ only by
    ``slide_noise``), and the survival outcome. Classes are balanced within every block of K
    patients. Every draw comes from a stream keyed by (seed, patient) or (seed, slide), so
    growing ``num_slides`` keeps the labels (and pixels) of the existing slides.
    """
    K, C = p.num_classes, len(CUES)
    proto = (np.asarray(p.prototypes, float) if p.prototypes is not None
             else prototypes(K, p.class_separation))
    if proto.shape != (K, C):
        raise ValueError(f"prototypes must be {K} x {C} (classes x cues {list(CUES)})")
    noise = np.array([{**DEFAULT_CUE_NOISE, **p.cue_noise}[c] for c in CUES])
    weights = np.array([{**DEFAULT_RISK_WEIGHTS, **p.risk_weights}[c] for c in CUES])
    lam = p.median_survival / math.log(2) ** (1 / p.weibull_shape)
    load = gene_loadings(np.random.default_rng([seed, 0x6E]), p.num_genes)
    patient = _patients(seed, num_slides, p.paired_fraction)

    def draw_patient(j: int) -> tuple[int, np.ndarray, float, int]:
        block = np.random.default_rng([seed, 0xB1, j // K]).permutation(K)
        label = int(block[j % K])
        rng = np.random.default_rng([seed, 0xCA, j])
        cues = proto[label] + rng.standard_normal(C) * noise
        # Survival: Weibull proportional hazards, S(t) = exp(-(t/lam)^k * exp(risk)).
        risk = cues @ weights + p.risk_noise * rng.standard_normal()
        t_event = lam * (rng.exponential() * math.exp(-risk)) ** (1 / p.weibull_shape)
        t_censor = rng.uniform(0, p.follow_up)
        return label, cues, round(min(t_event, t_censor), 2), int(t_event <= t_censor)

    patients = {int(j): draw_patient(int(j)) for j in np.unique(patient)}
    out = []
    for i in range(num_slides):
        j = int(patient[i])
        label, pcues, time, event = patients[j]
        rng = np.random.default_rng([seed, 0x5D, i])
        cues = pcues + p.slide_noise * rng.standard_normal(C)
        genes = 5.0 + load @ cues + p.gene_noise * rng.standard_normal(p.num_genes)
        out.append(SlideLabels(
            slide_id=f"{p.id_prefix}-{i:04d}", patient_id=f"patient-{j:04d}", label=label,
            cues={c: round(float(v), 4) for c, v in zip(CUES, cues)}, time=float(time),
            event=event, genes={f"gene_{g}": round(float(v), 4) for g, v in enumerate(genes)},
        ))
    return out


def labels_csv(rows: Sequence[SlideLabels]) -> str:
    """``labels.csv`` text: slide_id, patient_id, label, time, event, gene_*, cue_*."""
    genes = list(rows[0].genes) if rows else []
    head = ["slide_id", "patient_id", "label", "time", "event", *genes, *(f"cue_{c}" for c in CUES)]
    lines = [",".join(head)]
    for r in rows:
        vals = [r.slide_id, r.patient_id, str(r.label), f"{r.time:.2f}", str(r.event),
                *(f"{r.genes[g]:.4f}" for g in genes), *(f"{r.cues[c]:.4f}" for c in CUES)]
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"


def clinical_csv(rows: Sequence[SlideLabels]) -> str:
    """``clinical.csv`` text: patient_id, label, time, event, one row per patient (in the order
    of their first slide): the patient-keyed table TCGA's clinical data gives. A patient's
    slides share these by construction (:func:`make_labels`); a disagreement is a bug here."""
    lines, seen = ["patient_id,label,time,event"], {}
    for r in rows:
        values = (str(r.label), f"{r.time:.2f}", str(r.event))
        if r.patient_id not in seen:
            seen[r.patient_id] = values
            lines.append(",".join([r.patient_id, *values]))
        elif seen[r.patient_id] != values:
            raise ValueError(f"synth: slides of patient {r.patient_id} disagree on label, time "
                             f"or event ({seen[r.patient_id]} vs {values})")
    return "\n".join(lines) + "\n"
