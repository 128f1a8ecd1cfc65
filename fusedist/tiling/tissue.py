"""Tissue detection on a thumbnail, and the tissue fraction of each candidate tile."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field
from scipy import ndimage

from fusedist.config import StrictModel
from fusedist.tiling.ink import InkConfig, ink_pixels


class TissueConfig(StrictModel):
    """Tissue mask from a thumbnail: Otsu on HSV saturation, then morphology."""

    thumbnail_mpp: float = 8.0
    """Resolution of the thumbnail the mask is computed on (µm/px)."""

    min_saturation: int = 20
    """Saturation floor (0-255): Otsu's threshold is never set below this, so a blank slide's
    noise is not called tissue."""

    max_value_dark: int = 30
    """Pixels darker than this brightness (0-255) are ignored (black borders, pen marks)."""

    close_um: float = 40.0
    """Closing radius (µm) that joins fragments of the same tissue piece."""

    open_um: float = 16.0
    """Opening radius (µm) that removes specks."""

    min_area_um2: float = 20000.0
    """Connected tissue pieces smaller than this area (µm²) are dropped (debris)."""

    fill_holes: bool = True
    """Fill holes inside tissue (lumens and fat are still tissue context)."""

    ink: InkConfig = Field(default_factory=InkConfig)
    """Pen marks (blue, green, black) that are taken out of the tissue."""


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (the split that maximises between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return int(np.argmax(between))


def _disk(radius_px: float) -> np.ndarray:
    r = max(0, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r


def tissue_mask(thumb_rgb: np.ndarray, thumb_mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Boolean mask (H, W) of tissue on an RGB thumbnail at ``thumb_mpp`` µm/px."""
    return detect_tissue(thumb_rgb, thumb_mpp, cfg)[0]


def detect_tissue(thumb_rgb: np.ndarray, thumb_mpp: float,
                  cfg: TissueConfig) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, ink): boolean masks (H, W) on an RGB thumbnail at ``thumb_mpp`` µm/px.

    ``ink`` is the pen ink found (grown by its margin; all False when ``ink.enabled`` is off),
    which ``tissue`` never overlaps.
    """
    hsv = np.asarray(Image.fromarray(thumb_rgb).convert("HSV"))
    sat, val = hsv[..., 1], hsv[..., 2]
    ink = np.zeros(sat.shape, bool)
    if cfg.ink.enabled:
        ink = ink_pixels(hsv, cfg.ink)
        if ink.any() and cfg.ink.margin_um > 0:
            ink = ndimage.binary_dilation(ink, _disk(cfg.ink.margin_um / thumb_mpp))
    # Saturated ink would pull Otsu's threshold towards itself: it is left out of the split.
    valid = (val >= cfg.max_value_dark) & ~ink
    thr = max(cfg.min_saturation, otsu_threshold(sat[valid]) if valid.any() else 255)
    mask = (sat > thr) & valid
    if cfg.close_um > 0:
        mask = ndimage.binary_closing(mask, _disk(cfg.close_um / thumb_mpp), border_value=0)
    if cfg.fill_holes:
        mask = _fill_holes(mask, ink)
    if cfg.open_um > 0:
        mask = ndimage.binary_opening(mask, _disk(cfg.open_um / thumb_mpp))
    if ink.any():
        # Cut after closing and filling, which bridge into a stroke; opening again removes
        # the slivers left along it.
        mask &= ~ink
        if cfg.open_um > 0:
            mask = ndimage.binary_opening(mask, _disk(cfg.open_um / thumb_mpp))
    if cfg.min_area_um2 > 0 and mask.any():
        # A piece is measured with the ink on it: tissue that a stroke cuts off a large piece
        # is not debris.
        labels, n = ndimage.label(mask | ink)
        areas = np.bincount(labels[mask], minlength=n + 1)[1:] * thumb_mpp * thumb_mpp
        keep = np.concatenate([[False], areas >= cfg.min_area_um2])
        mask = keep[labels] & mask
    return mask, ink


def _fill_holes(mask: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled, and the holes that a stroke opens to the glass too.

    Such a hole is a region that tissue and ink enclose together. It is filled if tissue makes
    at least half of its rim and it rings no tissue: a lumen a stroke crosses is filled, the
    glass between a circle drawn around a piece and the piece is not.
    """
    filled = ndimage.binary_fill_holes(mask)
    if not ink.any():
        return filled
    solid = filled | ink
    holes = ndimage.binary_fill_holes(solid) & ~solid
    labels, n = ndimage.label(holes)
    if n == 0:
        return filled
    rim = np.where(holes, 0, ndimage.grey_dilation(labels, size=3))  # the hole beside
    tissue = np.bincount(rim[filled], minlength=n + 1)
    inked = np.bincount(rim[ink & ~filled], minlength=n + 1)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if tissue[k] < inked[k]:
            continue
        hole = labels[box] == k
        if not (ndimage.binary_fill_holes(hole) & filled[box]).any():
            filled[box] |= hole
    return filled


def tile_fractions(mask: np.ndarray, scale: float, xs: np.ndarray, ys: np.ndarray,
                   size0: int) -> np.ndarray:
    """Tissue fraction of each level-0 square (xs[i], ys[i], size0) using an integral image."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)

    def to_mask(v: np.ndarray, hi: int) -> np.ndarray:
        return np.clip(np.round(v * scale).astype(np.int64), 0, hi)

    x0, y0 = to_mask(xs, w), to_mask(ys, h)
    x1, y1 = to_mask(xs + size0, w), to_mask(ys + size0, h)
    # A tile thinner than one mask pixel still covers one pixel.
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def draw_overview(thumb_rgb: np.ndarray, mask: np.ndarray, scale: float, xs: np.ndarray,
                  ys: np.ndarray, size0: int, min_side: int = 768,
                  ink: np.ndarray | None = None) -> Image.Image:
    """The thumbnail with the tissue mask tinted blue, the pen ink taken out of it hatched in
    orange, and each kept tile outlined in green.

    Small thumbnails are enlarged (nearest neighbour) to ``min_side`` so a person can see them.
    """
    img = Image.fromarray(thumb_rgb).convert("RGB")
    img = _tint(img, mask, (0, 90, 255), 0.25)
    if ink is not None and ink.any():
        # Diagonal hatching keeps the ink visible under the overlay (blue ink, blue tint).
        yy, xx = np.indices(ink.shape)
        img = _tint(img, ink & ((xx + yy) % 4 < 2), (255, 140, 0), 0.8)
    up = max(1, min_side // max(img.size))
    if up > 1:
        img = img.resize((img.width * up, img.height * up), Image.Resampling.NEAREST)
        scale *= up
    draw = ImageDraw.Draw(img)
    s = max(1, round(size0 * scale))
    for x, y in zip(xs.tolist(), ys.tolist()):
        tx, ty = round(x * scale), round(y * scale)
        draw.rectangle([tx, ty, tx + s - 1, ty + s - 1], outline=(0, 200, 0))
    return img


def _tint(img: Image.Image, where: np.ndarray, colour: tuple[int, int, int],
          alpha: float) -> Image.Image:
    """``img`` blended towards ``colour`` by ``alpha`` where ``where`` is True."""
    return Image.composite(Image.blend(img, Image.new("RGB", img.size, colour), alpha), img,
                           Image.fromarray((where * 255).astype(np.uint8)))
