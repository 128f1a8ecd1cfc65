"""Pen strokes drawn over a synthetic slide, like the felt-tip marks on TCGA slides.

A stroke is a smooth random curve of constant width; its ink is an optical density added to
whatever lies under it (glass or tissue), as a marker on the coverslip absorbs light over the
stained section. The ink lives on the coarse (mask) grid and is upsampled with the tissue
fields, so a stroke's edge is as soft as the tissue border. Everything comes from its own
random stream: a slide drawn with strokes has the same tissue, nuclei and stain as without.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from fusedist.config import StrictModel

PenColour = Literal["blue", "green", "black", "red"]

PEN_OD: dict[str, tuple[float, float, float]] = {
    # RGB optical density of one coat of ink (transmission = exp(-OD)), from scans of
    # marker on glass: blue ~ (40, 70, 160), green ~ (40, 125, 75), black ~ (40, 40, 50).
    "blue": (1.85, 1.29, 0.47),
    "green": (1.85, 0.71, 1.22),
    "black": (1.85, 1.85, 1.63),
    "red": (0.25, 1.85, 1.63),
}
SEGMENTS = 48  # of a stroke's polyline: smooth at any width


class PenConfig(StrictModel):
    """Pen strokes over some slides (off by default: ``strokes: 0``)."""

    strokes: int = Field(0, ge=0)
    """Strokes per marked slide (0 = no ink anywhere)."""

    colours: list[PenColour] = Field(default_factory=lambda: ["blue", "green", "black"],
                                     min_length=1)
    """Ink colours, used in turn: stroke k has colour ``colours[k % len(colours)]``."""

    width_um: float = Field(150.0, gt=0.0)
    """Stroke width in µm (a fine marker on a real slide: 300-800 µm)."""

    slide_fraction: float = Field(1.0, ge=0.0, le=1.0)
    """Share of the slides that are marked (a seeded draw per slide)."""


@dataclass(frozen=True)
class Stroke:
    """One stroke: a polyline (level-0 px), its width (px), colour and ink density."""

    points: np.ndarray  # (SEGMENTS + 1, 2) x, y
    width_px: float
    colour: str
    density: float      # 0.7-1: how much ink one pass leaves


def pen_strokes(width: int, height: int, mpp: float, seed: int, n: int,
                colours: tuple[str, ...] | list[str], width_um: float) -> list[Stroke]:
    """``n`` strokes of a slide: curves of 30-80% of its shorter side, starting anywhere in
    its inner 80%, bending slowly (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, 0x1A4])
    out = []
    for k in range(n):
        length = rng.uniform(0.3, 0.8) * min(width, height)
        x, y = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        heading, bend = rng.uniform(0, 2 * math.pi), rng.normal(0, 1.5) / SEGMENTS
        pts = [(x, y)]
        for _ in range(SEGMENTS):
            heading += bend + rng.normal(0, 0.03)
            step = length / SEGMENTS
            x, y = x + math.cos(heading) * step, y + math.sin(heading) * step
            pts.append((x, y))
        out.append(Stroke(np.array(pts), width_um / mpp, colours[k % len(colours)],
                          float(rng.uniform(0.7, 1.0))))
    return out


def _distance(points: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Distance from each point (cx, cy) to a polyline."""
    d = np.full(cx.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((cx - x0) * dx + (cy - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
        np.minimum(d, np.hypot(cx - (x0 + t * dx), cy - (y0 + t * dy)), out=d)
    return d


def _coverage(stroke: Stroke, shape: tuple[int, int], ds: int) -> np.ndarray:
    """Share of each grid cell's centre under the stroke: 1 inside, a one-cell ramp at the
    edge, 0 outside."""
    cy, cx = (np.indices(shape) + 0.5) * ds
    d = _distance(stroke.points, cx, cy)
    return np.clip(0.5 + (stroke.width_px / 2 - d) / ds, 0.0, 1.0)


def ink_od(strokes: list[Stroke], shape: tuple[int, int], ds: int) -> np.ndarray:
    """(3, H, W) float32 optical density the strokes add on a grid of ``ds`` px cells."""
    od = np.zeros((3, *shape), np.float32)
    for s in strokes:
        od += (_coverage(s, shape, ds) * s.density)[None] * np.array(
            PEN_OD[s.colour], np.float32)[:, None, None]
    return od


def ink_mask(width: int, height: int, mpp: float, seed: int, strokes: int,
             colours: list[str], width_um: float, downsample: int) -> np.ndarray:
    """The truth: cells of a ``downsample`` grid (shape ``(ceil(h/ds), ceil(w/ds))``, as the
    tissue mask) whose centre is under a stroke. ``synthesize`` records these arguments of
    each marked slide as ``ink_args``."""
    shape = (math.ceil(height / downsample), math.ceil(width / downsample))
    out = np.zeros(shape, bool)
    for s in pen_strokes(width, height, mpp, seed, strokes, colours, width_um):
        out |= _coverage(s, shape, downsample) >= 0.5
    return out
