"""The fast TIFF reader gives OpenSlide's pixels byte for byte, or steps aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusedist.config import load_config
from fusedist.synth import make_slide
from fusedist.tiling import TileConfig, run_tile
from fusedist.tiling.slide import (SlideError, open_slide, plan_geometry, read_region_rgb,
                                   read_tile)
from fusedist.tiling.tiffread import open_reader


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A 3200 x 3000 px synthetic 0.25 µm/px slide (levels 1 and 4, 512 px YCbCr JPEG tiles)."""
    path = tmp_path_factory.mktemp("fastread") / "s.tiff"
    make_slide(path, (3200, 3000), 0.25, {}, seed=3)
    return path


def _corners(slide, level: int, size: int) -> list[tuple[int, int]]:
    """Level-0 corners: inside, on tile seams, touching the right/bottom edge, past it, and
    off the level's pixel grid."""
    ds = int(slide.level_downsamples[level])
    w, h = slide.level_dimensions[level]
    xs = [0, 511, 512, 700, w - size, w - size + 1, w - size // 2]
    ys = [0, 300, h - size, h - size + 5]
    out = [(x * ds, y * ds) for x in xs for y in ys]
    return out + [(ds * 100 + 1, ds * 200), (3, 0)]


def test_regions_match_openslide_at_every_level_and_edge(synth):
    slide = open_slide(synth)
    fast = open_reader(str(synth), slide, "s")
    assert fast is not None and sorted(fast.pages) == [0, 1]
    for level, size in ((0, 448), (1, 224)):
        accepted = 0
        for x0, y0 in _corners(slide, level, size):
            ref = read_region_rgb(slide, x0, y0, level, size, "s")
            got = fast.region(x0, y0, level, size, lambda: ref)
            if got is not None:
                accepted += 1
                assert got.tobytes() == ref.tobytes(), (level, x0, y0)
        assert accepted >= 10, level  # the fast path was really used
    assert fast.enabled


def test_tiles_match_with_and_without_the_fast_reader(synth):
    slide = open_slide(synth)
    fast = open_reader(str(synth), slide, "s")
    for mpp in (0.5, 1.0):  # level 0 reduced 2x; level 1 (4x) read as it is
        geo = plan_geometry(slide, 0.25, mpp, 224, "s")
        assert geo.level == (0 if mpp == 0.5 else 1)
        for x0, y0 in _corners(slide, 0, geo.size0):
            for resample in ("reduce", "lanczos"):
                a = read_tile(slide, x0, y0, geo, "s", resample, fast)
                b = read_tile(slide, x0, y0, geo, "s", resample)
                assert a.tobytes() == b.tobytes(), (mpp, x0, y0, resample)


def test_aperio_svs_rgb_jpeg_with_tables(fixtures_dir):
    # Photometric RGB JPEG with shared JPEGTables and no JFIF/Adobe marker: decoded as YCbCr
    # it would be wrong colours; the reader tells libjpeg it is RGB.
    path = fixtures_dir / "small.svs"
    slide = open_slide(path)
    fast = open_reader(str(path), slide, "small")
    assert fast is not None and fast.pages[0].jpegmode == "RGB"
    for x0, y0, size in ((0, 0, 16), (3, 5, 8), (8, 8, 8), (10, 10, 8)):
        ref = read_region_rgb(slide, x0, y0, 0, size, "small")
        got = fast.region(x0, y0, 0, size, lambda: ref)
        if x0 + size <= 16 and y0 + size <= 16:
            assert got is not None and got.tobytes() == ref.tobytes()
        else:
            assert got is None  # past the edge: OpenSlide's transparency, left to OpenSlide


def test_other_files_are_left_to_openslide(fixtures_dir):
    # boxes.tiff is deflate-compressed: no fast reader.
    slide = open_slide(fixtures_dir / "boxes.tiff")
    assert open_reader(str(fixtures_dir / "boxes.tiff"), slide, "boxes") is None
    with pytest.raises(SlideError) as e:
        open_slide(fixtures_dir / "unopenable.tiff")
    assert e.value.code == "unopenable"


def test_broken_data_fails_as_with_openslide(fixtures_dir):
    # Fresh handles for each path: an OpenSlide error sticks to its handle.
    path = fixtures_dir / "unreadable.svs"
    slide = open_slide(path)
    geo = plan_geometry(slide, 0.25, 0.25, 16, "u")
    with pytest.raises(SlideError) as plain:
        read_tile(slide, 0, 0, geo, "u")
    slide = open_slide(path)
    fast = open_reader(str(path), slide, "u")
    assert fast is not None
    with pytest.raises(SlideError) as fastpath:
        read_tile(slide, 0, 0, geo, "u", "reduce", fast)
    assert (fastpath.value.code, fastpath.value.message) == (plain.value.code,
                                                              plain.value.message)
    assert not fast.enabled


def test_self_check_turns_off_a_reader_that_differs(synth):
    # The same file with its colour space misdeclared to the reader: the first region differs
    # from OpenSlide's, so OpenSlide's is returned and the reader is off for the slide.
    slide = open_slide(synth)
    fast = open_reader(str(synth), slide, "s")
    fast.pages[0].jpegmode = "RGB"
    geo = plan_geometry(slide, 0.25, 0.5, 224, "s")
    a = read_tile(slide, 512, 512, geo, "s", "reduce", fast)
    assert not fast.enabled
    assert a.tobytes() == read_tile(slide, 512, 512, geo, "s").tobytes()
    assert fast.region(0, 0, 0, 448, lambda: None) is None


def test_run_tile_shards_identical_with_either_reader(ray_cluster, synth, tmp_path):
    shas = {}
    for reader in ("auto", "openslide"):
        cfg = load_config(TileConfig, None, ["mode=grid", "min_tissue=0.3",
                                             f"reader={reader}", "samples_per_shard=20"],
                          input=str(synth), output=str(tmp_path / reader))
        res = run_tile(cfg, progress=False)
        assert res.manifest["totals"]["tiles"] > 20
        manifest = json.loads((tmp_path / reader / "default" / "manifest.json").read_text())
        shas[reader] = [(s["name"], s["sha256"]) for s in manifest["shards"]]
    assert shas["auto"] == shas["openslide"]
