"""Synthetic slides: OpenSlide reads them, pixels follow the mask and the cues, outputs are
reproducible and resumable, labels depend on the cues as documented."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from fusedist import storage
from fusedist.config import ConfigError, load_config
from fusedist.formats.slide_table import read_slide_table
from fusedist.synth import (CUES, SynthConfig, make_labels, make_slide, slide_specs,
                            synthesize, tissue_mask)
from fusedist.synth.cues import LabelParams, clinical_csv
from fusedist.synth.render import TileRenderer, build_scene
from tests.s3util import moto_server, s3_bucket  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rgb(slide: openslide.OpenSlide, level: int = 0) -> np.ndarray:
    img = slide.read_region((0, 0), level, slide.level_dimensions[level])
    return np.asarray(img.convert("RGB")).astype(np.float32)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 4096 px slide at 40x with its mask (levels 1, 4, 16)."""
    d = tmp_path_factory.mktemp("synth")
    info = make_slide(d / "a.tiff", 4096, 0.25, {}, seed=11, mask_path=d / "a.png")
    return info, d


@pytest.fixture(scope="module")
def cue_pairs(tmp_path_factory):
    """For each cue, the same slide (seed, geometry) rendered at cue = -2 and cue = +2."""
    d = tmp_path_factory.mktemp("cues")
    out = {}
    for cue in CUES:
        pair = []
        for z in (-2.0, 2.0):
            info = make_slide(d / f"{cue}{z:+.0f}.tiff", 2048, 0.25, {cue: z}, seed=5)
            pair.append((info, rgb(openslide.OpenSlide(info.path))))
        out[cue] = pair
    return out


# ----------------------------------------------------------------------------- file format

def test_openslide_opens_a_tiled_jpeg_pyramid_with_mpp(big):
    info, _ = big
    s = openslide.OpenSlide(info.path)
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
    assert s.level_count == 3 and info.downsamples == [1, 4, 16]
    assert s.level_dimensions == ((4096, 4096), (1024, 1024), (256, 256))
    assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    with tifffile.TiffFile(info.path) as t:
        assert len(t.pages) == 3  # one page per level in the main IFD chain, no SubIFDs
        for p in t.pages:
            assert p.is_tiled and (p.tilewidth, p.tilelength) == (512, 512)
            assert p.compression == tifffile.COMPRESSION.JPEG and p.dtype == np.uint8
            assert not p.subifds and "DateTime" not in p.tags
        assert [p.subfiletype for p in t.pages] == [0, 1, 1]


def test_non_square_slide_at_20x(tmp_path):
    info = make_slide(tmp_path / "b.tiff", (2100, 1500), 0.5, {}, seed=2)
    s = openslide.OpenSlide(info.path)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert s.level_dimensions[:2] == ((2100, 1500), (525, 375))
    assert info.mask.shape == (47, 66)  # ceil(1500/32), ceil(2100/32)
    a = rgb(s, 0)  # edge tiles (2100 is not a multiple of 512) decode and crop cleanly
    assert a.shape == (1500, 2100, 3) and a[:, -1].std() < 60


# ----------------------------------------------------------------------------- pixels vs mask

def _cells(mask: np.ndarray, tissue: bool) -> np.ndarray:
    """Mask cells at least 3 cells (96 px = 24 µm) from the contour: the rendered border is
    roughened by up to ~9 µm + half a cell, so cells nearer to it may be mixed."""
    return ndimage.distance_transform_edt(mask if tissue else ~mask) >= 3


@pytest.mark.parametrize("level", [0, 1, 2])
def test_colours_follow_the_mask_at_every_level(big, level):
    info, d = big
    png = np.asarray(Image.open(d / "a.png")) > 0
    np.testing.assert_array_equal(png, info.mask)
    np.testing.assert_array_equal(tissue_mask(4096, 4096, seed=11, tissue_fraction=0.5), png)
    assert 0.4 < png.mean() < 0.6

    s = openslide.OpenSlide(info.path)
    img = rgb(s, level)
    cell = 32 // int(s.level_downsamples[level])  # mask cell size at this level
    h, w = png.shape
    per_cell = img[:h * cell, :w * cell].reshape(h, cell, w, cell, 3).mean(axis=(1, 3))
    tissue, glass = per_cell[_cells(png, True)], per_cell[_cells(png, False)]
    assert len(tissue) > 1000 and len(glass) > 1000
    # Glass: near white everywhere.
    assert glass.min() > 235
    # Tissue: H&E pink/purple on average: red and blue above green, clearly darker than glass.
    r, g, b = tissue.mean(axis=0)
    assert r - g > 25 and b - g > 10 and tissue.mean() < 215
    assert np.mean(tissue.mean(axis=1) < 230) > 0.9  # nearly every tissue cell is stained


def test_tiles_are_seamless(tmp_path):
    """Rendering with 512 or 1024 px tiles gives the same image: nuclei crossing tile borders,
    texture windows and field upsampling are all continuous."""
    def full(tile: int) -> np.ndarray:
        r = TileRenderer(build_scene(2048, 2048, 0.25, {}, seed=3, tile=tile))
        n = 2048 // tile
        return np.concatenate([np.concatenate([r.render(ty, tx) for tx in range(n)], 1)
                               for ty in range(n)], 0).astype(int)
    a, b = full(512), full(1024)
    assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 1e-3
    assert a.std() > 20  # not a blank image


# ----------------------------------------------------------------------------- cues in pixels

def _nuclear(img: np.ndarray) -> np.ndarray:
    """Hematoxylin-dark pixels (nuclei: red < ~165 for any hue cue); eosin-stained stroma
    keeps red above ~185 even where it is densest, glass is white."""
    return img[..., 0] < 180


def test_density_cue_gives_more_nuclei(cue_pairs):
    (lo, a), (hi, b) = cue_pairs["nuclear_density"]
    # Share of tissue pixels that are nuclear (the same tissue outline in both slides).
    frac = [_nuclear(x).sum() / (i.mask.sum() * 32 * 32) for i, x in ((lo, a), (hi, b))]
    assert frac[1] > 2.0 * frac[0] and frac[0] > 0.03
    assert hi.n_nuclei > 2.5 * lo.n_nuclei


def test_size_cue_gives_bigger_nuclei(cue_pairs):
    (_, a), (_, b) = cue_pairs["nuclear_size"]
    def mean_area(x: np.ndarray) -> float:
        lab, n = ndimage.label(ndimage.binary_opening(_nuclear(x)))
        return float(np.bincount(lab.ravel())[1:].mean())
    assert mean_area(b) > 1.5 * mean_area(a)


def test_hue_cue_shifts_stain_colour(cue_pairs):
    (i, a), (_, b) = cue_pairs["stain_hue"]
    tis = np.kron(i.mask, np.ones((32, 32), bool))[:2048, :2048]
    nuc_a, nuc_b = tis & _nuclear(a), tis & _nuclear(b)
    # Hematoxylin bluer, eosin more purple when the cue is high.
    assert (b[nuc_b, 2] - b[nuc_b, 0]).mean() > (a[nuc_a, 2] - a[nuc_a, 0]).mean() + 15
    stroma_a, stroma_b = tis & ~_nuclear(a), tis & ~_nuclear(b)
    assert (b[stroma_b, 2] - b[stroma_b, 0]).mean() > (a[stroma_a, 2] - a[stroma_a, 0]).mean() + 10


def test_gland_cue_gives_more_lumens(cue_pairs):
    (lo, a), (hi, b) = cue_pairs["gland_texture"]
    assert hi.n_glands > lo.n_glands
    inner = np.kron(_cells(lo.mask, True), np.ones((32, 32), bool))
    inner = inner[:2048, :2048]
    pale = [(x[inner].min(axis=1) > 215).mean() for x in (a, b)]  # lumen: pale inside tissue
    assert pale[1] > pale[0] + 0.03


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(size=1024, mpp=0.25, cues={"nuclear_size": 0.5})
    a = make_slide(tmp_path / "a.tiff", seed=1, mask_path=tmp_path / "a.png", **kw)
    b = make_slide(tmp_path / "b.tiff", seed=1, mask_path=tmp_path / "b.png", **kw)
    c = make_slide(tmp_path / "c.tiff", seed=2, **kw)
    assert sha(a.path) == sha(b.path) and sha(tmp_path / "a.png") == sha(tmp_path / "b.png")
    assert sha(a.path) != sha(c.path)
    d = make_slide(tmp_path / "d.tiff", seed=1, size=1024, mpp=0.25, cues={"nuclear_size": 1.5})
    assert sha(a.path) != sha(d.path)  # the cues change pixels, not only the labels


# ----------------------------------------------------------------------------- labels

def test_labels_follow_cue_prototypes_survival_and_genes():
    rows = make_labels(0, 3000, LabelParams(num_classes=3))
    y = np.array([r.label for r in rows])
    z = np.array([[r.cues[c] for c in CUES] for r in rows])
    assert set(y) == {0, 1, 2} and np.bincount(y).min() > 900
    means = np.array([z[y == k].mean(axis=0) for k in range(3)])
    # Every cue separates some classes, but each only partly (its noise is ~1 sd).
    assert (means.max(axis=0) - means.min(axis=0) > 0.9).all()
    within = np.array([z[y == k].std(axis=0) for k in range(3)]).mean(axis=0)
    assert (within > 0.8).all()
    # Survival: events in {0,1}, some censoring, higher density -> earlier events.
    t, e = np.array([r.time for r in rows]), np.array([r.event for r in rows])
    assert set(e) == {0, 1} and 0.15 < 1 - e.mean() < 0.6 and (t > 0).all()
    dense = z[:, 0] > 1
    sparse = z[:, 0] < -1
    assert np.median(t[dense & (e == 1)]) < np.median(t[sparse & (e == 1)])
    # Genes: gene_g follows cue g mod 4.
    g = np.array([[r.genes[f"gene_{k}"] for k in range(8)] for r in rows])
    for k in range(8):
        assert np.corrcoef(g[:, k], z[:, k % 4])[0, 1] > 0.6
    # Patients: two slides of one patient share label and outcome.
    by_pat: dict[str, list] = {}
    for r in rows:
        by_pat.setdefault(r.patient_id, []).append(r)
    pairs = [v for v in by_pat.values() if len(v) == 2]
    assert len(pairs) > 200 and max(len(v) for v in by_pat.values()) == 2
    assert all(a.label == b.label and a.time == b.time and a.event == b.event for a, b in pairs)


def _cfg(out: str, **kw) -> SynthConfig:
    base = dict(output=out, num_slides=3, size=1024, num_classes=2, seed=4,
                paired_fraction=0.7, num_genes=3)
    return SynthConfig(**{**base, **kw})


def test_clinical_table_is_one_row_per_patient_and_refuses_disagreeing_slides():
    rows = make_labels(0, 6, LabelParams(paired_fraction=0.6))
    lines = clinical_csv(rows).splitlines()
    assert lines[0] == "patient_id,label,time,event"
    assert [ln.split(",")[0] for ln in lines[1:]] == list(dict.fromkeys(r.patient_id
                                                                         for r in rows))
    assert len(lines) - 1 < len(rows)  # some patients have two slides
    twin = next(r for r, s in zip(rows, rows[1:]) if r.patient_id == s.patient_id)
    bad = [*rows, dataclasses.replace(twin, slide_id="x", label=1 - twin.label)]
    with pytest.raises(ValueError, match=f"patient {twin.patient_id} disagree"):
        clinical_csv(bad)


def test_synthesize_writes_slides_masks_labels_and_resumes(tmp_path):
    cfg = _cfg(str(tmp_path / "ds"))
    recs = synthesize(cfg, progress=False)
    assert [r["slide_id"] for r in recs] == ["synth-0000", "synth-0001", "synth-0002"]
    assert not any(r["skipped"] for r in recs)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "ds/labels.csv").read_text())))
    assert list(rows[0]) == ["slide_id", "patient_id", "label", "time", "event", "gene_0",
                             "gene_1", "gene_2", *(f"cue_{c}" for c in CUES)]
    assert len({r["patient_id"] for r in rows}) == 2  # one patient has two slides
    specs = slide_specs(cfg)
    for r, spec in zip(recs, specs):
        s = openslide.OpenSlide(r["url"])
        assert s.level_count == 2 and float(s.properties["openslide.mpp-x"]) == 0.25
        png = np.asarray(Image.open(r["mask_url"])) > 0
        np.testing.assert_array_equal(png, spec.mask())  # the mask is reproducible from the spec
        assert r["sha256"] == sha(r["url"])
    before = {r["slide_id"]: (sha(r["url"]), Path(r["url"]).stat().st_mtime_ns) for r in recs}

    again = synthesize(cfg, progress=False)  # nothing to do, nothing touched
    assert all(r["skipped"] for r in again)
    assert {r["slide_id"]: (sha(r["url"]), Path(r["url"]).stat().st_mtime_ns)
            for r in again} == before

    Path(recs[1]["url"]).write_bytes(b"broken")  # a damaged slide is rendered again, identically
    third = synthesize(cfg, progress=False)
    assert [r["skipped"] for r in third] == [True, False, True]
    assert sha(third[1]["url"]) == before["synth-0001"][0]
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".")]

    fewer = synthesize(_cfg(str(tmp_path / "ds"), num_slides=2), progress=False)
    assert all(r["skipped"] for r in fewer) and not (tmp_path / "ds/synth-0002.tiff").exists()
    assert not (tmp_path / "ds/masks/synth-0002.png").exists()

    # Another folder, two worker processes: the same bytes.
    fresh = synthesize(_cfg(str(tmp_path / "ds2"), workers=2), progress=False)
    assert [sha(r["url"]) for r in fresh] == [b[0] for b in before.values()]
    assert len((tmp_path / "ds2/labels.csv").read_text().splitlines()) == 4
    assert tissue_mask(**fresh[2]["mask_args"]).shape == (32, 32)


def test_gdc_layout_is_the_flat_data_set_renamed_and_switches_cleanly(tmp_path):
    flat = synthesize(_cfg(str(tmp_path / "flat")), progress=False)
    out = tmp_path / "gdc"
    gdc = synthesize(_cfg(str(out), layout="gdc"), progress=False)
    # The same pixels and labels; TCGA-style names in a UUID folder each; patient = 12 chars.
    assert [r["sha256"] for r in gdc] == [r["sha256"] for r in flat]
    assert [r["label"] for r in gdc] == [r["label"] for r in flat]
    ids = [r["slide_id"] for r in gdc]
    assert [i.split(".")[0][-3:] for i in ids] == ["DX1", "DX2", "DX1"]  # slides 0, 1: one patient
    assert [r["patient_id"] for r in gdc] == [i[:12] for i in ids] and ids[0][:12] == ids[1][:12]
    for r in gdc:
        p = Path(r["url"])
        assert p.name == f"{r['slide_id']}.svs" and p.parent.parent == out
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", p.parent.name)
    rows = list(csv.DictReader(io.StringIO((out / "labels.csv").read_text())))
    assert [(r["slide_id"], r["patient_id"]) for r in rows] == [(i, i[:12]) for i in ids]
    # What a TCGA user has instead: a slide table (paths relative to it, so the folder can
    # move) and a clinical table with one row per patient, its slides' label and outcome.
    assert (out / "slides.csv").read_text().splitlines()[1].split(",")[1] == \
        Path(gdc[0]["url"]).relative_to(out).as_posix()
    moved = tmp_path / "moved"
    out.rename(moved)
    table = read_slide_table(str(moved / "slides.csv"))
    assert [(t.slide_id, t.patient_id) for t in table] == [(i, i[:12]) for i in ids]
    assert all(Path(t.path).is_file() and Path(t.path).parent.parent == moved for t in table)
    clinical = list(csv.DictReader(io.StringIO((moved / "clinical.csv").read_text())))
    assert list(clinical[0]) == ["patient_id", "label", "time", "event"]
    assert [c["patient_id"] for c in clinical] == list(dict.fromkeys(i[:12] for i in ids))
    by_patient = {c["patient_id"]: c for c in clinical}
    for r in rows:
        assert {k: by_patient[r["patient_id"]][k] for k in ("label", "time", "event")} == \
            {k: r[k] for k in ("label", "time", "event")}
    moved.rename(out)
    # Back to flat in the same folder: the GDC files are removed, the flat ones written.
    synthesize(_cfg(str(out)), progress=False)
    assert sorted(p.name for p in out.rglob("*.svs")) == []
    assert sorted(p.name for p in out.glob("*.tiff")) == [f"synth-000{i}.tiff" for i in range(3)]


def test_synthesize_to_s3(s3_bucket, tmp_path):  # noqa: F811
    cfg = _cfg(f"{s3_bucket}/synth", num_slides=2, paired_fraction=0.0)
    recs = synthesize(cfg, progress=False)
    assert storage.exists(f"{s3_bucket}/synth/labels.csv")
    assert storage.exists(f"{s3_bucket}/synth/clinical.csv")
    # The slide table's relative paths resolve against the bucket.
    table = read_slide_table(f"{s3_bucket}/synth/slides.csv")
    assert [t.path for t in table] == [r["url"] for r in recs]
    for r in recs:
        assert r["url"] == f"{s3_bucket}/synth/{r['slide_id']}.tiff"
        local = tmp_path / f"{r['slide_id']}.tiff"
        local.write_bytes(storage.read_bytes(r["url"]))
        assert sha(local) == r["sha256"]
        assert openslide.OpenSlide(str(local)).level_count == 2
        assert storage.exists(r["mask_url"])
    assert all(r["skipped"] for r in synthesize(cfg, progress=False))


# ----------------------------------------------------------------------------- recipes

def test_recipes_load_and_bad_values_fail_early():
    demo = load_config(SynthConfig, REPO / "configs/synth/demo.yaml")
    bench = load_config(SynthConfig, REPO / "configs/synth/bench.yaml")
    assert demo.num_slides * demo.size ** 2 <= 12 * 6144 ** 2 and demo.num_classes >= 2
    assert bench.size == 20000 and bench.num_slides == 1
    with pytest.raises(ConfigError, match="tile_size"):
        load_config(SynthConfig, None, ["output=x", "tile_size=500"])
    with pytest.raises(ConfigError, match="unknown cue"):
        load_config(SynthConfig, None, ["output=x", "cue_noise={nuclear_densty: 1.0}"])
    with pytest.raises(ConfigError, match="prototypes"):
        load_config(SynthConfig, None, ["output=x", "prototypes=[[1, 0, 0, 0]]"])
