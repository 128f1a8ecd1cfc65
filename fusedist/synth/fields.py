"""Low-resolution fields of a synthetic slide, computed once before any tile is rendered.

A 20,000 px slide must never exist as a full-resolution float array, so everything that varies
slowly (tissue outline, stain intensity, gland lumens) lives on coarse grids, and everything
that is sharp but small (nuclei) is a list of positions plus a bank of pre-drawn sprites.
The renderer upsamples a tile-sized window of each grid and stamps the nearby sprites.

Coordinates are level-0 pixels with pixel centres at ``i + 0.5``; cell ``j`` of a grid with
downsample ``ds`` covers level-0 pixels ``[j*ds, (j+1)*ds)``. Grids used by the renderer are
padded by one cell on every side (index = cell + 1) so bilinear windows never fall off the edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MASK_DOWNSAMPLE = 32
"""Default downsample of the tissue mask (and of the coarse fields) relative to level 0."""

TEX_CLIP = 2.5
"""Fibre textures are standardised and clipped to +-TEX_CLIP sd."""

FINE_DOWNSAMPLE = 8
"""Downsample of the gland maps: fine enough for crisp lumen edges, small enough to keep."""


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, standardised to mean 0 / std 1 (float32)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), max(sigma, 0.5), mode="reflect")
    f -= f.mean()
    return (f / (f.std() + 1e-9)).astype(np.float32)


# ----------------------------------------------------------------------------- tissue


def tissue_field(width: int, height: int, seed: int,
                 downsample: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """Continuous 'tissueness' on the mask grid; tissue is where it exceeds a quantile.

    A few elliptical islands (sizes relative to the slide, so any slide size has islands)
    plus two octaves of smooth noise that make the borders irregular and punch small holes.
    The field tapers to low values at the slide border so islands rarely touch the edge.
    """
    rng = np.random.default_rng([seed, 0x7155])
    ny, nx = math.ceil(height / downsample), math.ceil(width / downsample)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    yy, xx = (yy + 0.5) / ny, (xx + 0.5) / nx
    aspect = width / height
    f = np.zeros((ny, nx), np.float32)
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        ry, rx = rng.uniform(0.12, 0.32, 2)
        ang = rng.uniform(0, math.pi)
        dy, dx = yy - cy, (xx - cx) * aspect
        u = (dx * math.cos(ang) + dy * math.sin(ang)) / rx
        v = (-dx * math.sin(ang) + dy * math.cos(ang)) / ry
        f = np.maximum(f, np.exp(-0.5 * (u * u + v * v)))
    n = max(nx, ny)
    f += 0.22 * smooth_noise(rng, (ny, nx), 0.06 * n) + 0.08 * smooth_noise(rng, (ny, nx), 0.015 * n)
    taper = np.minimum.reduce([yy, 1 - yy, xx, 1 - xx]) / 0.08
    return (f * np.clip(taper, 0, 1)).astype(np.float32)


def tissue_threshold(field: np.ndarray, tissue_fraction: float) -> float:
    """The level at which the field covers ``tissue_fraction`` of the slide."""
    return float(np.quantile(field, 1.0 - float(np.clip(tissue_fraction, 0.02, 0.98))))


def tissue_mask(width: int, height: int | None = None, seed: int = 0,
                tissue_fraction: float = 0.5, downsample: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """The binary tissue mask of a slide, shape ``(ceil(h/ds), ceil(w/ds))``, True = tissue.

    Exactly the mask that :func:`fusedist.synth.make_slide` writes as ``masks/<id>.png`` for
    the same ``(width, height, seed, tissue_fraction, downsample)``: cell ``(j, i)`` describes
    level-0 pixels ``[j*ds, (j+1)*ds) x [i*ds, (i+1)*ds)`` and is True when the tissue field
    at the cell centre is above threshold. The rendered border follows the mask contour but is
    roughened at full resolution: pixels within ~9 µm plus half a cell of it may differ.
    """
    height = width if height is None else height
    f = tissue_field(width, height, seed, downsample)
    return f > tissue_threshold(f, tissue_fraction)


# ----------------------------------------------------------------------------- grids


def pad_grid(field: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """``field`` placed at index 1 of a ``(ny+2, nx+2)`` grid, borders repeating the edge.

    ``ny, nx`` cover the whole tile grid (a multiple of the tile size), which may be larger
    than the slide; the extra cells are never visible because TIFF crops edge tiles.
    """
    f = field[:ny, :nx]
    return np.pad(f, ((1, ny + 1 - f.shape[0]), (1, nx + 1 - f.shape[1])), mode="edge")


def sample_grid(grid: np.ndarray, ds: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear value of a padded grid at level-0 pixels ``(x, y)`` (same rule as tiles)."""
    u = np.clip((x + 0.5) / ds + 0.5, 0, grid.shape[1] - 1.001)
    v = np.clip((y + 0.5) / ds + 0.5, 0, grid.shape[0] - 1.001)
    i, j = u.astype(np.int64), v.astype(np.int64)
    fu, fv = u - i, v - j
    top = grid[j, i] * (1 - fu) + grid[j, i + 1] * fu
    bot = grid[j + 1, i] * (1 - fu) + grid[j + 1, i + 1] * fu
    return top * (1 - fv) + bot * fv


# ----------------------------------------------------------------------------- glands


@dataclass
class Glands:
    """Gland maps on the padded fine grid plus the nuclei lining each gland."""

    lumen: np.ndarray      # (ny+2, nx+2) float32 in [0, 1]: 1 = inside a lumen
    epithelium: np.ndarray  # same grid: 1 = in the epithelial ring around a lumen
    nuc_x: np.ndarray       # level-0 positions of lining nuclei (int64)
    nuc_y: np.ndarray
    nuc_angle: np.ndarray   # radial direction of each lining nucleus (radians)
    count: int


@dataclass
class _Gland:
    """Geometry of one gland in level-0 px: a wavy ellipse (lumen) and a ring around it."""

    cx: float
    cy: float
    r: float          # mean lumen radius
    aspect: float     # lumen semi-axes: r * sqrt(aspect), r / sqrt(aspect)
    theta: float      # orientation of the long axis
    thick: float      # epithelium thickness
    wobble: tuple[float, int, float]  # amplitude, lobes, phase of the border waviness

    @property
    def axes(self) -> tuple[float, float]:
        return self.r * math.sqrt(self.aspect), self.r / math.sqrt(self.aspect)

    @property
    def outer(self) -> float:
        return self.axes[0] + self.thick


def _rasterise(gl: _Gland, lumen: np.ndarray, epi: np.ndarray) -> bool:
    """Draw the gland on the padded fine grids; False (nothing drawn) if it would overlap."""
    ds, (ny, nx) = FINE_DOWNSAMPLE, (lumen.shape[0] - 2, lumen.shape[1] - 2)
    j0, j1 = max(int((gl.cy - gl.outer) / ds), 0), min(int((gl.cy + gl.outer) / ds) + 2, ny)
    i0, i1 = max(int((gl.cx - gl.outer) / ds), 0), min(int((gl.cx + gl.outer) / ds) + 2, nx)
    sl = (slice(j0 + 1, j1 + 1), slice(i0 + 1, i1 + 1))  # padded index = cell + 1
    if j1 <= j0 or i1 <= i0 or epi[sl].max() > 0:
        return False
    a, b = gl.axes
    py = (np.arange(j0, j1, dtype=np.float32)[:, None] + 0.5) * ds - gl.cy
    px = (np.arange(i0, i1, dtype=np.float32)[None, :] + 0.5) * ds - gl.cx
    u = px * math.cos(gl.theta) + py * math.sin(gl.theta)
    v = -px * math.sin(gl.theta) + py * math.cos(gl.theta)
    amp, lobes, phase = gl.wobble
    wave = 1.0 + amp * np.sin(lobes * np.arctan2(v / b, u / a) + phase)
    edge = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wave * gl.r  # ~ px from the centre
    lum = np.clip((gl.r - edge) / ds + 0.5, 0, 1)  # anti-aliased over one fine cell
    ring = np.clip((gl.r + gl.thick - edge) / ds + 0.5, 0, 1) - lum
    lumen[sl] = np.maximum(lumen[sl], lum)
    epi[sl] = np.maximum(epi[sl], ring)
    return True


def _lining(rng: np.random.Generator, gl: _Gland, nucleus_px: float,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nuclei along the middle of the ring, ~1.6 nucleus widths apart, with their radial
    direction (columnar epithelium: nuclei elongated away from the lumen)."""
    a, b = gl.axes
    r_mid = gl.r + 0.5 * gl.thick
    perimeter = 2 * math.pi * r_mid * math.sqrt((gl.aspect + 1 / gl.aspect) / 2)
    n = max(6, int(perimeter / (1.6 * nucleus_px)))
    step = 2 * math.pi / n
    t = np.arange(n) * step + rng.uniform(-0.3, 0.3, n) * step
    amp, lobes, phase = gl.wobble
    s = (r_mid + rng.normal(0, 0.12 * gl.thick, n)) / gl.r * (1 + amp * np.sin(lobes * t + phase))
    lu, lv = a * s * np.cos(t), b * s * np.sin(t)
    dx = lu * math.cos(gl.theta) - lv * math.sin(gl.theta)
    dy = lu * math.sin(gl.theta) + lv * math.cos(gl.theta)
    return (np.round(gl.cx + dx).astype(np.int64), np.round(gl.cy + dy).astype(np.int64),
            np.arctan2(dy, dx))


def draw_glands(rng: np.random.Generator, tissue_dist_px: np.ndarray, mask_ds: int,
                grid_shape: tuple[int, int], mpp: float, per_mm2: float,
                nucleus_radius_um: float) -> Glands:
    """Place non-overlapping glands inside tissue and rasterise them on the fine grid.

    ``tissue_dist_px`` is the distance (level-0 px) from each mask cell to background, so a
    gland is only accepted where it fits inside the tissue. Each gland is a slightly wavy
    elliptical lumen with a ring of epithelium, lined by nuclei oriented radially (columnar).
    """
    ny, nx = grid_shape
    lumen = np.zeros((ny + 2, nx + 2), np.float32)
    epi = np.zeros_like(lumen)
    lined: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    cells = np.flatnonzero(tissue_dist_px > 40.0 / mpp)
    area_mm2 = cells.size * (mask_ds * mpp / 1000.0) ** 2
    wanted = int(rng.poisson(per_mm2 * area_mm2)) if cells.size else 0
    for _ in range(wanted * 3):  # rejection sampling: misfits and overlaps are dropped
        if len(lined) >= wanted:
            break
        c = int(rng.choice(cells))
        gl = _Gland(
            cx=(c % tissue_dist_px.shape[1] + rng.random()) * mask_ds,
            cy=(c // tissue_dist_px.shape[1] + rng.random()) * mask_ds,
            r=rng.uniform(12.0, 40.0) / mpp, aspect=rng.uniform(1.0, 1.7),
            theta=rng.uniform(0, math.pi), thick=rng.uniform(2.6, 3.4) * nucleus_radius_um / mpp,
            wobble=(rng.uniform(0.03, 0.10), int(rng.integers(3, 7)), rng.uniform(0, 2 * math.pi)),
        )
        fits = tissue_dist_px[int(gl.cy // mask_ds), int(gl.cx // mask_ds)] >= gl.outer + 8 / mpp
        if fits and _rasterise(gl, lumen, epi):
            lined.append(_lining(rng, gl, nucleus_radius_um / mpp))
    cat = (lambda k, dt: np.concatenate([p[k] for p in lined]) if lined else np.zeros(0, dt))
    return Glands(lumen, epi, cat(0, np.int64), cat(1, np.int64), cat(2, np.float64),
                  len(lined))


# ----------------------------------------------------------------------------- nuclei


@dataclass
class SpriteBank:
    """Pre-drawn nuclei (hematoxylin concentration, float32) and how to pick them.

    ``round``/``spindle``/``columnar`` are index ranges into ``sprites``; columnar sprites are
    ordered by orientation bin so a gland can pick the one pointing away from its lumen.
    """

    sprites: list[np.ndarray]
    round: np.ndarray
    spindle: np.ndarray
    columnar: np.ndarray
    columnar_bins: int

    @property
    def margin(self) -> int:
        return max(max(s.shape) for s in self.sprites) // 2 + 1


def _draw_nucleus(rng: np.random.Generator, a: float, b: float, angle: float,
                  darkness: float) -> np.ndarray:
    """One elliptical nucleus: soft edge, darker rim (membrane), speckled chromatin."""
    half = int(math.ceil(max(a, b))) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    inside = np.clip((1.0 - d) * b + 0.5, 0, 1)  # ~1 px anti-aliased border
    chrom = ndimage.gaussian_filter(rng.standard_normal(d.shape), 0.8)
    chrom = chrom / (chrom.std() + 1e-6)
    conc = darkness * (0.78 + 0.10 * chrom + 0.25 * np.clip(d - 0.6, 0, 0.4) / 0.4)
    return (inside * np.clip(conc, 0.2, None)).astype(np.float32)


def make_sprites(rng: np.random.Generator, radius_um: float, mpp: float,
                 n_round: int = 64, n_spindle: int = 16, columnar_bins: int = 16) -> SpriteBank:
    """Draw the slide's nuclei. ``radius_um`` (the nuclear-size cue) sets the mean radius."""
    sprites: list[np.ndarray] = []
    r_px = radius_um / mpp
    for _ in range(n_round):  # tumour / lymphocyte-like: pleomorphic, slightly elongated
        r = r_px * math.exp(rng.normal(0, 0.18))
        asp = 1.0 + abs(rng.normal(0, 0.25))
        sprites.append(_draw_nucleus(rng, r * math.sqrt(asp), r / math.sqrt(asp),
                                     rng.uniform(0, math.pi), rng.uniform(0.9, 1.5)))
    for _ in range(n_spindle):  # fibroblast-like: thin and long
        w = 0.45 * r_px * math.exp(rng.normal(0, 0.1))
        sprites.append(_draw_nucleus(rng, w * rng.uniform(3.0, 4.0), w,
                                     rng.uniform(0, math.pi), rng.uniform(1.0, 1.4)))
    for k in range(columnar_bins):  # gland lining: elongated along the radial direction
        r = 0.9 * r_px
        sprites.append(_draw_nucleus(rng, r * 1.45, r / 1.45, k * math.pi / columnar_bins,
                                     rng.uniform(1.0, 1.4)))
    n0 = n_round + n_spindle
    return SpriteBank(sprites, np.arange(n_round), np.arange(n_round, n0),
                      np.arange(n0, n0 + columnar_bins), columnar_bins)


def scatter_nuclei(rng: np.random.Generator, rate_per_cell: np.ndarray,
                   ds: int) -> tuple[np.ndarray, np.ndarray]:
    """Poisson nuclei per coarse cell, uniform inside the cell (level-0 integer positions)."""
    counts = rng.poisson(np.maximum(rate_per_cell, 0)).ravel()
    cells = np.repeat(np.arange(counts.size), counts)
    ny, nx = rate_per_cell.shape
    y = ((cells // nx) + rng.random(cells.size)) * ds
    x = ((cells % nx) + rng.random(cells.size)) * ds
    return x.astype(np.int64), y.astype(np.int64)


# ----------------------------------------------------------------------------- texture


def fibre_texture(rng: np.random.Generator, period: int, angle: float, length_px: float,
                  width_px: float) -> np.ndarray:
    """Periodic stroma texture: white noise filtered by an oriented Gaussian (fibres).

    Periodic so tiles can take any window with wrap-around; two textures with different
    periods are summed by the renderer, so the repetition is not visible.
    """
    k = np.fft.fftfreq(period).astype(np.float32)
    ky, kx = k[:, None], k[None, :]
    kpar = kx * math.cos(angle) + ky * math.sin(angle)
    kperp = -kx * math.sin(angle) + ky * math.cos(angle)
    filt = np.exp(-2 * math.pi ** 2 * ((length_px * kpar) ** 2 + (width_px * kperp) ** 2))
    filt[0, 0] = 0.0
    noise = np.fft.fft2(rng.standard_normal((period, period)).astype(np.float32))
    tex = np.fft.ifft2(noise * filt).real
    tex /= tex.std() + 1e-9
    # Clipped so that everything the texture modulates (tissue border, fibres) is bounded.
    return np.clip(tex, -TEX_CLIP, TEX_CLIP).astype(np.float32)
