"""Small pyramidal TIFF slides with an exactly known tissue mask, for geometry tests.

(`fusedist.synth` makes realistic slides; these are deliberately simple so a test can say
precisely where tissue is.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def known_mask(width: int, height: int) -> np.ndarray:
    """Tissue = a disc in the upper left plus a rectangle in the lower right (level-0 px)."""
    yy, xx = np.mgrid[0:height, 0:width]
    disc = (xx - width * 0.3) ** 2 + (yy - height * 0.35) ** 2 < (min(width, height) * 0.22) ** 2
    rect = (xx > width * 0.55) & (xx < width * 0.92) & (yy > height * 0.55) & (yy < height * 0.9)
    return disc | rect


def he_texture(width: int, height: int, seed: int) -> np.ndarray:
    """Pink stroma with purple dots (nuclei), so tiles are not flat colour."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    img[...] = (232, 150, 190)
    img += rng.normal(0, 8, (height, width, 1))
    n = width * height // 900
    xs, ys = rng.integers(0, width, n), rng.integers(0, height, n)
    for dx in range(-3, 4):
        for dy in range(-3, 4):
            if dx * dx + dy * dy <= 9:
                img[np.clip(ys + dy, 0, height - 1), np.clip(xs + dx, 0, width - 1)] = (95, 60, 150)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float | None, tile: int = 256,
                  levels: int = 3) -> Path:
    """A tiled, JPEG-compressed, pyramidal TIFF (SubIFD-free: one page per level)."""
    with tifffile.TiffWriter(path) as tw:
        img = rgb
        for level in range(levels):
            kw = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2 ** level)
                kw = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(img, tile=(tile, tile), compression="jpeg", photometric="rgb",
                     subfiletype=0 if level == 0 else 1, metadata=None, **kw)
            h, w = img.shape[:2]
            if min(h, w) // 2 < tile:
                break
            img = np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.Resampling.BOX))
    return path


def make_known_slide(path: Path, width: int = 3072, height: int = 2560, mpp: float | None = 0.25,
                     seed: int = 0) -> tuple[Path, np.ndarray]:
    mask = known_mask(width, height)
    rgb = np.full((height, width, 3), 245, np.uint8)
    rgb[mask] = he_texture(width, height, seed)[mask]
    return write_pyramid(path, rgb, mpp), mask


def known_slides(folder: Path, n: int, width: int = 3584, height: int = 2688,
                 mpp: float = 0.5) -> Path:
    """``folder`` with slides ``s0.tiff .. s{n-1}.tiff`` (seeds 0..n-1); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_known_slide(folder / f"s{i}.tiff", width=width, height=height, mpp=mpp, seed=i)
    return folder
