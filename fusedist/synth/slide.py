"""Write one synthetic slide: a tiled, JPEG-compressed, pyramidal RGB TIFF that OpenSlide opens.

Layout (what OpenSlide 4's ``generic-tiff`` reader needs, checked against openslide-bin 4.0):
every level is a tiled page in the *main* IFD chain (OpenSlide ignores SubIFDs: a pyramid
written as SubIFDs opens as a single level), levels decrease in size, all share the tile size
and JPEG compression, and level 0 carries X/YResolution in pixels per centimetre with
ResolutionUnit=CENTIMETER, from which OpenSlide derives ``openslide.mpp-x``/``mpp-y``.
Lower levels are marked as reduced-resolution images (NewSubfileType=1).

Level 0 is streamed: tifffile pulls rendered tiles from an iterator, and each tile is also
box-downsampled into the (16x smaller) level-1 array, from which the rest of the pyramid is
built. The files are byte-for-byte reproducible: no DateTime tag, a fixed Software tag, and a
description that only holds the generation parameters.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from fusedist.synth.fields import MASK_DOWNSAMPLE
from fusedist.synth.ink import pen_strokes
from fusedist.synth.render import Scene, TileRenderer, build_scene

GENERATOR_VERSION = "fusedist.synth/1"
"""Changes whenever the pixels for a given seed change (invalidates resumable outputs)."""


@dataclass(frozen=True)
class RenderOptions:
    """How a slide is drawn and stored (everything except its size, mpp, cues and seed)."""

    tile_size: int = 512
    jpeg_quality: int = 85
    level_downsample: int = 4
    min_level_size: int = 256
    mask_downsample: int = MASK_DOWNSAMPLE
    tissue_fraction: float = 0.5
    glands: bool = True
    stain_jitter: float = 0.08
    jpeg_threads: int = 1
    pen_strokes: int = 0                      # see fusedist.synth.ink.PenConfig
    pen_colours: tuple[str, ...] = ("blue", "green", "black")
    pen_width_um: float = 150.0


@dataclass
class SlideInfo:
    """What :func:`make_slide` wrote."""

    path: str
    width: int
    height: int
    mpp: float
    downsamples: list[int]
    tissue_fraction: float
    n_nuclei: int
    n_glands: int
    seconds: float
    mask: np.ndarray = field(repr=False)  # bool (ceil(h/ds), ceil(w/ds)), ds = mask_downsample


def level_downsamples(width: int, height: int, factor: int, min_size: int) -> list[int]:
    """1, f, f^2, ... while the level's longer side is still at least ``min_size`` px."""
    out = [1]
    while max(width, height) / (out[-1] * factor) >= min_size:
        out.append(out[-1] * factor)
    return out


def _tiles(renderer: TileRenderer, level1: np.ndarray | None, factor: int,
           progress: object | None) -> Iterator[np.ndarray]:
    """Level-0 tiles in row-major order; each is also reduced into ``level1`` on the way."""
    s = renderer.s
    nty, ntx = s.grid
    t, r = s.tile, s.tile // factor
    for ty in range(nty):
        for tx in range(ntx):
            tile = renderer.render(ty, tx)
            if level1 is not None:
                small = np.asarray(Image.fromarray(tile).reduce(factor))
                h = min(r, level1.shape[0] - ty * r)
                w = min(r, level1.shape[1] - tx * r)
                if h > 0 and w > 0:
                    level1[ty * r:ty * r + h, tx * r:tx * r + w] = small[:h, :w]
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]
            yield tile


def write_pyramid(path: str | Path, renderer: TileRenderer, opts: RenderOptions,
                  description: str, progress: object | None = None) -> list[int]:
    """Stream level 0 from ``renderer`` and write the reduced levels after it."""
    s = renderer.s
    f = opts.level_downsample
    ds = level_downsamples(s.width, s.height, f, opts.min_level_size)
    if s.tile % f:
        raise ValueError(f"tile size {s.tile} must be a multiple of level_downsample {f}")
    level1 = (np.zeros((math.ceil(s.height / f), math.ceil(s.width / f), 3), np.uint8)
              if len(ds) > 1 else None)
    common = dict(
        photometric="rgb", compression="jpeg", compressionargs={"level": opts.jpeg_quality},
        tile=(s.tile, s.tile), resolutionunit="CENTIMETER", software=GENERATOR_VERSION,
        metadata=None, datetime=None, maxworkers=opts.jpeg_threads,
    )
    px_per_cm = 1e4 / s.mpp
    # JPEG makes files far smaller than raw RGB, but the raw size bounds them safely.
    bigtiff = s.width * s.height * 3 > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        tw.write(_tiles(renderer, level1, f, progress), shape=(s.height, s.width, 3),
                 dtype=np.uint8, resolution=(px_per_cm, px_per_cm), subfiletype=0,
                 description=description, **common)
        level = level1
        for k, d in enumerate(ds[1:]):
            if k > 0:  # each further level is a box reduction of the previous one
                img = Image.fromarray(level)
                level = np.asarray(img.reduce(f)) if min(level.shape[:2]) >= f else level
            tw.write(level, resolution=(px_per_cm / d, px_per_cm / d), subfiletype=1, **common)
    return ds


def make_slide(path: str | Path, size: int | tuple[int, int] = 4096, mpp: float = 0.25,
               cues: Mapping[str, float] | None = None, seed: int = 0,
               options: RenderOptions | None = None, mask_path: str | Path | None = None,
               description: str | None = None, progress: object | None = None) -> SlideInfo:
    """Render one slide to ``path`` (a local file) and optionally its tissue mask PNG.

    ``size`` is the level-0 width = height, or ``(width, height)``. ``cues`` are standardised
    cue values (see :data:`fusedist.synth.cues.CUES`; missing cues are 0 = average). The same
    arguments always give the same bytes. ``progress`` is anything with ``update(n)`` (tqdm).
    """
    opts = options or RenderOptions()
    width, height = (size, size) if isinstance(size, int) else size
    cues = dict(cues or {})
    start = time.perf_counter()
    scene: Scene = build_scene(width, height, mpp, cues, seed, tile=opts.tile_size,
                               tissue_fraction=opts.tissue_fraction, glands=opts.glands,
                               stain_jitter=opts.stain_jitter,
                               mask_downsample=opts.mask_downsample,
                               strokes=pen_strokes(width, height, mpp, seed, opts.pen_strokes,
                                                   opts.pen_colours, opts.pen_width_um))
    if description is None:
        desc_cues = " ".join(f"{k}={v:.4f}" for k, v in sorted(cues.items()))
        description = (f"{GENERATOR_VERSION} synthetic H&E; mpp={mpp} seed={seed} "
                       f"size={width}x{height} {desc_cues}").strip()
        if opts.pen_strokes:
            description += f" pen={opts.pen_strokes}x{opts.pen_width_um:g}um"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _single_threaded_blas():
        ds = write_pyramid(path, TileRenderer(scene), opts, description, progress)
    if mask_path is not None:
        write_mask_png(scene.mask, mask_path)
    return SlideInfo(
        path=str(path), width=width, height=height, mpp=mpp, downsamples=ds,
        tissue_fraction=float(scene.mask.mean()), n_nuclei=int(scene.nuc_x.size),
        n_glands=scene.n_glands, seconds=time.perf_counter() - start, mask=scene.mask,
    )


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Per-tile GEMMs are tiny; a multi-threaded BLAS only spins (20x slower on a busy box)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def write_mask_png(mask: np.ndarray, path: str | Path) -> None:
    """Binary mask as an 8-bit PNG (255 = tissue); PIL writes no timestamps."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(str(path), format="PNG", optimize=False)
