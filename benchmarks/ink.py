"""Ink removal measured against drawn pen strokes (the figures in docs/benchmarks.md).

Each slide is synthesised twice from one seed, without and with pen strokes (same tissue,
nuclei and stain), and both are planned by ``fusedist tile`` (grid mode, real OpenSlide):

* ink removed: share of the true ink (``ink_mask``, at thumbnail scale) outside the tissue
  mask, with ink removal on and off;
* tissue kept: share of the clean slide's tissue mask away from the ink (true ink grown by
  ``--near-um``) that the inked slide's mask keeps;
* tiles: kept tiles of the inked slide vs the clean slide, all of them and those away from
  the ink (no true ink within ``--near-um``), and kept tiles that are mostly (>50%) ink.

    python benchmarks/ink.py                     # 6 slides, 4 strokes of 150 µm
    python benchmarks/ink.py --slides 2 --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusedist.synth import PenConfig, SynthConfig, ink_mask, synthesize  # noqa: E402
from fusedist.tiling import TileConfig  # noqa: E402
from fusedist.tiling.plan import plan_slide  # noqa: E402
from fusedist.tiling.slide import open_slide, read_thumbnail  # noqa: E402
from fusedist.tiling.tissue import detect_tissue, tile_fractions  # noqa: E402


def slides(out: Path, n: int, size: int, strokes: int, width_um: float) -> list[dict]:
    cfg = SynthConfig(output=str(out), num_slides=n, size=size, seed=3, tissue_fraction=0.45,
                      pen=PenConfig(strokes=strokes, width_um=width_um))
    return synthesize(cfg, progress=False)


def masks(url: str, tile: TileConfig) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, ink) on the slide's thumbnail, as ``fusedist tile`` finds them."""
    slide = open_slide(url)
    thumb, scale = read_thumbnail(slide, tile.tissue.thumbnail_mpp, 0.25, url)
    return detect_tissue(thumb, 0.25 / scale, tile.tissue)


def plan(url: str, tile: TileConfig, out: Path) -> dict:
    rec = plan_slide(tile, str(out), Path(url).stem, url, [], "bench")
    assert rec["status"] == "ok", rec
    return rec


def measure(clean: dict, inked: dict, tmp: Path, near_um: float, on: TileConfig) -> dict:
    off = on.model_copy(update={"tissue": on.tissue.model_copy(
        update={"ink": on.tissue.ink.model_copy(update={"enabled": False})})})
    truth = ink_mask(**inked["ink_args"])  # 32 level-0 px per cell = the thumbnail's pixels
    m_clean, _ = masks(clean["url"], on)
    m_on, _ = masks(inked["url"], on)
    m_off, _ = masks(inked["url"], off)
    near = ndimage.binary_dilation(truth, iterations=max(1, round(near_um / 8)))
    away = m_clean & ~near
    recs = {k: plan(u, c, tmp / k) for k, (u, c) in
            {"clean": (clean["url"], on), "on": (inked["url"], on),
             "off": (inked["url"], off)}.items()}
    size0 = 128  # 64 px at 0.5 µm/px on a 0.25 µm/px slide

    def share(rec: dict, where: np.ndarray) -> np.ndarray:
        xy = np.array(rec["coords"]).reshape(-1, 2)
        return tile_fractions(where, 1 / 32, xy[:, 0], xy[:, 1], size0)

    return {"ink_removed_on": 1 - (m_on & truth).sum() / truth.sum(),
            "ink_removed_off": 1 - (m_off & truth).sum() / truth.sum(),
            "tissue_kept": (m_on & away).sum() / away.sum(),
            "tiles_clean": recs["clean"]["tiles"], "tiles_on": recs["on"]["tiles"],
            "away_clean": int((share(recs["clean"], near) == 0).sum()),
            "away_on": int((share(recs["on"], near) == 0).sum()),
            "inky_on": int((share(recs["on"], truth) > 0.5).sum()),
            "inky_off": int((share(recs["off"], truth) > 0.5).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=8192, help="level-0 side at 0.25 µm/px")
    ap.add_argument("--strokes", type=int, default=4)
    ap.add_argument("--width-um", type=float, default=150.0)
    ap.add_argument("--near-um", type=float, default=48.0,
                    help="tissue this close to true ink may go with it (the margin + blur)")
    ap.add_argument("--margin-um", type=float, default=24.0, help="tissue.ink.margin_um")
    ap.add_argument("--quick", action="store_true", help="4096 px slides")
    a = ap.parse_args()
    size = 4096 if a.quick else a.size
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        clean = slides(tmp / "clean", a.slides, size, 0, a.width_um)
        inked = slides(tmp / "inked", a.slides, size, a.strokes, a.width_um)
        on = TileConfig(input=".", mode="grid", tile_size=64, tile_mpp=0.5, thumbnails=False,
                        tissue={"ink": {"margin_um": a.margin_um}})
        rows = [measure(c, i, tmp / c["slide_id"], a.near_um, on) for c, i in zip(clean, inked)]
    print(f"{a.slides} slides {size}x{size} px at 0.25 µm/px, {a.strokes} strokes of "
          f"{a.width_um:g} µm (blue, green, black), grid tiles of 32 µm, min_tissue 0.5")
    print(f"{'slide':>5} {'ink removed':>11} {'(off)':>6} {'tissue kept':>11} "
          f"{'tiles clean':>11} {'inked':>6} {'away clean':>10} {'inked':>6} {'ratio':>6} "
          f"{'mostly ink on/off':>17}")
    for k, r in enumerate(rows):
        print(f"{k:>5} {r['ink_removed_on']:>11.1%} {r['ink_removed_off']:>6.1%} "
              f"{r['tissue_kept']:>11.1%} {r['tiles_clean']:>11} {r['tiles_on']:>6} "
              f"{r['away_clean']:>10} {r['away_on']:>6} {r['away_on'] / r['away_clean']:>6.3f} "
              f"{r['inky_on']:>8}/{r['inky_off']}")
    t = {k: sum(r[k] for r in rows) for k in rows[0]}
    n = len(rows)
    print(f"mean: ink removed {t['ink_removed_on'] / n:.1%} (ink removal off: "
          f"{t['ink_removed_off'] / n:.1%}), tissue away from ink kept {t['tissue_kept'] / n:.1%}"
          f"; kept tiles away from ink {t['away_on']} vs {t['away_clean']} on the clean slides "
          f"({t['away_on'] / t['away_clean']:.3f}), all kept tiles {t['tiles_on']} vs "
          f"{t['tiles_clean']}; mostly-ink tiles kept {t['inky_on']} (off: {t['inky_off']})")


if __name__ == "__main__":
    main()
