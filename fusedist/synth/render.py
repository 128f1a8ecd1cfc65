"""Build a slide's scene (coarse fields, nuclei, textures) and render level-0 tiles from it.

Per tile the work is: two small matrix products that bilinearly upsample the coarse and fine
grids, a window into two periodic fibre textures (a view, no copy), stamping the sprites of
the nuclei near the tile, and a few float32 passes for Beer-Lambert colour (optical density
of hematoxylin + eosin -> RGB). Tiles without tissue are a shared constant array.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

import fusedist.synth.fields as F
from fusedist.synth.cues import Morphology, morphology
from fusedist.synth.ink import Stroke, ink_od

BACKGROUND_OD = np.array([0.018, 0.022, 0.015], np.float32)  # clean glass, slightly warm
EDGE_WIDTH_UM = 1.5       # width of the tissue/background transition
EDGE_ROUGH_UM = 3.5       # how far the fibre texture pushes the tissue border in and out
EOSIN_BASE = 0.55         # eosin concentration of average stroma
HEMATOXYLIN_BASE = 0.07   # faint hematoxylin counterstain of stroma
SPINDLE_FRACTION = 0.2    # share of stroma nuclei drawn as thin fibroblast-like nuclei
FIBRE_LENGTH_UM = 4.0    # correlation length of stroma fibres along their direction
TEX_PERIODS = (1024, 1280)  # coprime-ish periods: the summed texture never visibly repeats


def upsample_matrix(tile: int, ds: int) -> np.ndarray:
    """(tile, tile/ds + 2) bilinear weights from a padded grid window to tile pixels.

    The window starts one cell before the tile (padded index = cell + 1), and pixel centre
    ``j + 0.5`` maps to window coordinate ``(j + 0.5)/ds + 0.5``, matching ``sample_grid``.
    """
    n = tile // ds + 2
    u = (np.arange(tile) + 0.5) / ds + 0.5
    i0 = np.floor(u).astype(int)
    w = (u - i0).astype(np.float32)
    a = np.zeros((tile, n), np.float32)
    a[np.arange(tile), i0] = 1 - w
    a[np.arange(tile), np.minimum(i0 + 1, n - 1)] += w
    return a


@dataclass
class Scene:
    """Everything needed to render any tile of one slide."""

    width: int
    height: int
    tile: int
    mpp: float
    mask: np.ndarray          # binary tissue mask on the mask grid
    coarse_ds: int
    coarse: np.ndarray        # (3, gy+2, gx+2): tissue alpha ramp, eosin amount, fibre blend
    fine: np.ndarray          # (2, fy+2, fx+2): eosin factor, extra hematoxylin (epithelium)
    tex: tuple[np.ndarray, np.ndarray]  # periodic textures, padded by one tile for windows
    rough: float              # tissue-alpha units per texture sd at the border
    fibre_amp: float
    h_od: np.ndarray          # float32 RGB OD per unit concentration
    e_od: np.ndarray
    sprites: list[np.ndarray]
    halves: np.ndarray        # half size of each (square) sprite
    margin: int               # nucleus buffer border (a full sprite size)
    nuc_x: np.ndarray         # nuclei sorted by tile bucket
    nuc_y: np.ndarray
    nuc_s: np.ndarray
    bucket_start: np.ndarray  # (n_buckets + 1,) offsets into the sorted nuclei
    n_glands: int
    ink: np.ndarray | None = None  # (3, gy+2, gx+2): OD of pen strokes, None = no strokes

    @property
    def grid(self) -> tuple[int, int]:
        """(tiles down, tiles across)."""
        return math.ceil(self.height / self.tile), math.ceil(self.width / self.tile)


def tissue_ramp(width: int, height: int, seed: int, tissue_fraction: float, ds: int,
                mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """The binary mask and the tissue-alpha ramp on the mask grid (unpadded).

    Alpha = 0.5 + (signed distance to the mask contour) / EDGE_WIDTH, so the border is equally
    sharp everywhere and the fibre texture moves it by at most EDGE_ROUGH_UM * TEX_CLIP (no
    specks far out on the glass). Near the contour the first-order estimate
    (f - thr) / |grad f| gives sub-cell precision; it is clamped to +-0.5 cell around the
    cell-centre distance transform of the mask, which keeps the sign of every mask cell and
    bounds the error where the field is flat or steep.
    """
    field = F.tissue_field(width, height, seed, ds)
    thr = F.tissue_threshold(field, tissue_fraction)
    mask = field > thr
    gyf, gxf = np.gradient(field)
    grad = np.maximum(ndimage.gaussian_filter(np.hypot(gyf, gxf), 1.0), 1e-6)
    sdf = np.where(mask, ndimage.distance_transform_edt(mask) - 0.5,
                   0.5 - ndimage.distance_transform_edt(~mask))
    dist_px = np.clip((field - thr) / grad, sdf - 0.5, sdf + 0.5) * ds
    return mask, (0.5 + dist_px * mpp / EDGE_WIDTH_UM).astype(np.float32)


def _place_nuclei(rng: np.random.Generator, m: Morphology, mask: np.ndarray, ramp: np.ndarray,
                  g: F.Glands, ds: int, mpp: float, width: int, height: int,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, F.SpriteBank]:
    """Stroma/tumour nuclei (Poisson per mask cell, modulated by a cellularity field, kept
    where the tissue is solid and outside glands) plus the glands' lining nuclei."""
    n = max(mask.shape)
    cell = np.exp(0.5 * F.smooth_noise(rng, mask.shape, 0.04 * n))
    cell /= cell[mask].mean() if mask.any() else 1.0
    rate = m.density_per_100um2 * (ds * mpp / 100.0) ** 2 * cell * mask
    x, y = F.scatter_nuclei(rng, rate, ds)
    keep = (F.sample_grid(ramp, ds, x, y) > 0.8) & (x < width) & (y < height)
    keep &= F.sample_grid(g.lumen + g.epithelium, F.FINE_DOWNSAMPLE, x, y) < 0.2
    x, y = x[keep], y[keep]
    bank = F.make_sprites(rng, m.nucleus_radius_um, mpp)
    s = np.where(rng.random(x.size) < SPINDLE_FRACTION,
                 rng.choice(bank.spindle, x.size), rng.choice(bank.round, x.size))
    # Lining nuclei point away from the lumen: pick the columnar sprite of that orientation.
    bins = np.round((g.nuc_angle % math.pi) / (math.pi / bank.columnar_bins)).astype(int)
    gs = bank.columnar[bins % bank.columnar_bins]
    return (np.concatenate([x, g.nuc_x]), np.concatenate([y, g.nuc_y]),
            np.concatenate([s, gs]), bank)


def build_scene(width: int, height: int, mpp: float, cues: Mapping[str, float], seed: int,
                tile: int = 512, tissue_fraction: float = 0.5, glands: bool = True,
                stain_jitter: float = 0.08, mask_downsample: int = F.MASK_DOWNSAMPLE,
                strokes: list[Stroke] | None = None) -> Scene:
    """Draw the slide's fields, nuclei and textures (everything random happens here), and
    the ink of pen ``strokes`` over them."""
    ds = mask_downsample
    if tile % ds or tile % F.FINE_DOWNSAMPLE:
        raise ValueError(f"tile size {tile} must be a multiple of {ds} and {F.FINE_DOWNSAMPLE}")
    m: Morphology = morphology(cues)
    rng = np.random.default_rng([seed, 0x5CE4E])
    nty, ntx = math.ceil(height / tile), math.ceil(width / tile)
    gy, gx = nty * tile // ds, ntx * tile // ds
    mask, ramp = tissue_ramp(width, height, seed, tissue_fraction, ds, mpp)
    ramp = F.pad_grid(ramp, gy, gx)

    # Stain amount (slide-level nuisance + smooth regional variation) and fibre direction.
    n = max(gx, gy)
    e_scale = math.exp(rng.normal(0, stain_jitter))
    h_scale = math.exp(rng.normal(0, stain_jitter))
    eosin = EOSIN_BASE * e_scale * (1 + 0.12 * F.smooth_noise(rng, mask.shape, 0.08 * n))
    blend = np.clip(0.5 + 0.6 * F.smooth_noise(rng, mask.shape, 0.05 * n), 0, 1)
    coarse = np.stack([ramp, F.pad_grid(eosin, gy, gx), F.pad_grid(blend, gy, gx)])

    # Glands on the fine grid, only where they fit inside the tissue.
    fy, fx = nty * tile // F.FINE_DOWNSAMPLE, ntx * tile // F.FINE_DOWNSAMPLE
    g = F.draw_glands(rng, ndimage.distance_transform_edt(mask) * ds, ds, (fy, fx), mpp,
                      m.glands_per_mm2 if glands else 0.0, m.nucleus_radius_um)
    eos_factor = (1 - 0.85 * g.lumen) * (1 + 0.45 * g.epithelium)
    fine = np.stack([eos_factor, 0.22 * g.epithelium]).astype(np.float32)

    x, y, s, bank = _place_nuclei(rng, m, mask, ramp, g, ds, mpp, width, height)
    halves = np.array([sp.shape[0] // 2 for sp in bank.sprites])
    if halves.max() >= tile:
        raise ValueError(f"tile size {tile} is too small for nuclei of {2 * halves.max()} px "
                         f"at {mpp} µm/px")
    # Sort nuclei by tile bucket so a tile finds its neighbours with three slices.
    bucket = np.clip(y // tile, 0, nty - 1) * ntx + np.clip(x // tile, 0, ntx - 1)
    order = np.argsort(bucket, kind="stable")
    starts = np.searchsorted(bucket[order], np.arange(nty * ntx + 1))

    # Fibre textures: two orientations, blended per region by ``blend``.
    tex = []
    angle = rng.uniform(0, math.pi)
    for period in TEX_PERIODS:
        t = F.fibre_texture(rng, period, angle, FIBRE_LENGTH_UM / mpp, m.fibre_width_um / mpp)
        angle += rng.uniform(0.35, 0.65) * math.pi
        tex.append(np.pad(t, ((0, tile), (0, tile)), mode="wrap"))

    return Scene(
        width=width, height=height, tile=tile, mpp=mpp, mask=mask, coarse_ds=ds,
        coarse=coarse.astype(np.float32), fine=fine, tex=(tex[0], tex[1]),
        rough=EDGE_ROUGH_UM / EDGE_WIDTH_UM, fibre_amp=m.fibre_amplitude,
        h_od=(m.h_od * h_scale).astype(np.float32), e_od=m.e_od.astype(np.float32),
        sprites=bank.sprites, halves=halves, margin=int(2 * halves.max() + 1),
        nuc_x=x[order], nuc_y=y[order], nuc_s=s[order], bucket_start=starts, n_glands=g.count,
        ink=None if not strokes else np.stack(
            [F.pad_grid(c, gy, gx) for c in ink_od(strokes, mask.shape, ds)]),
    )


class TileRenderer:
    """Renders level-0 tiles of a :class:`Scene` in any order (pure function of the index)."""

    def __init__(self, scene: Scene):
        self.s = scene
        t = scene.tile
        self.a_coarse = upsample_matrix(t, scene.coarse_ds)
        self.a_fine = upsample_matrix(t, F.FINE_DOWNSAMPLE)
        self.a_coarse_t = np.ascontiguousarray(self.a_coarse.T)
        self.a_fine_t = np.ascontiguousarray(self.a_fine.T)
        self.stains = np.stack([scene.e_od, scene.h_od]).astype(np.float32)  # (2, 3)
        self.nuc = np.zeros((t + 2 * scene.margin,) * 2, np.float32)
        od = np.broadcast_to(BACKGROUND_OD, (t, t, 3))
        self.background = np.round(255 * np.exp(-od)).astype(np.uint8)
        # Largest tissue alpha the texture can add: tiles whose ramp stays below -this are empty.
        self.max_rough = scene.rough * F.TEX_CLIP

    def _nuclei(self, ty: int, tx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tile-local positions and sprite ids of the nuclei that can touch this tile."""
        s, t = self.s, self.s.tile
        nty, ntx = s.grid
        parts = []
        for by in range(max(ty - 1, 0), min(ty + 2, nty)):
            lo = s.bucket_start[by * ntx + max(tx - 1, 0)]
            hi = s.bucket_start[by * ntx + min(tx + 1, ntx - 1) + 1]
            parts.append(slice(lo, hi))
        x = np.concatenate([s.nuc_x[p] for p in parts]) - tx * t
        y = np.concatenate([s.nuc_y[p] for p in parts]) - ty * t
        sid = np.concatenate([s.nuc_s[p] for p in parts])
        h = s.halves[sid]
        near = (x + h >= 0) & (x - h < t) & (y + h >= 0) & (y - h < t)
        return x[near], y[near], sid[near]

    def _stamp(self, x: np.ndarray, y: np.ndarray, sid: np.ndarray) -> np.ndarray:
        """Hematoxylin of the nuclei on this tile (max where nuclei overlap)."""
        buf, m, t = self.nuc, self.s.margin, self.s.tile
        buf.fill(0.0)
        sprites, halves = self.s.sprites, self.s.halves
        for cx, cy, k in zip((x + m).tolist(), (y + m).tolist(), sid.tolist()):
            h = int(halves[k])
            sub = buf[cy - h:cy + h + 1, cx - h:cx + h + 1]
            np.maximum(sub, sprites[k], out=sub)
        return buf[m:m + t, m:m + t]

    def render(self, ty: int, tx: int) -> np.ndarray:
        """RGB uint8 tile (tile, tile, 3) at tile row ``ty``, column ``tx``."""
        s, t = self.s, self.s.tile
        x0, y0 = tx * t, ty * t
        dc, df = s.coarse_ds, F.FINE_DOWNSAMPLE
        # Contiguous windows: batched matmul on strided views falls off the BLAS fast path.
        win = np.ascontiguousarray(
            s.coarse[:, y0 // dc:y0 // dc + t // dc + 2, x0 // dc:x0 // dc + t // dc + 2])
        nx, ny, sid = self._nuclei(ty, tx)
        ink = None
        if s.ink is not None:
            ink = np.ascontiguousarray(
                s.ink[:, y0 // dc:y0 // dc + t // dc + 2, x0 // dc:x0 // dc + t // dc + 2])
            ink = ink if ink.max() > 0 else None
        if win[0].max() + self.max_rough <= 0 and nx.size == 0 and ink is None:
            return self.background
        up = self.a_coarse @ win @ self.a_coarse_t
        fwin = np.ascontiguousarray(
            s.fine[:, y0 // df:y0 // df + t // df + 2, x0 // df:x0 // df + t // df + 2])
        upf = self.a_fine @ fwin @ self.a_fine_t
        (p1, p2) = (s.tex[0].shape[0] - t, s.tex[1].shape[0] - t)
        t1 = s.tex[0][y0 % p1:y0 % p1 + t, x0 % p1:x0 % p1 + t]
        t2 = s.tex[1][y0 % p2:y0 % p2 + t, x0 % p2:x0 % p2 + t]
        tex = t1 + up[2] * (t2 - t1)
        alpha = np.clip(up[0] + s.rough * tex, 0.0, 1.0)
        fib = np.clip(1.0 + s.fibre_amp * tex, 0.05, None)
        conc = np.empty((t, t, 2), np.float32)  # per-pixel (eosin, hematoxylin)
        np.multiply(alpha * up[1] * upf[0], fib, out=conc[..., 0])
        np.add(self._stamp(nx, ny, sid), alpha * (HEMATOXYLIN_BASE + upf[1]), out=conc[..., 1])
        # Beer-Lambert: OD = concentrations @ stain vectors (one small GEMM), RGB = exp(-OD).
        od = conc.reshape(-1, 2) @ self.stains
        od += BACKGROUND_OD
        if ink is not None:  # a marker on the coverslip absorbs over glass and tissue alike
            od += (self.a_coarse @ ink @ self.a_coarse_t).reshape(3, -1).T
        np.exp(-od, out=od)
        od *= 255.0
        od += 0.5
        return od.astype(np.uint8).reshape(t, t, 3)
