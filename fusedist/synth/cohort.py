"""A synthetic feature-level cohort for fusion: several "encoders", each blind to some cues.

``fusedist synth`` renders pixels from four latent cues (``fusedist.synth.cues``); running
real foundation models over them is slow and says nothing controlled about *which* model sees
what. This module skips the pixels: it draws the same labels (``make_labels``: patients,
classes, cues, Weibull survival, gene targets) and writes tile-feature bags directly, one
folder per synthetic encoder, where each encoder is a fixed random nonlinear function of only
*its* subset of the cues. With the default encoders every cue is seen by some encoder but no
encoder sees all of them, so no single expert is best everywhere and fusing them should help
(for classification, survival and gene regression alike, since all three depend on all cues).

Within a slide a spatially contiguous fraction of the tiles is "tumour": those carry the
slide's cue values (plus per-tile jitter) and a tumour indicator; the rest are background
(cues 0 + jitter), so attention-MIL has something to find and mean pooling dilutes the signal.

Layout written under ``output`` (what ``fusedist fuse`` reads)::

    <output>/bags/<encoder>/<slide_id>.h5   fusedist bags (fusedist.formats.bags.write_bag)
    <output>/labels.csv                     slide_id, patient_id, label, time, event,
                                            gene_*, cue_* (as fusedist synth writes it)
"""

from __future__ import annotations

import hashlib

import logging
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fusedist import storage
from fusedist.formats.bags import LEVEL0_MPP, TILE_SIZE_LEVEL0, Bag, bag_url, write_bag
from fusedist.synth.cues import (CUES, DEFAULT_RISK_WEIGHTS, LabelParams, SlideLabels,
                                 labels_csv, make_labels)

log = logging.getLogger(__name__)

MPP = 0.5
TILE_SIZE = 224
TILE_JITTER = 0.5     # sd of a tile's cue values around its slide's (tissue heterogeneity)
HIDDEN = 32           # hidden width of each encoder's random 2-layer map
_SLIDE_NAME = re.compile(r"synth-\d{4,}\.h5")  # the bag names this module writes


@dataclass
class SyntheticEncoder:
    """One synthetic feature extractor: a fixed random nonlinear view of some cues."""

    name: str                 # e.g. "test-color"; also the bag folder name
    cues: tuple[str, ...]     # which cues it sees (a subset of fusedist.synth.cues.CUES)
    dim: int = 64             # feature dimension
    noise: float = 1.0        # sd of the Gaussian noise added to every tile feature

    def __post_init__(self) -> None:
        unknown = set(self.cues) - set(CUES)
        if unknown:
            raise ValueError(f"encoder {self.name!r}: unknown cue(s) {sorted(unknown)}; "
                             f"cues are {list(CUES)}")
        if self.dim < 1 or self.noise < 0:
            raise ValueError(f"encoder {self.name!r}: dim must be >= 1 and noise >= 0")


# Overlapping but different views (each sees 2 of the 4 cues, every cue is seen by some
# encoder, none sees all), with different dims so fusion has to handle mismatched widths.
DEFAULT_ENCODERS: tuple[SyntheticEncoder, ...] = (
    SyntheticEncoder("test-nuclei", ("nuclear_density", "nuclear_size"), dim=64),
    SyntheticEncoder("test-color", ("stain_hue", "nuclear_size"), dim=48),
    SyntheticEncoder("test-texture", ("gland_texture", "nuclear_density"), dim=96),
)


@dataclass
class CohortInfo:
    """Where a synthetic cohort was written and what it holds."""

    bags: str            # <output>/bags (one sub-folder per encoder)
    labels: str          # <output>/labels.csv
    encoders: list[str]
    num_slides: int
    num_classes: int


@dataclass
class _Tiles:
    """The tissue of one slide, shared by every encoder (they embed the same tiles)."""

    coords: np.ndarray   # (N, 2) int64
    tumour: np.ndarray   # (N,) bool
    cues: np.ndarray     # (N, len(CUES)) per-tile cue values (0 + jitter on background)


# ----------------------------------------------------------------------------- tissue

def _grid_coords(rng: np.random.Generator, n: int, grid: int) -> np.ndarray:
    """``n`` distinct cells of a roughly square grid (a tissue blob with holes), row-major."""
    cols = max(1, math.ceil(math.sqrt(n * 1.5)))
    rows = math.ceil(n * 1.5 / cols)
    cells = np.sort(rng.choice(rows * cols, size=n, replace=False))
    return np.stack([cells % cols, cells // cols], axis=1).astype(np.int64) * grid


def _tumour_mask(rng: np.random.Generator, coords: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of tiles nearest a random centre: tumour is one contiguous region."""
    n = coords.shape[0]
    k = min(n, max(1, round(fraction * n))) if fraction > 0 else 0
    centre = coords[rng.integers(n)].astype(float)
    order = np.argsort(((coords - centre) ** 2).sum(axis=1), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[:k]] = True
    return mask


def _layout(seed: int, index: int, tiles: tuple[int, int], fraction: float, grid: int,
            ) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """Coords and tumour mask of slide ``index``, and its generator for the draws after them.

    Keyed by (seed, slide): growing num_slides keeps the tiles of the existing slides.
    """
    rng = np.random.default_rng([seed, 0xF1, index])
    n = int(rng.integers(tiles[0], tiles[1] + 1))
    coords = _grid_coords(rng, n, grid)
    return rng, coords, _tumour_mask(rng, coords, fraction)


def _slide_tiles(seed: int, index: int, row: SlideLabels, tiles: tuple[int, int],
                 fraction: float, grid: int) -> _Tiles:
    rng, coords, tumour = _layout(seed, index, tiles, fraction, grid)
    slide_cues = np.array([row.cues[c] for c in CUES])
    cues = np.where(tumour[:, None], slide_cues[None, :], 0.0)
    cues = cues + TILE_JITTER * rng.standard_normal((len(coords), len(CUES)))
    return _Tiles(coords, tumour, cues)


# ----------------------------------------------------------------------------- encoders

def _encoder_seed(seed: int, name: str) -> list[int]:
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    return [seed, 0xE7, zlib.crc32(name.encode())]


@dataclass
class _RandomMap:
    """x -> tanh(x W1 + b1) W2: a fixed random 2-layer MLP from visible cues to features."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.w1 + self.b1) @ self.w2


def _random_map(seed: int, enc: SyntheticEncoder) -> _RandomMap:
    """The encoder's map; its input is [tumour indicator, visible cues...].

    W1 is scaled so pre-activations of cues at +-1 sd are O(1): tanh is then clearly nonlinear
    but not saturated, so the cue values stay recoverable. W2 gives every output dimension
    unit signal variance, comparable to ``noise`` = 1.
    """
    rng = np.random.default_rng(_encoder_seed(seed, enc.name))
    d_in = 1 + len(enc.cues)
    w1 = rng.standard_normal((d_in, HIDDEN)) / math.sqrt(d_in)
    b1 = 0.5 * rng.standard_normal(HIDDEN)
    w2 = rng.standard_normal((HIDDEN, enc.dim)) * math.sqrt(2.0 / HIDDEN)
    return _RandomMap(w1, b1, w2)


def _embed(seed: int, index: int, enc: SyntheticEncoder, fmap: _RandomMap,
           t: _Tiles) -> np.ndarray:
    cols = [CUES.index(c) for c in enc.cues]
    x = np.concatenate([t.tumour[:, None].astype(float), t.cues[:, cols]], axis=1)
    rng = np.random.default_rng([*_encoder_seed(seed, enc.name), index])
    feats = fmap(x) + enc.noise * rng.standard_normal((x.shape[0], enc.dim))
    return feats.astype(np.float32)


# ----------------------------------------------------------------------------- cohort

def _check_args(num_slides: int, num_classes: int, tiles: tuple[int, int],
                encoders: Sequence[SyntheticEncoder], fraction: float, grid: int) -> None:
    if num_slides < 1 or num_classes < 2:
        raise ValueError("need num_slides >= 1 and num_classes >= 2")
    if not 1 <= tiles[0] <= tiles[1]:
        raise ValueError(f"tiles must be (min, max) with 1 <= min <= max, got {tiles}")
    names = [e.name for e in encoders]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need at least one encoder and unique names, got {names}")
    if not 0.0 <= fraction <= 1.0 or grid < 1:
        raise ValueError("informative_fraction must be in [0, 1] and grid >= 1")


def _drop_stale(bags: str, keep: set[tuple[str, str]]) -> None:
    """Delete synthetic bags an earlier, larger run left here (``synth-NNNN.h5`` names only).

    ``fusedist fuse`` lists the bag folders, so a leftover slide or encoder would be read as
    part of this cohort. Other files are someone else's and are left alone.
    """
    if not storage.exists(bags) and not storage.is_s3(bags):
        return
    for folder in storage.listdir(bags):
        if not folder.endswith("/"):
            continue
        enc = folder.rstrip("/")
        for name in storage.listdir(storage.join(bags, enc), ".h5"):
            if _SLIDE_NAME.fullmatch(name) and (enc, name[:-3]) not in keep:
                storage.delete(storage.join(bags, enc, name))


def synthetic_cohort(output: str, num_slides: int = 60, num_classes: int = 2,
                     tiles: tuple[int, int] = (48, 96),
                     encoders: Sequence[SyntheticEncoder] = DEFAULT_ENCODERS,
                     seed: int = 0, class_separation: float = 0.8, num_genes: int = 8,
                     informative_fraction: float = 0.5, grid: int = TILE_SIZE,
                     risk_scale: float = 1.0) -> CohortInfo:
    """Write a synthetic multi-encoder cohort to ``output`` (a local path or s3:// URL).

    Labels, survival and gene targets come from ``make_labels(seed, num_slides, ...)``, i.e.
    the same cue model (and, with ``risk_scale`` = 1, the same values) as ``fusedist synth``
    with this seed, class count, separation and gene count. ``risk_scale`` multiplies the
    cues' survival risk weights: at 1 even the true cues reach a c-index of only ~0.67 (200
    slides), which leaves fusion little to show; 2 gives ~0.78 (classes and genes unchanged).

    Per slide, N ~ U[tiles] tiles on a ``grid``-px lattice (the same coords for every
    encoder); ``informative_fraction`` of them are tumour tiles carrying the slide's cues.
    Every encoder's features are its fixed random map (seeded by ``seed`` and its name) of its
    visible cues plus N(0, noise^2), float32. The same arguments give the same arrays and
    bytes; bags an earlier run left for slides or encoders no longer in the cohort are
    deleted.
    """
    _check_args(num_slides, num_classes, tiles, encoders, informative_fraction, grid)
    out = output.rstrip("/")
    bags = storage.join(out, "bags")
    risk = {c: risk_scale * w for c, w in DEFAULT_RISK_WEIGHTS.items()}
    params = LabelParams(num_classes=num_classes, class_separation=class_separation,
                         num_genes=num_genes, risk_weights=risk)
    rows = make_labels(seed, num_slides, params)
    maps = {e.name: _random_map(seed, e) for e in encoders}
    _drop_stale(bags, {(e.name, r.slide_id) for e in encoders for r in rows})
    for i, row in enumerate(rows):
        t = _slide_tiles(seed, i, row, tiles, informative_fraction, grid)
        for enc in encoders:
            bag = Bag(slide_id=row.slide_id, features=_embed(seed, i, enc, maps[enc.name], t),
                      coords=t.coords, encoder=enc.name, mpp=MPP, tile_size=TILE_SIZE,
                      # "source" is written into every bag: the module's old path, kept.
                      attrs={LEVEL0_MPP: MPP, TILE_SIZE_LEVEL0: TILE_SIZE,
                             "source": "fusedist.fusion.synthetic", "seed": seed,
                             # What the encoder's "weights" are: its seeded random map.
                             "weights_digest": hashlib.sha256(
                                 f"{enc.name}:{enc.dim}:{seed}".encode()).hexdigest(),
                             "visible_cues": list(enc.cues),
                             "num_tumour_tiles": int(t.tumour.sum())})
            write_bag(bag_url(bags, enc.name, row.slide_id), bag)
    labels = storage.join(out, "labels.csv")
    storage.write_text(labels, labels_csv(rows))
    log.info("synthetic cohort: %d slides x %d encoders at %s", num_slides, len(encoders), out)
    return CohortInfo(bags=bags, labels=labels, encoders=[e.name for e in encoders],
                      num_slides=num_slides, num_classes=num_classes)


def tumour_mask(index: int, seed: int = 0, tiles: tuple[int, int] = (48, 96),
                informative_fraction: float = 0.5, grid: int = TILE_SIZE) -> np.ndarray:
    """(N,) bool: which tiles of slide ``index`` (row order of its bags) are tumour.

    For checking what an attention model attends to; pass the arguments given to
    ``synthetic_cohort`` (the layout depends on nothing else).
    """
    return _layout(seed, index, tiles, informative_fraction, grid)[2]
