"""A faster reader for tiled, JPEG-compressed TIFF pyramids (generic TIFF, Aperio SVS).

OpenSlide's ``read_region`` spends most of a grid tile's CPU outside JPEG decoding (cairo
compositing, ARGB conversion, its tile cache). Here each JPEG tile of the TIFF is decoded once
with Pillow into an RGB array, kept in a small LRU sized for a row band of grid tiles (plans are
row-major, so neighbouring grid tiles share TIFF tiles), and a region is assembled by copying.

It only accepts what it can reproduce byte for byte: a region wholly inside a level whose
level-0 corner is an exact multiple of an integer downsample, on a page that is tiled, 8-bit
3-sample chunky JPEG (compression 7) with photometric RGB or YCbCr. Everything else returns
``None`` and the caller uses OpenSlide. The first region of each slide is compared with
OpenSlide's; any difference (or any error) turns the fast path off for that slide, logged.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageFile, TiffImagePlugin

log = logging.getLogger(__name__)

# Decoded tiles kept at most (bytes); past this a very wide slide re-decodes some tiles of the
# row above (neighbours in a row still share), still correct.
_CACHE_BYTES = 192 << 20

_TILED_JPEG_EXTS = (".tif", ".tiff", ".svs")
# OpenSlide drivers whose levels are plain tile grids of the TIFF pages. Others that are TIFF
# underneath (Trestle's overlapping tiles, Philips' sparse tiles, Ventana, Leica) lay tiles
# out their own way and stay with OpenSlide.
_VENDORS = ("generic-tiff", "aperio")


@dataclass
class _Page:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple
    counts: tuple
    tables: bytes | None  # JPEGTables without its EOI, or None
    jpegmode: str  # colour space of the JPEG data, forced on libjpeg (see _decode)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile_w)


def _page_of(tags) -> _Page | None:
    """A page this reader can decode, or None. ``tags``: Pillow's ``tag_v2`` of the page."""
    try:
        if tags.get(259) != 7 or tags.get(322) is None or tags.get(323) is None:
            return None  # not new-style JPEG, or stripped (thumbnail/label/macro of an SVS)
        if tags.get(277, 1) != 3 or tags.get(284, 1) != 1:
            return None
        bits = tags.get(258, (8,))
        if any(b != 8 for b in (bits if isinstance(bits, tuple) else (bits,))):
            return None
        # A JPEG stream with no JFIF/Adobe marker is guessed YCbCr by libjpeg; photometric says
        # what it really is, as OpenSlide/libtiff take it, so it is told to the decoder.
        jpegmode = {2: "RGB", 6: "YCbCr"}.get(tags.get(262))
        if jpegmode is None:
            return None
        offsets, counts = tuple(tags[324]), tuple(tags[325])
        tables = tags.get(347)
        tables = bytes(tables) if tables else None
        if tables is not None:
            if not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
                return None
            tables = tables[:-2]
        page = _Page(int(tags[256]), int(tags[257]), int(tags[322]), int(tags[323]),
                     offsets, counts, tables, jpegmode)
        if len(offsets) != len(counts) or len(offsets) < page.cols * math.ceil(
                page.height / page.tile_h):
            return None
        return page
    except Exception:  # noqa: BLE001 - an odd tag: not for this reader
        return None


def _pages_by_level(path: str, level_dims) -> dict[int, _Page]:
    """OpenSlide level -> TIFF page, matched by size among the tiled top-level pages.

    OpenSlide's levels are the TIFF's tiled pages (SVS: not its stripped thumbnail, label and
    macro); matching by exact size, and only where that size is unique, needs no vendor rules.
    A level whose page is missing or undecodable here is simply left out (OpenSlide reads it).
    """
    sizes: dict[tuple[int, int], list] = {}
    # TiffImageFile, not Image.open: only tags are read, and Image.open's decompression-bomb
    # check would refuse exactly the large slides this is for.
    with open(path, "rb") as fp, TiffImagePlugin.TiffImageFile(fp) as im:
        i = 0
        while True:
            sizes.setdefault(tuple(im.size), []).append(
                _page_of(im.tag_v2) if im.tag_v2.get(322) is not None else "stripped")
            i += 1
            try:
                im.seek(i)
            except EOFError:
                break
    out = {}
    for level, dims in enumerate(level_dims):
        tiled = [p for p in sizes.get(tuple(dims), []) if p != "stripped"]
        if len(tiled) == 1 and isinstance(tiled[0], _Page):
            out[level] = tiled[0]
    return out


class TiffReader:
    """Regions of one slide from its JPEG tiles; ``region`` returns None where not accepted."""

    def __init__(self, path: str, pages: dict[int, _Page], downsamples, name: str):
        self.path, self.pages, self.name = path, pages, name
        self.downsamples = [float(d) for d in downsamples]
        self.enabled, self.checked = bool(pages), False
        self._fd = os.open(path, os.O_RDONLY)
        self._cache: OrderedDict = OrderedDict()
        self._cap = 1

    def __del__(self):
        try:
            os.close(self._fd)
        except Exception:  # noqa: BLE001
            pass

    def _decode(self, page: _Page, idx: int) -> np.ndarray:
        data = os.pread(self._fd, page.counts[idx], page.offsets[idx])
        if len(data) != page.counts[idx] or not data.startswith(b"\xff\xd8"):
            raise ValueError(f"tile {idx}: truncated or not a JPEG stream")
        # Abbreviated stream: the shared tables (without EOI) then the tile (without SOI).
        stream = page.tables + data[2:] if page.tables is not None else data
        j = Image.open(io.BytesIO(stream))
        if j.format != "JPEG" or j.mode != "RGB" or len(j.tile) != 1:
            raise ValueError(f"tile {idx}: not a 3-channel JPEG")
        t = j.tile[0]
        # args = (rawmode, jpegmode): jpegmode sets libjpeg's jpeg_color_space.
        j.tile = [ImageFile._Tile(t[0], t[1], t[2], (t[3][0], page.jpegmode))]
        a = np.asarray(j)
        if a.shape[:2] != (page.tile_h, page.tile_w):
            raise ValueError(f"tile {idx}: {a.shape[1]}x{a.shape[0]}, not the tile size")
        return a

    def _tile(self, level: int, page: _Page, tx: int, ty: int) -> np.ndarray:
        key = (level, tx, ty)
        a = self._cache.get(key)
        if a is not None:
            self._cache.move_to_end(key)
            return a
        a = self._decode(page, ty * page.cols + tx)
        self._cache[key] = a
        while len(self._cache) > self._cap:
            self._cache.popitem(last=False)
        return a

    def _assemble(self, x0: int, y0: int, level: int, size: int) -> np.ndarray | None:
        page = self.pages.get(level)
        ds = self.downsamples[level]
        if page is None or not ds.is_integer() or x0 % ds or y0 % ds or x0 < 0 or y0 < 0:
            return None
        lx, ly = int(x0 // ds), int(y0 // ds)
        if lx + size > page.width or ly + size > page.height:
            return None  # past the edge OpenSlide gives transparency: leave it to OpenSlide
        tw, th = page.tile_w, page.tile_h
        # Room for a band of grid tiles across the level (+1 row/column for misalignment).
        band = (page.cols + 1) * (math.ceil(size / th) + 1)
        self._cap = max(self._cap, min(band, max(1, _CACHE_BYTES // (tw * th * 3))))
        out = np.empty((size, size, 3), np.uint8)
        for ty in range(ly // th, (ly + size - 1) // th + 1):
            sy0, sy1 = max(ly, ty * th), min(ly + size, (ty + 1) * th)
            for tx in range(lx // tw, (lx + size - 1) // tw + 1):
                sx0, sx1 = max(lx, tx * tw), min(lx + size, (tx + 1) * tw)
                t = self._tile(level, page, tx, ty)
                out[sy0 - ly:sy1 - ly, sx0 - lx:sx1 - lx] = \
                    t[sy0 - ty * th:sy1 - ty * th, sx0 - tx * tw:sx1 - tx * tw]
        return out

    def region(self, x0: int, y0: int, level: int, size: int,
               reference: Callable[[], Image.Image]) -> Image.Image | None:
        """The ``size`` x ``size`` RGB region at level-0 corner (x0, y0) of ``level``, or None.

        ``reference`` gives OpenSlide's region as RGB; it is called once per slide, on the
        first region decoded here, and a mismatch disables this reader for the slide.
        """
        if not self.enabled:
            return None
        try:
            a = self._assemble(int(x0), int(y0), level, size)
        except Exception as e:  # noqa: BLE001 - corrupt data: OpenSlide reports it as today
            log.warning("%s: fast TIFF reader off for this slide (%s); using OpenSlide",
                        self.name, e)
            self.enabled = False
            return None
        if a is None:
            return None
        img = Image.fromarray(a, "RGB")
        if not self.checked:
            ref = reference()  # raises SlideError as the OpenSlide path does
            self.checked = True
            if ref.mode != "RGB" or ref.size != img.size or ref.tobytes() != img.tobytes():
                log.warning("%s: fast TIFF reader differs from OpenSlide at (%d, %d) level %d; "
                            "using OpenSlide for this slide", self.name, x0, y0, level)
                self.enabled = False
                return ref
            log.info("%s: fast TIFF reader matches OpenSlide; using it", self.name)
        return img


def open_reader(path: str, slide, name: str) -> TiffReader | None:
    """A TiffReader for the OpenSlide handle ``slide`` of ``path``, or None if none applies."""
    if not str(path).lower().endswith(_TILED_JPEG_EXTS):
        return None
    try:
        if slide.properties.get("openslide.vendor") not in _VENDORS:
            return None
        pages = _pages_by_level(str(path), slide.level_dimensions)
        return TiffReader(str(path), pages, slide.level_downsamples, name) if pages else None
    except Exception:  # noqa: BLE001 - Pillow cannot parse it (or the handle has failed)
        return None
