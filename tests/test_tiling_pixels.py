"""The tiling pixel path: what a tile's pixels are, exactly, for each ``resample`` setting.

The fast paths (opaque regions skip compositing; ``reduce`` is a block mean) are checked byte
for byte against the slow reference spelled out here: the same pixels give the same JPEG.
"""

from __future__ import annotations

import io
import json

import numpy as np
import openslide
from PIL import Image

from fusedist.config import load_config
from fusedist.tiling import TileConfig, job, run_tile
from fusedist.tiling.plan import write_slide_shard
from fusedist.tiling.slide import _rgba_to_rgb, shrink
from tests.slides import he_texture, known_mask, write_pyramid
from tests.test_tiling import all_samples


def _composite(region: Image.Image) -> Image.Image:
    """The reference: every region composited over white (fusedist's path before 0.x)."""
    bg = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, region).convert("RGB")


def _block_mean(rgb: Image.Image, k: int) -> Image.Image:
    a = np.asarray(rgb, np.uint32)
    h, w = a.shape[0] // k, a.shape[1] // k
    s = a.reshape(h, k, w, k, 3).sum((1, 3))
    return Image.fromarray(((s + k * k // 2) // (k * k)).astype(np.uint8))  # round half up


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_opaque_skip_and_transparent_composite_match_the_reference():
    rgb = he_texture(64, 64, seed=3)
    opaque = Image.fromarray(np.dstack([rgb, np.full((64, 64), 255, np.uint8)]), "RGBA")
    assert np.array_equal(np.asarray(_rgba_to_rgb(opaque)), np.asarray(_composite(opaque)))
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :20] = 0  # outside the scanned area
    alpha[:, 20:24] = 128  # an anti-aliased edge
    edge = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    out = np.asarray(_rgba_to_rgb(edge))
    assert np.array_equal(out, np.asarray(_composite(edge)))
    assert (out[:, :20] == 255).all()  # painted white, not black


def test_reduce_is_a_block_mean_and_close_to_lanczos():
    img = Image.fromarray(he_texture(448, 448, seed=4))
    assert np.array_equal(np.asarray(shrink(img, 224)), np.asarray(_block_mean(img, 2)))
    lanczos = img.resize((224, 224), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(shrink(img, 224, "lanczos")), np.asarray(lanczos))
    # The documented equivalence (docs/formats.md): reduce and Lanczos differ by at most ~half
    # the error JPEG (quality 90) already puts in every stored tile; a 1-px shift is far beyond.
    f = lambda im: np.asarray(im, np.float32)  # noqa: E731
    diff = np.abs(f(shrink(img, 224)) - f(lanczos)).mean()
    jpeg_err = np.abs(f(Image.open(io.BytesIO(_jpeg(lanczos)))) - f(lanczos)).mean()
    shifted = np.abs(np.roll(f(lanczos), 1, axis=1) - f(lanczos)).mean()
    assert diff < 0.6 * jpeg_err and shifted > 3 * diff
    # A non-integer factor: block mean for the integer part, Lanczos for the rest.
    two_step = img.reduce(2).resize((200, 200), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(shrink(img, 200)), np.asarray(two_step))


def test_shards_hold_exactly_the_reference_tiles(ray_cluster, tmp_path, monkeypatch):
    # Small parts, so this one-shard slide is rendered by two tasks (2 CPUs) and then written.
    monkeypatch.setattr(job, "MIN_PART_TILES", 4)
    # One pyramid level: 224 px at 0.5 µm/px are read as 448 px from the 0.25 µm/px level 0.
    mask = known_mask(3072, 2560)
    rgb = np.full((2560, 3072, 3), 245, np.uint8)
    rgb[mask] = he_texture(3072, 2560, seed=5)[mask]
    path = write_pyramid(tmp_path / "one.tiff", rgb, 0.25, levels=1)
    slide = openslide.OpenSlide(str(path))
    for resample in ("reduce", "lanczos"):
        cfg = load_config(TileConfig, None, ["mode=grid", "tile_mpp=0.5", "min_tissue=0.3",
                                             f"resample={resample}"],
                          input=str(path), output=str(tmp_path / "out"), dataset=resample)
        res = run_tile(cfg, progress=False)
        assert res.manifest["totals"]["tiles"] > 0
        for s in all_samples(tmp_path / "out" / resample).values():
            meta = json.loads(s["meta.json"])
            region = _composite(slide.read_region((meta["x"], meta["y"]), 0, (448, 448)))
            ref = (_block_mean(region, 2) if resample == "reduce"
                   else region.resize((224, 224), Image.Resampling.LANCZOS))
            assert s["img.jpg"] == _jpeg(ref), (resample, meta)
    # The split shard is byte for byte the shard one task writes alone.
    (shard,) = res.manifest["shards"]
    record = json.loads((tmp_path / "out" / "lanczos" / "_state" / "slides" / "one.json")
                        .read_text())
    assert len(job.split_range(0, record["tiles"], 1, 2)) == 2
    alone = write_slide_shard(cfg, str(tmp_path / "alone"), record, shard["name"], 0,
                              record["tiles"], "-", [])
    assert alone["sha256"] == shard["sha256"]
    assert (tmp_path / "alone" / shard["name"]).read_bytes() == (
        tmp_path / "out" / "lanczos" / shard["name"]).read_bytes()
