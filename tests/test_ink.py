"""Pen ink is not tissue: the HSV rule, synth's strokes, and tile planning on inked slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fusedist.synth import PenConfig, SynthConfig, ink_mask, synthesize
from fusedist.synth.dataset import slide_specs
from fusedist.tiling import TileConfig
from fusedist.tiling.ink import InkConfig, ink_pixels
from fusedist.tiling.plan import plan_slide
from fusedist.tiling.slide import open_slide, read_thumbnail
from fusedist.tiling.tissue import detect_tissue, tile_fractions

INK = {"blue": (40, 70, 160), "light blue": (110, 145, 205), "blue on tissue": (36, 41, 125),
       "green": (40, 125, 75), "green on tissue": (36, 70, 63), "black": (40, 40, 50),
       "black on tissue": (46, 30, 44), "blue-black": (25, 35, 70)}
STAIN = {"eosin": (232, 150, 190), "pale eosin": (242, 205, 225), "hematoxylin": (95, 60, 150),
         "nuclei cluster": (80, 45, 110), "orange eosin": (225, 120, 140), "glass": (245, 245, 248),
         "bluish glass": (232, 238, 250), "dark fold": (70, 35, 75)}
RED = (200, 40, 45)

MIN_TISSUE = 0.5
SIZE0 = 128  # grid tiles of 64 px at 0.5 µm/px on 0.25 µm/px slides: 32 µm, 4 thumbnail px


def flagged(colours: dict[str, tuple[int, int, int]], cfg: InkConfig) -> dict[str, bool]:
    rgb = np.array([list(colours.values())], np.uint8)
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    return dict(zip(colours, ink_pixels(hsv, cfg)[0].tolist()))


def test_pen_colours_are_ink_and_stain_is_not():
    cfg = InkConfig()
    assert flagged(INK, cfg) == {k: True for k in INK}
    assert flagged(STAIN, cfg) == {k: False for k in STAIN}
    # Red borders eosin: only when asked for, and then still not eosin.
    assert not flagged({"red": RED}, cfg)["red"]
    with_red = InkConfig(pens=["blue", "green", "black", "red"])
    assert flagged({"red": RED}, with_red)["red"]
    assert flagged(STAIN, with_red) == {k: False for k in STAIN}
    # Each rule is its own: without black, grey-black ink is not flagged (bluish black still
    # is: it is blue).
    no_black = flagged({**INK, "grey black": (45, 45, 45)}, InkConfig(pens=["blue", "green"]))
    assert [k for k, v in no_black.items() if not v] == ["black on tissue", "grey black"]


def synth(out: Path, strokes: int) -> dict:
    cfg = SynthConfig(output=str(out), num_slides=1, size=6144, seed=7, tissue_fraction=0.5,
                      pen=PenConfig(strokes=strokes, width_um=60.0))
    (rec,) = synthesize(cfg, progress=False)
    return rec


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> tuple[dict, dict]:
    """One synthetic slide without and with pen strokes (same seed: same tissue)."""
    d = tmp_path_factory.mktemp("ink")
    return synth(d / "clean", 0), synth(d / "inked", 3)


def tile_cfg(enabled: bool = True) -> TileConfig:
    return TileConfig(input=".", mode="grid", tile_size=64, tile_mpp=0.5,
                      min_tissue=MIN_TISSUE, tissue={"ink": {"enabled": enabled}})


def plan(rec: dict, cfg: TileConfig, out: Path) -> dict:
    r = plan_slide(cfg, str(out), rec["slide_id"], rec["url"], [], "test")
    assert r["status"] == "ok", r
    return r


def share(rec: dict, where: np.ndarray) -> np.ndarray:
    """Share of each kept tile inside ``where`` (a mask of 32 level-0 px cells)."""
    xy = np.array(rec["coords"]).reshape(-1, 2)
    return tile_fractions(where, 1 / 32, xy[:, 0], xy[:, 1], SIZE0)


def test_strokes_are_drawn_where_ink_mask_says_and_nowhere_else(slides):
    clean, inked = slides
    assert "ink_args" not in clean and inked["ink_args"]["strokes"] == 3
    truth = ink_mask(**inked["ink_args"])
    assert 0.02 < truth.mean() < 0.2
    thumbs = []
    for rec in slides:
        thumb, _ = read_thumbnail(open_slide(rec["url"]), 8.0, 0.25, rec["url"])
        thumbs.append(thumb.astype(int))
    changed = np.abs(thumbs[1] - thumbs[0]).max(axis=2) > 16  # JPEG: up to ~12
    # Ink darkens every pixel under a stroke; off the strokes (and their soft edge) the
    # slides are the same pixels: the strokes come from a random stream of their own.
    assert changed[truth].all()
    assert not changed[~ndimage.binary_dilation(truth, iterations=3)].any()


def test_no_kept_tile_is_mostly_ink_and_tissue_tiles_stay(slides, tmp_path):
    clean, inked = slides
    truth = ink_mask(**inked["ink_args"])
    on = plan(inked, tile_cfg(), tmp_path / "on")
    off = plan(inked, tile_cfg(False), tmp_path / "off")
    ref = plan(clean, tile_cfg(), tmp_path / "clean")
    # Without ink removal Otsu keeps the strokes: the test has teeth.
    assert (share(off, truth) > 0.5).sum() >= 20
    assert share(on, truth).max() <= 0.5, "a kept tile is mostly ink"
    assert 0.01 < on["ink_fraction"] < 0.3 and ref["ink_fraction"] == 0.0
    # Tissue tiles away from the ink (none of it within 48 µm) are kept as on the ink-free
    # slide, within 2%; the inked slide keeps no tile the ink-free one does not.
    near = ndimage.binary_dilation(truth, iterations=6)
    away_ref, away_on = (share(ref, near) == 0).sum(), (share(on, near) == 0).sum()
    assert away_ref > 300 and abs(away_on - away_ref) <= 0.02 * away_ref
    assert {tuple(c) for c in on["coords"]} <= {tuple(c) for c in ref["coords"]}


def test_ink_off_and_ink_free_slides_keep_todays_mask(slides):
    clean, inked = slides
    thumb, scale = read_thumbnail(open_slide(clean["url"]), 8.0, 0.25, clean["url"])
    on, ink = detect_tissue(thumb, 0.25 / scale, tile_cfg().tissue)
    off, none = detect_tissue(thumb, 0.25 / scale, tile_cfg(False).tissue)
    assert not ink.any() and not none.any() and on.any()
    np.testing.assert_array_equal(on, off)  # an ink-free slide: the mask of before


def test_thumbnail_hatches_the_removed_ink(slides, tmp_path):
    clean, inked = slides
    for rec, want in ((inked, True), (clean, False)):
        plan(rec, tile_cfg(), tmp_path / rec["slide_id"])
        png = np.asarray(Image.open(tmp_path / rec["slide_id"] / "thumbnails"
                                    / f"{rec['slide_id']}.png").convert("RGB")).astype(int)
        orange = (png[..., 0] > 200) & (np.abs(png[..., 1] - 125) < 40) & (png[..., 2] < 90)
        assert orange.any() == want


def test_pen_settings_only_touch_marked_slides():
    cfg = SynthConfig(output="x", num_slides=20, pen=PenConfig(strokes=2, slide_fraction=0.5))
    marked = [s.options.pen_strokes for s in slide_specs(cfg)]
    assert 3 <= marked.count(2) <= 17 and set(marked) == {0, 2}
    # Unmarked slides keep the digest they had before pens existed: nothing re-renders.
    plain = slide_specs(cfg.model_copy(update={"pen": PenConfig()}))
    for s, p in zip(slide_specs(cfg), plain):
        assert (s.digest() == p.digest()) == (s.options.pen_strokes == 0)


def test_predict_tiles_like_bags_made_before_ink_removal():
    from fusedist.predict import PredictConfig
    from fusedist.predict.slides import plan_encoders

    old = {k: v for k, v in TileConfig(input=".", mode="grid").tissue.model_dump().items()
           if k != "ink"}
    new = TileConfig(input=".", mode="grid").tissue.model_dump(mode="json")
    card = {"encoders": {e: {"mpp": 0.5, "tile_size": 224, "tiling": {"tissue": t}}
                         for e, t in (("old", old), ("new", new))}}
    plans = {p.name: p.recipe for p in plan_encoders(PredictConfig(model="m", slides="s"), card)}
    assert TileConfig(input=".", **plans["old"]).tissue.ink.enabled is False
    assert TileConfig(input=".", **plans["new"]).tissue.ink.enabled is True


def test_a_stroke_across_a_lumen_keeps_it_filled_a_circle_around_tissue_fills_no_glass():
    n = 240
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - n / 2, yy - n / 2)
    thumb = np.full((n, n, 3), 245, np.uint8)
    rng = np.random.default_rng(0)
    # A wavy piece: its rim is longer than the circle's, so only "rings no tissue" keeps the
    # glass between them unfilled.
    disc = r < 60 + 10 * np.sin(12 * np.arctan2(yy - n / 2, xx - n / 2))
    thumb[disc] = np.clip(np.array(STAIN["eosin"]) + rng.normal(0, 6, (disc.sum(), 1)), 0, 255)
    lumen = np.hypot(xx - 100, yy - 120) < 14
    thumb[lumen] = STAIN["glass"]
    stroke = np.abs(yy - 120) < 3  # a horizontal stroke through the lumen, out onto the glass
    ring = (r > 85) & (r < 91)     # a circle drawn around the tissue
    thumb[stroke | ring] = INK["blue"]
    mask, ink = detect_tissue(thumb, 8.0, tile_cfg().tissue)
    assert not (mask & ink).any() and ink[stroke | ring].all()
    assert mask[lumen & ~ink].all()  # the lumen is still a hole filled
    assert not mask[(r > 72) & (r < 80)].any()  # the glass inside the circle
    assert (mask & disc & ~ink).sum() >= 0.97 * (disc & ~ink).sum()
