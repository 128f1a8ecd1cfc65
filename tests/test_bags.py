"""Slide bags: round trips (local and S3), atomic writes, validation, TRIDENT/CLAM folders,
and the resumability check."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fusedist import storage
from fusedist.formats import bags
from fusedist.formats.bags import (Bag, BagError, bag_is_current, bag_url, list_bags, load_bags,
                                   read_bag, write_bag)
from tests import trident
from tests.s3util import moto_server, s3_bucket  # noqa: F401

ATTRS = {"weights_digest": "sha256:abc123", "source": "tcga-brca", bags.LEVEL0_MPP: 0.25,
         "overlap": False, "stats": {"tiles_dropped": 3}, "levels": [1, 4], "note": None}


def _bag(slide_id: str = "S-001", n: int = 37, d: int = 16, dtype=np.float32,
         seed: int = 0) -> Bag:
    rng = np.random.default_rng(seed)
    coords = np.stack([rng.integers(0, 90_000, n), rng.integers(0, 60_000, n)], axis=1)
    return Bag(slide_id=slide_id, features=rng.standard_normal((n, d)).astype(dtype),
               coords=coords, encoder="uni2-h", mpp=0.5, tile_size=224, attrs=dict(ATTRS))


def _assert_same(got: Bag, want: Bag) -> None:
    assert got.slide_id == want.slide_id and got.encoder == want.encoder
    assert got.features.dtype == want.features.dtype
    np.testing.assert_array_equal(got.features, want.features)
    assert got.coords.dtype == np.int64
    np.testing.assert_array_equal(got.coords, want.coords)
    assert (got.mpp, got.tile_size) == (want.mpp, want.tile_size)
    assert got.attrs == {**want.attrs, "fusedist_version": bags.fusedist_version()}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # S3 reads go through fetch_local's cache: keep it inside the test's temp dir.
    monkeypatch.setenv("FUSEDIST_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_local(tmp_path: Path, dtype) -> None:
    root = str(tmp_path / "bags")
    want = {s: _bag(s, n=10 + i, dtype=dtype, seed=i) for i, s in enumerate(["a", "b.x", "c"])}
    for s, bag in want.items():
        write_bag(bag_url(root, "uni2-h", s), bag)
    assert (tmp_path / "bags" / "uni2-h" / "b.x.h5").is_file()  # the documented layout
    folder = storage.join(root, "uni2-h")
    assert list_bags(folder) == {s: bag_url(root, "uni2-h", s) for s in want}
    _assert_same(read_bag(bag_url(root, "uni2-h", "a")), want["a"])
    with pytest.raises(BagError, match="holds slide 'a', not 'c'"):  # a renamed/mixed-up file
        read_bag(bag_url(root, "uni2-h", "a"), slide_id="c")
    loaded = load_bags(folder, slide_ids=["c", "a"])
    assert list(loaded) == ["c", "a"]
    for s, bag in loaded.items():
        _assert_same(bag, want[s])
    with pytest.raises(FileNotFoundError, match="zzz"):
        load_bags(folder, slide_ids=["a", "zzz"])


def test_written_file_is_trident_readable(tmp_path: Path) -> None:
    """The plain-h5py reads TRIDENT and CLAM do on a feature file work on ours."""
    url = str(tmp_path / "s.h5")
    write_bag(url, _bag("s", n=5))
    with h5py.File(url, "r") as f:
        assert f["features"].shape == (5, 16) and f["coords"].dtype == np.int64
        assert f["features"].chunks is not None  # chunked: partial reads stay cheap
        coords_attrs = dict(f["coords"].attrs)
    # 224 px at 0.5 µm/px = 448 level-0 px at 0.25 µm/px (40x); 0.5 µm/px is TRIDENT's 20x.
    assert coords_attrs == {"name": "s", "patch_size": 224, "patch_size_level0": 448,
                            "target_magnification": 20, "level0_magnification": 40}


def test_embed_style_bag_read_by_trident_reader(tmp_path: Path) -> None:
    """A bag with the attrs `fusedist embed` records (mpp0, patch_size_level0) passes the reads
    TRIDENT's slide encoders and heatmaps do, and carries the encoder on `features`."""
    bag = _bag("TCGA-X", n=6)
    bag.attrs = {"mpp0": 0.25, "patch_size_level0": 448, "weights_digest": "sha256:1"}
    path = tmp_path / "features_uni2-h" / "TCGA-X.h5"
    write_bag(str(path), bag)
    got = trident.read_patch_features(path)
    np.testing.assert_array_equal(got["features"], bag.features)
    np.testing.assert_array_equal(got["coords"], bag.coords)
    assert got["encoder"] == "uni2-h"
    assert {k: got["attrs"][k] for k in ("patch_size", "patch_size_level0", "level0_magnification",
                                          "target_magnification", "name")} == \
        {"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40,
         "target_magnification": 20, "name": "TCGA-X"}


def test_float64_and_float_coords_are_normalized(tmp_path: Path) -> None:
    bag = _bag(n=4)
    bag.features = bag.features.astype(np.float64)
    bag.coords = bag.coords.astype(np.float32)
    write_bag(str(tmp_path / "x.h5"), bag)
    got = read_bag(str(tmp_path / "x.h5"))
    assert got.features.dtype == np.float32 and got.coords.dtype == np.int64
    np.testing.assert_array_equal(got.coords, bag.coords.astype(np.int64))


def test_compression_option(tmp_path: Path) -> None:
    bag = _bag(n=300, d=64)
    bag.features[:] = 1.0  # compressible
    write_bag(str(tmp_path / "z.h5"), bag, compression="gzip")
    with h5py.File(tmp_path / "z.h5", "r") as f:
        assert f["features"].compression == "gzip"
    _assert_same(read_bag(str(tmp_path / "z.h5")), bag)


def test_empty_bag_round_trips(tmp_path: Path) -> None:
    # A slide with no tissue tiles: HDF5 cannot chunk an empty dataset, so it is stored plain.
    bag = _bag("empty", n=0)
    write_bag(str(tmp_path / "e.h5"), bag, compression="gzip")
    got = read_bag(str(tmp_path / "e.h5"))
    assert got.features.shape == (0, 16) and got.coords.shape == (0, 2) and len(got) == 0


def test_round_trip_s3(s3_bucket: str) -> None:
    root = storage.join(s3_bucket, "run1", "bags")
    want = {s: _bag(s, seed=i) for i, s in enumerate(["s1", "s2"])}
    for s, bag in want.items():
        write_bag(bag_url(root, "uni2-h", s), bag)
    folder = storage.join(root, "uni2-h")
    assert list_bags(folder) == {s: f"{folder}/{s}.h5" for s in want}
    for s, bag in load_bags(folder).items():
        _assert_same(bag, want[s])
    assert bag_is_current(f"{folder}/s1.h5", {"weights_digest": "sha256:abc123"})
    assert not bag_is_current(f"{folder}/s1.h5", {"weights_digest": "sha256:other"})
    assert not bag_is_current(f"{folder}/missing.h5", {})


def test_truncated_s3_bag_is_not_current(s3_bucket: str, tmp_path: Path) -> None:
    url = f"{s3_bucket}/bags/uni2-h/t.h5"
    write_bag(str(tmp_path / "t.h5"), _bag("t", n=500, d=64))
    data = (tmp_path / "t.h5").read_bytes()
    storage.write_bytes(url, data[: len(data) * 2 // 3])
    assert not bag_is_current(url, {})
    with pytest.raises(BagError, match="t.h5.*truncated"):
        read_bag(url)


# ----------------------------------------------------------------------------- atomicity

def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "enc" / "s.h5")
    old = _bag("s", seed=1)
    write_bag(url, old)

    def boom(bag: Bag) -> dict:  # fails after the features are already written
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(bags, "_trident_coords_attrs", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_bag(url, _bag("s", seed=2))
    with pytest.raises(RuntimeError):
        write_bag(str(tmp_path / "enc" / "new.h5"), _bag("new"))
    assert os.listdir(tmp_path / "enc") == ["s.h5"]  # no temp files, no partial new.h5
    _assert_same(read_bag(url), old)  # the previous bag is untouched


def test_failed_s3_write_leaves_no_object(s3_bucket: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bags, "_trident_coords_attrs", lambda bag: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_bag(f"{s3_bucket}/bags/enc/s.h5", _bag("s"))
    assert storage.walk_files(s3_bucket) == []


# ----------------------------------------------------------------------------- validation

def test_write_rejects_nan_naming_slide_and_row(tmp_path: Path) -> None:
    bag = _bag("SLIDE-9", n=20)
    bag.features[13, 5] = np.nan
    bag.features[17, 0] = np.inf
    with pytest.raises(BagError, match=r"SLIDE-9.*row 13 "):
        write_bag(str(tmp_path / "x.h5"), bag)
    bag.features[13, 5] = 0
    with pytest.raises(BagError, match=r"SLIDE-9.*row 17 "):
        write_bag(str(tmp_path / "x.h5"), bag)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("change, message", [
    (lambda b: setattr(b, "coords", b.coords[:-1]), r"10 feature rows but 9 coords"),
    (lambda b: setattr(b, "coords", np.zeros((10, 3), np.int64)), r"coords must be \(N, 2\)"),
    (lambda b: setattr(b, "coords", b.coords + 0.5), r"whole level-0 pixels"),
    (lambda b: setattr(b, "features", b.features[0]), r"features must be \(N, D\)"),
    (lambda b: setattr(b, "features", b.features.astype(np.int32)), r"floating point"),
    (lambda b: b.attrs.update(mpp=1.0), r"'mpp' is reserved"),
])
def test_write_rejects_malformed_bags(tmp_path: Path, change, message: str) -> None:
    bag = _bag("SLIDE-7", n=10)
    change(bag)
    with pytest.raises(BagError, match=r"SLIDE-7.*" + message):
        write_bag(str(tmp_path / "x.h5"), bag)
    assert not (tmp_path / "x.h5").exists()


def _h5(path: Path, **datasets: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return str(path)


@pytest.mark.parametrize("datasets, message", [
    ({"coords": np.zeros((4, 2))}, r"no 'features' dataset"),
    ({"features": np.ones((4, 8), np.float32), "coords": np.zeros((3, 2))},
     r"4 feature rows but 3 coords"),
    ({"features": np.ones(8, np.float32), "coords": np.zeros((1, 2))}, r"slide-level"),
    ({"features": np.ones((4, 8), np.float32), "coords": np.zeros((4, 3))},
     r"coords must be \(N, 2\)"),
    ({"features": np.ones((4, 8), np.float32)}, r"no 'coords' dataset"),
])
def test_read_rejects_malformed_files(tmp_path: Path, datasets: dict, message: str) -> None:
    url = _h5(tmp_path / "feats" / "bad-slide.h5", **datasets)
    with pytest.raises(BagError, match=r"bad-slide\.h5.*" + message):
        read_bag(url)


def test_read_rejects_nan_naming_file_and_row(tmp_path: Path) -> None:
    feats = np.ones((6, 4), np.float16)
    feats[4, 2] = np.nan
    url = _h5(tmp_path / "nan-slide.h5", features=feats, coords=np.zeros((6, 2), np.int32))
    with pytest.raises(BagError, match=r"nan-slide\.h5.*row 4 "):
        read_bag(url)


def test_read_rounds_float_coords(tmp_path: Path) -> None:
    # Other tools sometimes store coords as float (e.g. after scaling): nearest pixel.
    url = _h5(tmp_path / "f.h5", features=np.ones((2, 3), np.float32),
              coords=np.array([[10.4, 20.6], [1e5 - 0.2, 7.0]]))
    np.testing.assert_array_equal(read_bag(url).coords, [[10, 21], [100_000, 7]])


def test_missing_bag_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_bag(str(tmp_path / "nope.h5"))


# ----------------------------------------------------------------------------- other tools

def test_trident_folder(tmp_path: Path) -> None:
    folder = tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
    rng = np.random.default_rng(0)
    want = {}
    for i, name in enumerate(["TCGA-A1", "TCGA-B2"]):
        n = 5 + i
        feats = rng.standard_normal((n, 1024)).astype(np.float32)
        coords = rng.integers(0, 50_000, (n, 2)).astype(np.int64)
        stored = feats[None] if i == 1 else feats  # some TRIDENT versions save (1, N, D)
        trident.save_h5(folder / f"{name}.h5", {"features": stored, "coords": coords}, {
            "features": {"name": name, "savetodir": str(folder)},
            "coords": {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                       "target_magnification": 20, "overlap": 0, "name": name,
                       "savetodir": str(tmp_path / "job"), "level0_width": None}})
        want[name] = (feats, coords)
    loaded = load_bags(str(folder))
    assert list(loaded) == list(want)
    for name, bag in loaded.items():
        feats, coords = want[name]
        assert bag.features.shape == (len(coords), 1024)
        np.testing.assert_array_equal(bag.features, feats)
        np.testing.assert_array_equal(bag.coords, coords)
        assert (bag.slide_id, bag.encoder, bag.mpp, bag.tile_size) == (name, "uni_v1", 0.5, 256)
        assert bag.attrs[bags.TILE_SIZE_LEVEL0] == 512
        assert bag.attrs["level0_width"] is None and bag.attrs["source_format"] == "trident"
    # A foreign file is never "current" for a fusedist job: it lacks our provenance.
    assert not bag_is_current(str(folder / "TCGA-A1.h5"), {})


def test_trident_job_folder_discovery_and_fuse_index(tmp_path: Path) -> None:
    """A TRIDENT job folder: features_<enc>/ are encoders (prefix stripped); patches/ (coords
    only), visualization/ (images) and slide_features_<enc>/ (slide embeddings) are not."""
    from fusedist.config import load_config
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import bag_index, discover_encoders

    job = tmp_path / "job" / "20x_256px_0px_overlap"
    rng = np.random.default_rng(3)
    for name in ("s1", "s2"):
        coords = rng.integers(0, 9000, (4, 2)).astype(np.int64)
        for enc in ("conch_v15", "uni_v1"):
            trident.write_job_slide(job, name, enc, rng.standard_normal((4, 8)).astype(
                np.float32), coords)
        trident.save_h5(job / "slide_features_titan" / f"{name}.h5",
                        {"features": np.ones(8, np.float32), "coords": coords}, {})
    (job / "_logs").mkdir()
    folders = bags.encoder_folders(str(job))
    assert folders == {"conch_v15": str(job / "features_conch_v15"),
                       "uni_v1": str(job / "features_uni_v1")}
    cfg = load_config(FuseConfig, None, [], bags=str(job), labels=str(tmp_path / "l.csv"))
    assert discover_encoders(cfg) == ["conch_v15", "uni_v1"]
    index = bag_index(cfg, ["uni_v1"])
    assert index == {"uni_v1": {s: str(job / "features_uni_v1" / f"{s}.h5") for s in ("s1", "s2")}}
    bag = read_bag(index["uni_v1"]["s1"])
    assert (bag.encoder, bag.mpp, bag.tile_size) == ("uni_v1", 0.5, 256)
    assert bag.attrs[bags.TILE_SIZE_LEVEL0] == 512 and bag.attrs["source_format"] == "trident"
    # The same encoder twice (fusedist's and TRIDENT's naming): ambiguous, say which.
    trident.write_job_slide(job, "s1", "x", np.ones((4, 8), np.float32), coords)
    (job / "features_x").rename(job / "uni_v1")
    with pytest.raises(BagError, match="uni_v1/ and features_uni_v1/"):
        bags.encoder_folders(str(job))


def test_stamp_feature_file(tmp_path: Path) -> None:
    """STAMP (v2.1+ preprocess): `feats` float16, `coords` float µm, root attrs with the
    extractor, unit 'um', tile_size_um and tile_size_px; and a pre-v2 file (px, no unit)."""
    rng = np.random.default_rng(5)
    grid = rng.integers(0, 40, (9, 2))
    feats = rng.standard_normal((9, 12)).astype(np.float16)
    path = tmp_path / "stamp" / "TCGA-S1.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        f["coords"] = (grid * 256.0).astype(np.float32)  # 256 µm tiles
        f["feats"] = feats
        f.attrs.update({"stamp_version": "2.3.0", "extractor": "virchow2", "unit": "um",
                        "tile_size_um": 256.0, "tile_size_px": 224, "feat_type": "tile"})
    bag = read_bag(str(path))
    assert (bag.slide_id, bag.encoder, bag.tile_size) == ("TCGA-S1", "virchow2", 224)
    assert bag.mpp == pytest.approx(256 / 224) and bag.features.dtype == np.float16
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, grid * 224)  # pixels at the tile mpp
    assert bag.attrs["source_format"] == "stamp" and bag.attrs[bags.TILE_SIZE_LEVEL0] == 224
    assert list_bags(str(path.parent)) == {"TCGA-S1": str(path)}
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f["coords"] = (grid * 224.0).astype(np.float64)
        f["feats"] = feats
    np.testing.assert_array_equal(read_bag(str(old)).coords, grid * 224)
    with h5py.File(path, "a") as f:
        del f.attrs["tile_size_px"]
    with pytest.raises(BagError, match=r"TCGA-S1\.h5.*tile_size_px"):
        read_bag(str(path))


def test_clam_folder(tmp_path: Path) -> None:
    """CLAM extract_features_fp: h5_files/<id>.h5 (features float32, coords int32, no attrs)
    and pt_files/<id>.pt (torch.save of the features tensor)."""
    feat_dir = tmp_path / "FEATURES_DIRECTORY"
    rng = np.random.default_rng(1)
    feats = {s: rng.standard_normal((n, 32)).astype(np.float32)
             for s, n in [("s1", 7), ("s2", 4), ("s3", 3)]}
    coords = {s: (rng.integers(0, 4000, (len(f), 2)) * 256).astype(np.int32)
              for s, f in feats.items()}
    (feat_dir / "pt_files").mkdir(parents=True)
    for s in ("s1", "s2"):
        torch.save(torch.from_numpy(feats[s]), feat_dir / "pt_files" / f"{s}.pt")
    _h5(feat_dir / "h5_files" / "s1.h5", features=feats["s1"], coords=coords["s1"])
    _h5(feat_dir / "h5_files" / "s2.h5", coords=coords["s2"])  # coords only: features in .pt
    _h5(feat_dir / "h5_files" / "s3.h5", features=feats["s3"], coords=coords["s3"])  # no .pt

    urls = list_bags(str(feat_dir))
    assert urls == {s: str(feat_dir / "h5_files" / f"{s}.h5") for s in feats}
    for s, bag in load_bags(str(feat_dir)).items():
        np.testing.assert_array_equal(bag.features, feats[s])
        assert bag.coords.dtype == np.int64
        np.testing.assert_array_equal(bag.coords, coords[s])
        assert bag.encoder == "FEATURES_DIRECTORY" and bag.attrs["source_format"] == "clam"
        assert bag.mpp is None and bag.tile_size is None
    # A .pt read directly takes its coords from the matching h5.
    bag = read_bag(str(feat_dir / "pt_files" / "s2.pt"))
    assert bag.slide_id == "s2" and bag.features.shape == (4, 32)
    np.testing.assert_array_equal(bag.coords, coords["s2"])
    # Without the h5 there are no coords: a clear error naming both files.
    torch.save(torch.zeros(2, 32), feat_dir / "pt_files" / "s4.pt")
    with pytest.raises(BagError, match=r"s4\.pt.*h5_files/s4\.h5"):
        read_bag(list_bags(str(feat_dir))["s4"])


# ----------------------------------------------------------------------------- resuming

def test_truncated_bag_is_not_current_and_read_names_it(tmp_path: Path) -> None:
    url = tmp_path / "uni2-h" / "cut-slide.h5"
    write_bag(str(url), _bag("cut-slide", n=400, d=64))
    assert bag_is_current(str(url), {"weights_digest": "sha256:abc123"})
    data = url.read_bytes()
    url.write_bytes(data[: len(data) // 2])
    assert not bag_is_current(str(url), {"weights_digest": "sha256:abc123"})
    with pytest.raises(BagError, match=r"cut-slide\.h5.*truncated or corrupt"):
        read_bag(str(url))
    url.write_bytes(b"not an hdf5 file at all")
    assert not bag_is_current(str(url), {})
    with pytest.raises(BagError, match=r"cut-slide\.h5"):
        read_bag(str(url))


def test_bag_is_current_compares_attrs(tmp_path: Path) -> None:
    url = str(tmp_path / "b.h5")
    write_bag(url, _bag("b"))
    assert bag_is_current(url, {})
    assert bag_is_current(url, {"weights_digest": "sha256:abc123", "source": "tcga-brca",
                                "encoder": "uni2-h", "slide_id": "b", "mpp": 0.5,
                                "tile_size": 224, "levels": (1, 4), "note": None,
                                "stats": {"tiles_dropped": 3}})
    assert not bag_is_current(url, {"weights_digest": "sha256:abc124"})
    assert not bag_is_current(url, {"encoder": "virchow2"})
    assert not bag_is_current(url, {"mpp": 1.0})
    assert not bag_is_current(url, {"source_sha256": "f00"})  # not recorded: not current
    assert not bag_is_current(url, {"source_sha256": None})
    assert not bag_is_current(str(tmp_path / "missing.h5"), {})


def test_bag_url_rejects_nested_names_and_encodes_ids(tmp_path) -> None:
    assert bag_url("s3://b/bags/", "uni2-h", "S1") == "s3://b/bags/uni2-h/S1.h5"
    # A '/' in a slide id is encoded (docs/formats.md), so the bag stays in its folder and
    # list_bags gives the true id back; dots stay readable.
    sid = "case 7/a.b%c"
    url = bag_url(str(tmp_path), "enc", sid)
    assert url == f"{tmp_path}/enc/case 7%2Fa.b%25c.h5"
    write_bag(url, Bag(sid, np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int64), "enc"))
    assert list_bags(str(tmp_path / "enc")) == {sid: url} and read_bag(url).slide_id == sid
    for enc, sid in [("uni2-h/x", "S1"), ("", "S1"), ("uni2-h", "")]:
        with pytest.raises(ValueError):
            bag_url("root", enc, sid)
