"""Per-slide work of ``fusedist tile``: plan a slide's tiles, then write its shards.

Both functions run inside Ray tasks and return plain dicts. A per-slide problem becomes a
``failed`` record with a code and a reason; only storage failures raise.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from fusedist import shards, storage
from fusedist.formats.slide_ids import encode_id
from fusedist.state import StageState
from fusedist.tiling.config import TileConfig
from fusedist.tiling.slide import (Geometry, Mpp, SlideError, open_slide, plan_geometry,
                                   read_thumbnail, read_tile, resolve_mpp)
from fusedist.tiling.tiffread import open_reader
from fusedist.tiling.tissue import detect_tissue, draw_overview, tile_fractions
from fusedist.config import config_digest


def slide_state(dataset_url: str) -> StageState:
    """Plan records, one per slide (``status`` ok or failed)."""
    return StageState(dataset_url, "slides")


def shard_state(dataset_url: str) -> StageState:
    """Done-entries of written shards (name, rows, sha256 as written, digest of the plan)."""
    return StageState(dataset_url, "shards")


def local_copy(url: str, siblings: list[str]) -> Path:
    """A local path OpenSlide can open; multi-file formats (DICOM) fetch their siblings too."""
    for s in siblings:
        storage.fetch_local(s)
    return storage.fetch_local(url)


@functools.lru_cache(maxsize=4)
def _cached_slide(path: str):
    # Shard tasks of one slide often land on the same worker: reuse the open handle.
    return open_slide(path)


def _open_for_render(cfg: TileConfig, record: dict, siblings: list[str]):
    """(OpenSlide handle, geometry, fast TIFF reader or None) to render a slide's tiles.

    The fast reader is None for ``reader=openslide`` or a slide it does not apply to. It is
    cached, so the next shard part of the same slide on this worker reuses its decoded tiles,
    and keyed by the file's stat too, as it reads tiles at offsets parsed once (a file
    replaced between runs in a long-lived worker gets a fresh reader).
    """
    path = str(local_copy(record["url"], siblings))
    slide = _cached_slide(path)
    geo = _geometry(slide, cfg, record["mpp0"], record["url"])
    fast = None
    if cfg.reader != "openslide":
        st = os.stat(path)
        fast = _cached_reader(path, record["url"], (st.st_ino, st.st_size, st.st_mtime_ns))
    return slide, geo, fast


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, name: str, _stat: tuple):
    return open_reader(path, _cached_slide(path), name)


def _geometry(slide, cfg: TileConfig, mpp0: float, name: str) -> Geometry:
    return plan_geometry(slide, mpp0, cfg.target_mpp, cfg.out_size, name, cfg.mpp_tolerance)


def _grid(w0: int, h0: int, geo: Geometry, step0: int) -> tuple[np.ndarray, np.ndarray]:
    xs = np.arange(0, w0 - geo.size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, h0 - geo.size0 + 1, step0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    return gx.ravel(), gy.ravel()


def plan_slide(cfg: TileConfig, dataset_url: str, slide_id: str, url: str,
               siblings: list[str], identity: str, mpp: float | None = None,
               line: int = 0) -> dict:
    """Open one slide, find its tissue and choose its tiles. Returns the slide's record.

    ``mpp``: the slide table's level-0 µm/px for it (used over the file's metadata);
    ``line``: its slide table line, named in a failure's reason (0: not from a table)."""
    storage.configure(cfg.storage)

    record = {"slide_id": slide_id, "url": url, "identity": identity,
              "config_digest": config_digest(cfg, TileConfig.RUN_ONLY), "tiles": 0,
              "shards": []}
    try:
        # _plan fills the record as it learns (mpp, size...), so a failure keeps what was known.
        _plan(cfg, dataset_url, slide_id, url, siblings, record, mpp)
        record["status"] = "ok"
    except SlideError as e:
        record.update(status="failed", code=e.code, reason=e.message)
    except FileNotFoundError as e:
        record.update(status="failed", code="missing", reason=f"{url}: {e}")
    if line:
        record["table_line"] = line
        if record["status"] == "failed":
            record["reason"] = f"slide table line {line}: {record['reason']}"
    slide_state(dataset_url).write(slide_id, record)
    return record


def _plan(cfg: TileConfig, dataset_url: str, slide_id: str, url: str,
          siblings: list[str], info: dict, table_mpp: float | None = None) -> None:
    path = local_copy(url, siblings)
    slide = open_slide(path, url)
    props = dict(slide.properties)
    w0, h0 = slide.dimensions
    info.update(level0_size=[w0, h0], vendor=props.get("openslide.vendor", ""),
                dicom_series=props.get("dicom.SeriesInstanceUID"))
    mpp = (Mpp(table_mpp, "table") if table_mpp
           else resolve_mpp(props, url, cfg.mpp_override, cfg.force_mpp))
    info.update(mpp0=mpp.value, mpp_source=mpp.source)
    geo = _geometry(slide, cfg, mpp.value, url)
    info["read_level"] = geo.level
    # The thumbnail decodes the slide's pixels: a corrupt file fails here as "unreadable"
    # before any judgement about its size.
    thumb, scale = read_thumbnail(slide, cfg.tissue.thumbnail_mpp, mpp.value, url)
    if w0 < geo.size0 or h0 < geo.size0:
        raise SlideError("too_small", f"{url}: {w0}x{h0} px at level 0 is smaller than one tile "
                         f"({geo.size0}x{geo.size0} level-0 px = {cfg.out_size} px at "
                         f"{cfg.target_mpp:g} µm/px); use a smaller tile or leave it out")
    thumb_mpp = mpp.value / scale
    mask, ink = detect_tissue(thumb, thumb_mpp, cfg.tissue)
    if cfg.tissue.ink.enabled:
        info["ink_fraction"] = round(float(ink.mean()), 4)  # of the thumbnail's area
    step0 = max(1, round(cfg.step_px * cfg.target_mpp / mpp.value))
    xs, ys = _grid(w0, h0, geo, step0)
    frac = tile_fractions(mask, scale, xs, ys, geo.size0)
    keep = frac >= cfg.min_tissue
    if cfg.max_tiles_per_slide and keep.sum() > cfg.max_tiles_per_slide:
        rng = np.random.default_rng([cfg.seed, int(hashlib.sha256(slide_id.encode()).hexdigest()[:8], 16)])
        idx = np.sort(rng.choice(np.flatnonzero(keep), cfg.max_tiles_per_slide, replace=False))
        keep = np.zeros_like(keep)
        keep[idx] = True
    xs, ys, frac = xs[keep], ys[keep], frac[keep]
    if cfg.thumbnails:
        buf = io.BytesIO()
        draw_overview(thumb, mask, scale, xs, ys, geo.size0, ink=ink).save(buf, "PNG")
        info["thumbnail"] = f"thumbnails/{encode_id(slide_id)}.png"
        storage.write_bytes(storage.join(dataset_url, info["thumbnail"]), buf.getvalue())
    if len(xs) == 0:
        best = float(tile_fractions(mask, scale, *_grid(w0, h0, geo, step0), geo.size0).max(
            initial=0.0))
        raise SlideError("no_tissue", f"{url}: no tile reaches min_tissue={cfg.min_tissue} "
                         f"(best tile: {best:.2f}); check the thumbnail, or lower it with "
                         "--set min_tissue=...")
    info.update(tiles=int(len(xs)), coords=np.stack([xs, ys], 1).tolist(),
                tissue=np.round(frac, 4).tolist())


def shard_digest(record: dict, start: int, stop: int) -> str:
    """What a shard's bytes depend on: the config, the slide file and its tile list."""
    payload = [record["config_digest"], record["slide_id"], record["identity"],
               record["coords"][start:stop]]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _samples(cfg: TileConfig, record: dict, start: int, stop: int, slide, geo: Geometry,
             fast=None) -> Iterator[tuple[str, dict]]:
    sid, key = record["slide_id"], encode_id(record["slide_id"])
    # Coords are row-major (see _grid), so consecutive tiles reuse the fast reader's tiles.
    for (x, y), frac in zip(record["coords"][start:stop], record["tissue"][start:stop]):
        img = read_tile(slide, x, y, geo, record["url"], cfg.resample, fast)
        meta = {"slide_id": sid, "dataset": cfg.dataset, "x": x, "y": y,
                "mpp0": record["mpp0"], "tile_mpp": cfg.target_mpp, "size": cfg.out_size,
                "tissue": frac}
        if cfg.mode == "pairs":
            # lo is made from the decoded-free hi pixels, so both JPEGs see the same region.
            lo = img.resize((cfg.lo_size, cfg.lo_size), Image.Resampling.LANCZOS)
            meta.update(lo_mpp=cfg.lo_mpp, lo_size=cfg.lo_size)
            yield f"{key}/{x}_{y}", {"hi.jpg": _jpeg(img, cfg.jpeg_quality),
                                     "lo.jpg": _jpeg(lo, cfg.jpeg_quality), "meta.json": meta}
        else:
            yield f"{key}/{x}_{y}", {"img.jpg": _jpeg(img, cfg.jpeg_quality), "meta.json": meta}


def render_part(cfg: TileConfig, record: dict, start: int, stop: int,
                siblings: list[str]) -> list[tuple[str, dict]] | dict:
    """Tiles [start, stop) of a slide as shard samples: one part of a shard, rendered in a task
    of its own so that a slide with few shards still uses every core. A slide error comes
    back as a ``failed`` dict for the shard's writer to record."""
    storage.configure(cfg.storage)
    try:
        return list(_samples(cfg, record, start, stop, *_open_for_render(cfg, record, siblings)))
    except SlideError as e:
        return {"status": "failed", "code": e.code, "reason": e.message}


def write_slide_shard(cfg: TileConfig, dataset_url: str, record: dict, name: str,
                      start: int, stop: int, digest: str, siblings: list[str],
                      *parts: list | dict) -> dict:
    """Write one shard of a slide's tiles [start, stop) and then its done-entry.

    ``parts``: the shard's samples already rendered by :func:`render_part` tasks, in order
    (the bytes are the same either way); without them this task renders the tiles itself.
    """
    storage.configure(cfg.storage)
    failed = next((p for p in parts if isinstance(p, dict)), None)
    try:
        if failed:
            raise SlideError(failed["code"], failed["reason"])
        if parts:
            samples: Iterator = itertools.chain.from_iterable(parts)
        else:
            samples = _samples(cfg, record, start, stop, *_open_for_render(cfg, record, siblings))
        info = shards.write_shard(storage.join(dataset_url, name), samples)
    except SlideError as e:
        return {"name": name, "slide_id": record["slide_id"], "status": "failed",
                "code": e.code, "reason": e.message}
    entry = {"name": name, "slide_id": record["slide_id"], "start": start, "stop": stop,
             "digest": digest, "status": "ok", **info}
    shard_state(dataset_url).write(name, entry)
    return entry
