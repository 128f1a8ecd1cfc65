"""Slide bags: one HDF5 file per slide per encoder, ``<root>/<encoder>/<slide_id>.h5``.

A bag holds ``features`` (N, D) (float32 or float16) and ``coords`` (N, 2) int64 (level-0 x, y
of each tile's top-left corner). fusedist's own bags carry the encoder, mpp, tile size, slide id
and free-form provenance (weights digest, source dataset, ...) as file attributes, and also the
attributes TRIDENT writes on ``coords`` (patch_size, patch_size_level0, level0_magnification,
target_magnification, name), so TRIDENT tools can read them too.

Readers accept fusedist bags, TRIDENT feature folders (``features_<encoder>/<slide>.h5``),
CLAM feature folders (``<dir>/h5_files/<slide>.h5`` + ``<dir>/pt_files/<slide>.pt``) and STAMP
feature files (``feats`` + ``coords`` in µm). :func:`encoder_folders` finds the encoder folders
of a bag root, a TRIDENT job folder included.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from fusedist import storage
from fusedist.formats.slide_ids import decode_id, encode_id

FORMAT_ATTR = "fusedist_bag"
"""Root attribute that marks a file written by :func:`write_bag` (value: format version)."""
FORMAT_VERSION = 1

LEVEL0_MPP = "level0_mpp"
"""Conventional ``Bag.attrs`` key: the slide's level-0 µm/px."""
TILE_SIZE_LEVEL0 = "tile_size_level0"
"""Conventional ``Bag.attrs`` key: a tile's edge in level-0 pixels."""

_JSON_KEYS = "fusedist_json_attrs"  # root attr listing the attrs stored as JSON text
_RESERVED = {"slide_id", "encoder", "mpp", "tile_size", FORMAT_ATTR, _JSON_KEYS}
_CHUNK_BYTES = 1 << 20  # ~1 MiB feature chunks: whole-bag reads stay fast, partial reads cheap
_FINITE_CHECK_ROWS = 8192  # bounds the temporary bool array of the NaN/inf scan


class BagError(ValueError):
    """A bag is malformed or unreadable; the message names the slide or the file."""


@dataclass
class Bag:
    """The tiles of one slide embedded by one encoder."""

    slide_id: str
    features: np.ndarray  # (N, D) float32 or float16
    coords: np.ndarray  # (N, 2) int64: level-0 x, y of each tile's top-left corner
    encoder: str
    mpp: float | None = None  # µm/px the tiles were read at
    tile_size: int | None = None  # tile edge in px at that mpp
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def bag_url(root: str, encoder: str, slide_id: str) -> str:
    """``<root>/<encoder>/<slide_id>.h5``, the id encoded for file names (its true form is
    the bag's ``slide_id`` attribute; :mod:`fusedist.formats.slide_ids`)."""
    # A '/' would put the bag in a subfolder, where list_bags would never find it.
    if not encoder or "/" in encoder:
        raise ValueError(f"bag encoder {encoder!r}: must be non-empty and contain no '/'")
    if not slide_id:
        raise ValueError("bag slide_id: must be non-empty")
    return storage.join(root, encoder, f"{encode_id(slide_id)}.h5")


# ----------------------------------------------------------------------------- validation

def _first_bad_row(features: np.ndarray) -> int | None:
    """Index of the first row with a NaN or inf, else None (scanned in blocks of rows)."""
    for start in range(0, features.shape[0], _FINITE_CHECK_ROWS):
        ok = np.isfinite(features[start:start + _FINITE_CHECK_ROWS]).all(axis=1)
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


def _check_finite(features: np.ndarray, where: str) -> None:
    row = _first_bad_row(features)
    if row is not None:
        raise BagError(f"{where}: features row {row} (of {features.shape[0]}) has NaN or inf")


def _features_array(features: Any, where: str) -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise BagError(f"{where}: features must be (N, D) with D >= 1, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise BagError(f"{where}: features must be floating point, got {arr.dtype}")
    if arr.dtype not in (np.float16, np.float32):
        arr = arr.astype(np.float32)  # float64 etc.: half the bytes, no useful precision lost
    return np.ascontiguousarray(arr)


def _coords_array(coords: Any, n: int, where: str) -> np.ndarray:
    arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise BagError(f"{where}: coords must be (N, 2), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise BagError(f"{where}: {n} feature rows but {arr.shape[0]} coords rows")
    if arr.dtype.kind == "f":
        # Pixel coordinates are integers; a fractional one means the caller mixed up levels.
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise BagError(f"{where}: coords must be whole level-0 pixels")
    elif arr.dtype.kind not in "iu":
        raise BagError(f"{where}: coords must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


# ----------------------------------------------------------------------------- attributes

def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, bool, int, float, np.bool_, np.integer, np.floating))


def _encode_attrs(attrs: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """HDF5-storable attrs; None, lists and dicts become JSON text so they read back equal."""
    out: dict[str, Any] = {}
    as_json: list[str] = []
    for k, v in attrs.items():
        if k in _RESERVED:
            raise BagError(f"{where}: attrs key {k!r} is reserved (set it on the Bag itself)")
        if _is_scalar(v):
            out[k] = v.item() if isinstance(v, np.generic) else v
            continue
        try:
            out[k] = json.dumps(v, sort_keys=True)
        except TypeError as e:
            raise BagError(f"{where}: attrs[{k!r}] is not JSON-serializable: {e}") from None
        as_json.append(k)
    return out, as_json


def _plain(v: Any) -> Any:
    """An h5py attribute value as a plain Python value."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return _plain(v.item())
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.dtype.kind in "SO" else v.tolist()
    return v


def _read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: _plain(v) for k, v in obj.attrs.items()}


def _magnification(mpp: float) -> int:
    """Objective power for an mpp, bucketed exactly as TRIDENT does (0.5 µm/px -> 20x)."""
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return mag
    return max(1, round(10 / mpp))


def _trident_coords_attrs(bag: Bag) -> dict[str, Any]:
    """The attributes TRIDENT's ``coords_to_h5`` writes on ``coords`` (only those we know).

    TRIDENT derives ``patch_size_level0`` from magnifications (patch_size * src // dst); we
    write the true level-0 footprint, which is what readers use it for.
    """
    out: dict[str, Any] = {"name": bag.slide_id}
    # `fusedist embed` records the level-0 mpp as "mpp0" (the tile manifests' name).
    level0_mpp = bag.attrs.get(LEVEL0_MPP, bag.attrs.get("mpp0"))
    size0 = bag.attrs.get(TILE_SIZE_LEVEL0, bag.attrs.get("patch_size_level0"))
    if size0 is None and bag.tile_size and bag.mpp and level0_mpp:
        size0 = round(bag.tile_size * bag.mpp / level0_mpp)
    if bag.tile_size:
        out["patch_size"] = int(bag.tile_size)
    if size0:
        out["patch_size_level0"] = int(size0)
    if bag.mpp:
        out["target_magnification"] = _magnification(bag.mpp)
    if level0_mpp:
        out["level0_magnification"] = _magnification(float(level0_mpp))
    return out


# ----------------------------------------------------------------------------- writing

@contextlib.contextmanager
def _atomic_local_path(url: str) -> Iterator[Path]:
    """A local path to write an HDF5 file to; it becomes ``url`` only if the block succeeds.

    HDF5 reads back what it has written while writing, which storage.open_write's write-only
    local stream does not allow. Local targets get a temp file beside them (renamed: no second
    copy); S3 ones a temp file that is uploaded whole (one PUT, or an aborted multipart).
    """
    if storage.is_s3(url):
        fd, name = tempfile.mkstemp(suffix=".h5")
        os.close(fd)
        try:
            yield Path(name)
            storage.upload_file(name, url)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        return
    dest = storage.local_path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Dot-prefixed *.tmp: storage.listdir skips it, so a half-written bag is never listed.
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # h5py creates it like open() does, with the usual umask permissions (mkstemp: 0600).
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data must be on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _chunk_rows(n: int, row_bytes: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // max(1, row_bytes)))


def write_bag(url: str, bag: Bag, *, compression: str | None = None) -> None:
    """Validate ``bag`` and write it to ``url`` atomically (whole file or nothing).

    ``compression``: None (default: fastest to read), "gzip" or "lzf" for the features.
    Raises :class:`BagError` naming the slide for bad shapes, dtypes or NaN/inf rows.
    """
    where = f"slide {bag.slide_id!r} ({url})"
    if not bag.slide_id or not bag.encoder:
        raise BagError(f"{where}: a bag needs a slide_id and an encoder")
    features = _features_array(bag.features, where)
    coords = _coords_array(bag.coords, features.shape[0], where)
    _check_finite(features, where)
    attrs = {"fusedist_version": fusedist_version(), **bag.attrs}
    extra, as_json = _encode_attrs(attrs, where)
    n = features.shape[0]
    with _atomic_local_path(url) as path, h5py.File(path, "w") as f:
        f.attrs.update(extra)
        f.attrs.update({FORMAT_ATTR: FORMAT_VERSION, "slide_id": bag.slide_id,
                        "encoder": bag.encoder, _JSON_KEYS: json.dumps(as_json)})
        if bag.mpp is not None:  # absent, not NaN: "unknown" reads back as None
            f.attrs["mpp"] = float(bag.mpp)
        if bag.tile_size is not None:
            f.attrs["tile_size"] = int(bag.tile_size)
        # HDF5 cannot chunk an empty dataset; an empty bag is stored contiguous.
        chunks = (_chunk_rows(n, features.strides[0]), features.shape[1]) if n else None
        dset = f.create_dataset("features", data=features, chunks=chunks,
                                compression=compression if n else None)
        # As TRIDENT's extract_patch_features labels its features: slide name and encoder.
        dset.attrs.update({"name": bag.slide_id, "encoder": bag.encoder})
        f.create_dataset("coords", data=coords).attrs.update(_trident_coords_attrs(bag))


def fusedist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusedist")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- reading

def _local_file(url: str) -> Path:
    """A local path for ``url`` (S3 objects are fetched into the ETag-checked cache)."""
    if storage.is_s3(url):
        return storage.fetch_local(url, subdir="bags")
    p = storage.local_path(url)
    if not p.is_file():
        raise FileNotFoundError(f"{url}: no such bag file")
    return p


def _clam_sibling(url: str, folder: str, ext: str) -> str | None:
    """CLAM keeps ``<dir>/h5_files/<id>.h5`` and ``<dir>/pt_files/<id>.pt``: the other one."""
    if "/" not in url:
        return None
    parent, name = url.rsplit("/", 1)
    if storage.basename(parent) not in ("h5_files", "pt_files"):
        return None
    return storage.join(parent.rsplit("/", 1)[0], folder, Path(name).stem + ext)


def _squeeze_batch(arr: np.ndarray) -> np.ndarray:
    # Some TRIDENT versions save features (1, N, D) (a batch of one slide).
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def _load_pt(url: str) -> np.ndarray:
    import torch

    try:
        obj = torch.load(_local_file(url), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged file
        raise BagError(f"{url}: cannot load CLAM .pt features ({type(e).__name__}: {e}); "
                       "the file may be truncated or corrupt") from None
    if isinstance(obj, torch.Tensor):
        # numpy has no bfloat16; float32 keeps every bfloat16 value exactly.
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
    if isinstance(obj, np.ndarray):
        return obj
    raise BagError(f"{url}: expected a tensor of features, found {type(obj).__name__}")


def _read_features(f: h5py.File, url: str) -> np.ndarray:
    if "features" in f:
        return f["features"][()]
    if "feats" in f:  # STAMP
        return f["feats"][()]
    pt = _clam_sibling(url, "pt_files", ".pt")
    if pt is not None and storage.exists(pt):
        return _load_pt(pt)  # a CLAM h5 that kept only the coords
    raise BagError(f"{url}: no 'features' dataset (datasets: {sorted(f.keys())})")


def _read_coords(f: h5py.File, url: str) -> np.ndarray:
    if "coords" not in f:
        raise BagError(f"{url}: no 'coords' dataset (datasets: {sorted(f.keys())})")
    arr = _squeeze_batch(f["coords"][()])
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise BagError(f"{url}: coords must be (N, 2), got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BagError(f"{url}: coords contain NaN or inf")
        if _is_stamp(f):
            return arr  # µm: _stamp_meta converts them with the tile size
        arr = np.rint(arr)  # float coords from other tools: nearest level-0 pixel
    return arr.astype(np.int64)


def _checked_features(raw: np.ndarray, url: str) -> np.ndarray:
    arr = _squeeze_batch(raw)
    if arr.ndim == 1:
        raise BagError(f"{url}: features have shape {arr.shape}: a slide-level embedding, "
                       "not a bag of tile features (N, D)")
    return _features_array(arr, url)


_Meta = tuple[str | None, str, float | None, int | None, dict[str, Any]]


def _own_meta(f: h5py.File) -> _Meta:
    """slide_id, encoder, mpp, tile size and free attrs of a fusedist bag."""
    attrs = _read_attrs(f)
    for k in json.loads(attrs.get(_JSON_KEYS, "[]")):
        attrs[k] = json.loads(attrs[k])
    mpp, tile = attrs.get("mpp"), attrs.get("tile_size")
    meta = (attrs.get("slide_id"), str(attrs.get("encoder", "")),
            None if mpp is None else float(mpp), None if tile is None else int(tile))
    return (*meta, {k: v for k, v in attrs.items() if k not in _RESERVED})


def _encoder_from_path(url: str) -> str:
    """TRIDENT: ``.../features_<encoder>/x.h5``; CLAM: ``.../<dir>/h5_files/x.h5``."""
    parts = url.rstrip("/").split("/")
    folder = parts[-2] if len(parts) > 1 else ""
    if folder in ("h5_files", "pt_files") and len(parts) > 2:
        folder = parts[-3]
    return folder.removeprefix("features_")


def _foreign_meta(f: h5py.File, url: str) -> tuple[str, float | None, int | None, dict]:
    """encoder, mpp, tile size and attrs of a TRIDENT/CLAM/other h5 (what it records)."""
    attrs = _read_attrs(f)
    if "features" in f:
        attrs.update(_read_attrs(f["features"]))
    coord_attrs = _read_attrs(f["coords"])
    attrs.update(coord_attrs)
    # TRIDENT stores None as the string 'None'.
    attrs = {k: (None if v == "None" else v) for k, v in attrs.items()}
    tile = attrs.get("tile_size", attrs.get("patch_size"))
    mpp = attrs.get("mpp")
    if mpp is None and attrs.get("target_magnification"):
        # TRIDENT records magnification, not mpp; 10x objective power ~ 1 µm/px (20x -> 0.5).
        mpp = 10.0 / float(attrs["target_magnification"])
    if attrs.get("patch_size_level0") is not None:
        attrs.setdefault(TILE_SIZE_LEVEL0, int(attrs["patch_size_level0"]))
    if "target_magnification" in coord_attrs:
        attrs["source_format"] = "trident"
    elif "/h5_files/" in url or "/pt_files/" in url:
        attrs["source_format"] = "clam"
    else:
        attrs["source_format"] = "h5"
    encoder = str(attrs.get("encoder") or _encoder_from_path(url))
    attrs = {k: v for k, v in attrs.items() if k not in _RESERVED}
    return (encoder, None if mpp is None else float(mpp),
            None if tile is None else int(tile), attrs)


def _is_stamp(f: h5py.File) -> bool:
    return "feats" in f and "features" not in f


def _stamp_meta(f: h5py.File, coords: np.ndarray, url: str
                ) -> tuple[np.ndarray, str, float | None, int | None, dict]:
    """coords, encoder, mpp, tile size and attrs of a STAMP feature file.

    STAMP stores tile corners in µm (``unit = "um"``) with ``tile_size_um`` and
    ``tile_size_px``, but not the slide's level-0 µm/px, so level-0 pixels cannot be
    recovered. The coords become pixels at the tile resolution instead (a tile's edge is
    ``tile_size_px`` in them), recorded as ``level0_mpp = tile mpp``: neighbourhoods and
    extents stay right, which is what the fusion methods use coords for. Files from STAMP
    before v2 (no unit) keep their coords as stored.
    """
    attrs = {k: (None if v == "None" else v) for k, v in _read_attrs(f).items()}
    encoder = str(attrs.get("extractor") or attrs.get("encoder") or _encoder_from_path(url))
    size_um = attrs.get("tile_size_um", attrs.get("tile_size") if attrs.get("unit") == "um"
                        else None)
    size_px = attrs.get("tile_size_px")
    mpp = tile = None
    if attrs.get("unit") == "um":
        if not size_um or not size_px:
            raise BagError(f"{url}: STAMP coords are in µm but tile_size_um/tile_size_px are "
                           "missing, so they cannot be turned into pixels; re-extract with "
                           "`stamp preprocess` (v2.1 or later)")
        mpp, tile = float(size_um) / float(size_px), int(size_px)
        coords = np.rint(coords.astype(np.float64) / mpp).astype(np.int64)
        attrs.update({LEVEL0_MPP: mpp, TILE_SIZE_LEVEL0: tile, "coords_frame": "tile_mpp"})
    else:
        coords = np.rint(coords).astype(np.int64)
    attrs["source_format"] = "stamp"
    attrs = {k: v for k, v in attrs.items() if k not in _RESERVED}
    return coords, encoder, mpp, tile, attrs


def _open_error(url: str, e: Exception) -> BagError:
    return BagError(f"{url}: cannot read as an HDF5 bag ({e}); the file may be truncated or "
                    "corrupt: delete it and extract it again")


def read_bag(url: str, slide_id: str | None = None) -> Bag:
    """Read a fusedist bag, a TRIDENT or STAMP feature h5 or a CLAM h5/.pt feature file.

    ``slide_id`` defaults to the one stored in a fusedist bag, else the file name. Raises
    FileNotFoundError for a missing file and :class:`BagError` naming the file for anything
    unreadable or malformed (truncated file, missing dataset, N mismatch, NaN/inf row).
    """
    stem = decode_id(Path(url.rsplit("/", 1)[-1]).stem)
    pt_features = None
    h5_url = url
    if url.endswith(".pt"):
        pt_features = _load_pt(url)
        h5_url = _clam_sibling(url, "h5_files", ".h5") or ""
        if not h5_url or not storage.exists(h5_url):
            raise BagError(f"{url}: CLAM .pt features need their coords from "
                           f"{h5_url or '<dir>/h5_files/<slide>.h5'}, which does not exist")
    path = _local_file(h5_url)
    try:
        with h5py.File(path, "r") as f:
            raw = pt_features if pt_features is not None else _read_features(f, h5_url)
            coords = _read_coords(f, h5_url)
            if FORMAT_ATTR in f.attrs:
                stored_id, encoder, mpp, tile, attrs = _own_meta(f)
            elif _is_stamp(f):
                stored_id = None
                coords, encoder, mpp, tile, attrs = _stamp_meta(f, coords, h5_url)
            else:
                stored_id = None
                encoder, mpp, tile, attrs = _foreign_meta(f, h5_url)
    except (storage.StorageError, FileNotFoundError):
        raise  # not a statement about this file's contents
    except OSError as e:  # h5py's error for a truncated, corrupt or non-HDF5 file
        raise _open_error(h5_url, e) from None
    if slide_id is not None and stored_id is not None and slide_id != stored_id:
        raise BagError(f"{url}: holds slide {stored_id!r}, not {slide_id!r}")
    features = _checked_features(raw, url)
    if features.shape[0] != coords.shape[0]:
        raise BagError(f"{url}: {features.shape[0]} feature rows but {coords.shape[0]} coords")
    _check_finite(features, url)
    return Bag(slide_id=slide_id or stored_id or stem, features=features, coords=coords,
               encoder=encoder, mpp=mpp, tile_size=tile, attrs=attrs)


def list_bags(folder_url: str) -> dict[str, str]:
    """slide_id -> URL of each bag in a folder: fusedist/TRIDENT ``*.h5``, or a CLAM folder
    (``h5_files/`` [+ ``pt_files/``]; the .h5 is preferred, as it holds features and coords)."""
    names = storage.listdir(folder_url)
    if "h5_files/" in names:
        h5_dir, pt_dir = storage.join(folder_url, "h5_files"), storage.join(folder_url, "pt_files")
        out = {decode_id(n[:-3]): storage.join(pt_dir, n) for n in storage.listdir(pt_dir, ".pt")}
        out.update({decode_id(n[:-3]): storage.join(h5_dir, n)
                    for n in storage.listdir(h5_dir, ".h5")})
        return dict(sorted(out.items()))
    if "pt_files/" in names and not any(n.endswith(".h5") for n in names):
        raise BagError(f"{folder_url}: CLAM pt_files/ without h5_files/: the tile coords "
                       "are missing, so these features cannot be read as bags")
    return {decode_id(n[:-3]): storage.join(folder_url, n) for n in names if n.endswith(".h5")}


def _holds_tile_features(folder_url: str) -> bool:
    """Whether a folder's first bag has tile features (TRIDENT's ``patches/`` holds coords-only
    h5 files, ``visualization/`` images). An unreadable first file counts as features, so
    reading it later reports the damage."""
    try:
        urls = list_bags(folder_url)
    except BagError:
        return True  # a broken CLAM folder: reading it names the problem
    if not urls:
        return False
    first = next(iter(urls.values()))
    if first.endswith(".pt") or "/h5_files/" in first:
        return True
    try:
        with _open_metadata(first) as f:
            return "features" in f or "feats" in f
    except storage.StorageError:
        raise
    except (OSError, ValueError):
        return True


def encoder_folders(root_url: str) -> dict[str, str]:
    """encoder -> folder URL of each encoder folder under a bag root, sorted by name.

    A fusedist root holds ``<encoder>/``; a TRIDENT job folder (``20x_256px_0px_overlap/``)
    holds ``features_<encoder>/`` (named without the prefix here) beside ``patches/``,
    ``visualization/`` and ``slide_features_<encoder>/`` (slide embeddings), which are not
    bags and are skipped, as are folders with no feature h5 and ``_``/``.`` ones.
    """
    out: dict[str, str] = {}
    for name in storage.listdir(root_url):
        folder = name.rstrip("/")
        if not name.endswith("/") or folder.startswith(("_", ".", "slide_features_")):
            continue
        url = storage.join(root_url, folder)
        if not _holds_tile_features(url):
            continue
        encoder = folder.removeprefix("features_") or folder
        if encoder in out:
            raise BagError(f"{root_url}: both {encoder}/ and features_{encoder}/ hold bags of "
                           f"encoder {encoder!r}; keep one of them")
        out[encoder] = url
    return dict(sorted(out.items()))


def load_bags(folder_url: str, slide_ids: list[str] | None = None,
              workers: int = 8) -> dict[str, Bag]:
    """Read the bags of a folder (or just ``slide_ids``, in that order); threads overlap S3
    downloads. A requested slide without a bag is an error listing the missing ones."""
    urls = list_bags(folder_url)
    if slide_ids is not None:
        missing = [s for s in slide_ids if s not in urls]
        if missing:
            raise FileNotFoundError(f"{folder_url}: no bag for {len(missing)} slide(s): "
                                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        urls = {s: urls[s] for s in slide_ids}
    if not urls:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(urls)))) as pool:
        bags = pool.map(lambda item: read_bag(item[1], item[0]), urls.items())
        return dict(zip(urls, bags))


# ----------------------------------------------------------------------------- resuming

@contextlib.contextmanager
def _open_metadata(url: str) -> Iterator[h5py.File]:
    """Open an h5 for its metadata; on S3 through a ranged reader, so only the few blocks
    HDF5 touches are fetched, never the whole bag."""
    if not storage.is_s3(url):
        with h5py.File(storage.local_path(url), "r") as f:
            yield f
        return
    with storage.open_read(url) as raw, h5py.File(raw, "r") as f:
        yield f


def _normalized(v: Any) -> Any:
    # Compare values as they come back from a bag: tuples as lists, numpy as Python.
    if isinstance(v, np.generic):
        return v.item()
    return v if _is_scalar(v) or v is None else json.loads(json.dumps(v, sort_keys=True))


def bag_is_current(url: str, expected_attrs: dict[str, Any]) -> bool:
    """Whether ``url`` is a complete fusedist bag whose attributes match ``expected_attrs``
    (e.g. weights_digest, source digest; also encoder, slide_id, mpp, tile_size).

    A missing, truncated, corrupt or foreign file is never current, so a resumed job redoes
    it; storage failures (credentials, endpoint) are raised, not taken as "redo".
    """
    try:
        with _open_metadata(url) as f:
            if FORMAT_ATTR not in f.attrs or "features" not in f or "coords" not in f:
                return False
            if f["features"].shape[0] != f["coords"].shape[0]:
                return False
            stored_id, encoder, mpp, tile, attrs = _own_meta(f)
    except storage.StorageError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return False  # FileNotFoundError included
    current = {**attrs, "slide_id": stored_id, "encoder": encoder, "mpp": mpp,
               "tile_size": tile}
    return all(k in current and current[k] == _normalized(v)
               for k, v in expected_attrs.items())
