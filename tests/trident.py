"""TRIDENT's on-disk conventions, written from its format rules (mahmoodlab/TRIDENT
trident/IO.py ``save_h5``/``coords_to_h5`` and WSI.extract_patch_features), to test fusedist
against files TRIDENT writes and readers TRIDENT runs. Nothing here imports TRIDENT."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def save_h5(path: Path, assets: dict, attributes: dict) -> None:
    """TRIDENT's IO.save_h5: (1, ...) chunks, unlimited first axis, None saved as 'None'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            dset = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                    chunks=(1,) + val.shape[1:], dtype=val.dtype)
            dset[:] = val
            for k, v in attributes.get(key, {}).items():
                dset.attrs[k] = "None" if v is None else v


def coords_attrs(name: str, patch_size: int, src_mag: int, target_mag: int,
                 savetodir: str) -> dict:
    """What coords_to_h5 writes on ``coords`` (level-0 size from magnifications)."""
    return {"patch_size": patch_size, "patch_size_level0": patch_size * src_mag // target_mag,
            "level0_magnification": src_mag, "target_magnification": target_mag,
            "overlap": 0, "name": name, "savetodir": savetodir, "level0_width": None,
            "level0_height": None}


def write_job_slide(job: Path, name: str, encoder: str, feats: np.ndarray,
                    coords: np.ndarray, patch_size: int = 256, src_mag: int = 40,
                    target_mag: int = 20) -> Path:
    """One slide of a TRIDENT job folder: patches/<name>_patches.h5, visualization/<name>.jpg
    and features_<encoder>/<name>.h5; returns the feature file."""
    attrs = coords_attrs(name, patch_size, src_mag, target_mag, str(job / "patches"))
    save_h5(job / "patches" / f"{name}_patches.h5", {"coords": coords}, {"coords": attrs})
    (job / "visualization").mkdir(parents=True, exist_ok=True)
    (job / "visualization" / f"{name}.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    out = job / f"features_{encoder}" / f"{name}.h5"
    save_h5(out, {"features": feats, "coords": coords}, {
        "features": {"name": name, "savetodir": str(out.parent), "encoder": encoder},
        "coords": attrs})
    return out


def read_patch_features(path: Path) -> dict:
    """What TRIDENT's slide encoders and heatmaps read from a patch-feature h5
    (WSI.extract_slide_features, visualize_heatmap): features, level-0 coords, and the
    coords attributes, of which patch_size, level0/target magnification must be present and
    patch_size_level0 must be an integer."""
    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        features = f["features"][:]
        attrs = dict(f["coords"].attrs)
        encoder = f["features"].attrs.get("encoder")
    for key in ("patch_size", "level0_magnification", "target_magnification"):
        if attrs.get(key) is None:
            raise KeyError(f"Missing essential attributes in coords_attrs: {key}")
    attrs["patch_size_level0"] = int(attrs["patch_size_level0"])
    assert features.ndim == 2 and coords.shape == (features.shape[0], 2)
    assert np.issubdtype(coords.dtype, np.integer)
    return {"features": features, "coords": coords, "attrs": attrs, "encoder": encoder}
