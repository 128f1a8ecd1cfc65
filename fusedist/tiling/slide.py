"""Open whole-slide images with OpenSlide and read regions at a target resolution.

Everything here works one region at a time: a slide is never read whole into memory, and
regions come from the pyramid level closest *above* the target resolution, then are resized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Extensions OpenSlide 4 reads (vendor formats are detected by content, these pick candidates).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                    ".svslide", ".bif", ".dcm", ".czi")

# Regions are read in blocks no larger than this (pixels per side) so memory stays bounded.
_BLOCK = 4096


class SlideError(Exception):
    """A per-slide failure with a short code (for manifests) and a message naming the fix."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def slide_id_for(path_or_url: str) -> str:
    """A slide id from a file name: the name without its slide extension, as a person reads
    it (dots kept, so a TCGA barcode stays whole; no parent folders). Characters that files
    and keys cannot hold are encoded where the id is written, not here
    (:mod:`fusedist.formats.slide_ids`)."""
    stem = str(path_or_url).rstrip("/").rsplit("/", 1)[-1]
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if stem.lower().endswith(ext) and len(stem) > len(ext):
            return stem[: -len(ext)]
    return stem


def open_slide(path: str | Path, name: str | None = None):
    """OpenSlide handle, or SlideError('unopenable') naming the file."""
    import openslide

    name = name or str(path)
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise SlideError("unopenable", f"{name}: OpenSlide does not recognise this file ({e}); "
                         "check that it is a whole-slide image in a format OpenSlide 4 reads "
                         "(SVS, TIFF, NDPI, MRXS, DICOM, ...) and that it is complete") from None
    except Exception as e:  # noqa: BLE001 - OpenSlideError and OS errors
        raise SlideError("unopenable", f"{name}: cannot be opened by OpenSlide ({e}); "
                         "the file is corrupt or uses an unsupported encoding: re-export or "
                         "re-scan it, or remove it from the input") from None


@dataclass(frozen=True)
class Mpp:
    value: float
    source: str  # "metadata", "objective-power", "override"


def resolve_mpp(props: dict, name: str, override: float | None = None,
                force: bool = False) -> Mpp:
    """Level-0 µm/px from slide metadata, else objective power, else the configured override."""
    if force and override:
        return Mpp(float(override), "override")
    try:
        mx = float(props.get("openslide.mpp-x") or 0)
        my = float(props.get("openslide.mpp-y") or 0)
    except ValueError:
        mx = my = 0.0
    if mx > 0 and my > 0:
        return Mpp((mx + my) / 2, "metadata")
    if mx > 0 or my > 0:
        return Mpp(max(mx, my), "metadata")
    try:
        power = float(props.get("openslide.objective-power") or 0)
    except ValueError:
        power = 0.0
    if power > 0:
        # The usual convention: 10 µm/px at 1x (20x -> 0.5 µm/px, 40x -> 0.25 µm/px).
        return Mpp(10.0 / power, "objective-power")
    if override:
        return Mpp(float(override), "override")
    raise SlideError("no_mpp", f"{name}: no microns-per-pixel in its metadata "
                     "(openslide.mpp-x/mpp-y) and no objective power; pass --mpp-override "
                     "<µm/px at level 0> (e.g. 0.25 for 40x, 0.5 for 20x) or set "
                     "mpp_override in the config")


@dataclass(frozen=True)
class Geometry:
    """How a tile of ``out_size`` px at ``target_mpp`` maps onto a slide."""

    mpp0: float
    target_mpp: float
    out_size: int
    size0: int  # tile side in level-0 px
    level: int  # pyramid level read from
    level_downsample: float

    @property
    def read_size(self) -> int:
        """Tile side in pixels at the level that is read."""
        return max(1, math.ceil(self.size0 / self.level_downsample - 1e-6))


def plan_geometry(slide, mpp0: float, target_mpp: float, out_size: int, name: str,
                  tolerance: float = 0.15) -> Geometry:
    """Pick the level to read for tiles of ``out_size`` px at ``target_mpp`` µm/px.

    A slide coarser than the target (beyond ``tolerance``) fails: upsampling would invent
    detail the scanner never captured.
    """
    factor = target_mpp / mpp0
    if factor < 1.0 / (1.0 + tolerance):
        raise SlideError("too_coarse", f"{name}: scanned at {mpp0:.4g} µm/px, coarser than the "
                         f"requested {target_mpp:g} µm/px (tolerance {tolerance:.0%}); tile it "
                         "at a coarser resolution (tile_mpp) or leave it out")
    size0 = max(1, round(out_size * factor))
    downsamples = list(slide.level_downsamples)
    # The coarsest level that is still at least as fine as the target.
    candidates = [i for i, d in enumerate(downsamples) if d <= max(factor, 1.0) * (1 + 1e-6)]
    level = max(candidates, key=lambda i: downsamples[i]) if candidates else 0
    return Geometry(mpp0, target_mpp, out_size, size0, level, float(downsamples[level]))


def _rgba_to_rgb(img: Image.Image) -> Image.Image:
    """OpenSlide returns transparent pixels outside the scanned area: paint them white.

    Most regions are fully opaque, and compositing an opaque image over white gives it back
    unchanged, so those just drop the alpha band (a scan of it costs ~1/8 of compositing).
    """
    if img.mode != "RGBA":
        return img.convert("RGB")
    if img.getchannel("A").getextrema()[0] == 255:
        return img.convert("RGB")
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, img).convert("RGB")


Resample = str  # "reduce" | "lanczos" (TileConfig.resample)


def shrink(img: Image.Image, size: int, resample: Resample = "reduce") -> Image.Image:
    """``img`` resized to ``size`` x ``size``.

    ``reduce``: an exact integer factor k is a k x k block mean (``Image.reduce``); otherwise
    Pillow's two-step resize reduces by the integer part and applies Lanczos to the remaining
    factor (``reducing_gap=1``). ``lanczos``: Lanczos over the whole factor. Enlarging (a slide
    slightly coarser than the target, within ``mpp_tolerance``) is Lanczos in both.
    """
    if img.size == (size, size):
        return img
    w, h = img.size
    if resample == "reduce" and w == h and w > size:
        if w % size == 0:
            return img.reduce(w // size)
        return img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=1.0)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def read_region_rgb(slide, x0: int, y0: int, level: int, size: int, name: str) -> Image.Image:
    """OpenSlide's ``size`` x ``size`` region at level-0 corner (x0, y0), over white, as RGB."""
    try:
        region = slide.read_region((int(x0), int(y0)), level, (size, size))
    except Exception as e:  # noqa: BLE001 - OpenSlideError on corrupt tile data
        raise SlideError("unreadable", f"{name}: reading the region at ({x0}, {y0}) level "
                         f"{level} failed ({e}); the slide's image data is corrupt: "
                         "re-export or re-scan it, or remove it from the input") from None
    return _rgba_to_rgb(region)


def read_tile(slide, x0: int, y0: int, geo: Geometry, name: str,
              resample: Resample = "reduce", fast=None) -> Image.Image:
    """The tile whose top-left level-0 corner is (x0, y0), as an ``out_size`` RGB image.

    ``fast``: a :class:`fusedist.tiling.tiffread.TiffReader` for this slide, used for the
    regions it accepts (the same pixels as OpenSlide's); OpenSlide reads the rest.
    """
    rs = geo.read_size

    def reference() -> Image.Image:
        return read_region_rgb(slide, x0, y0, geo.level, rs, name)

    region = fast.region(x0, y0, geo.level, rs, reference) if fast is not None else None
    if region is None:
        region = reference()
    return shrink(region, geo.out_size, resample)


def read_thumbnail(slide, thumb_mpp: float, mpp0: float, name: str) -> tuple[np.ndarray, float]:
    """An RGB thumbnail at about ``thumb_mpp`` µm/px and its scale (thumb px per level-0 px).

    Read block by block from the best level, so even a single-level 100k x 100k slide never
    needs more than one block in memory.
    """
    w0, h0 = slide.dimensions
    scale = min(1.0, mpp0 / thumb_mpp)
    tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    level = slide.get_best_level_for_downsample(1.0 / scale)
    ds = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    out = Image.new("RGB", (tw, th), (255, 255, 255))
    try:
        for by in range(0, lh, _BLOCK):
            for bx in range(0, lw, _BLOCK):
                bw, bh = min(_BLOCK, lw - bx), min(_BLOCK, lh - by)
                block = _rgba_to_rgb(slide.read_region((round(bx * ds), round(by * ds)), level,
                                                       (bw, bh)))
                # Map this block's extent onto the thumbnail grid.
                tx0, ty0 = round(bx * ds * scale), round(by * ds * scale)
                tx1 = min(tw, round((bx + bw) * ds * scale))
                ty1 = min(th, round((by + bh) * ds * scale))
                if tx1 > tx0 and ty1 > ty0:
                    out.paste(block.resize((tx1 - tx0, ty1 - ty0), Image.Resampling.BOX),
                              (tx0, ty0))
    except SlideError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SlideError("unreadable", f"{name}: reading the slide's image data failed ({e}); "
                         "the file is corrupt: re-export or re-scan it, or remove it from the "
                         "input") from None
    return np.asarray(out), scale
