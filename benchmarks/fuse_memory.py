"""Peak memory of `fuse` loading its cohort, in RAM against packed on disk, as slides grow.

Real-sized bags (UNI2-h-like: 1,536-d float32, ``--tiles`` tiles per slide, two encoders on
the same tiles) are written once for the largest cohort; each point loads the first N slides
in a fresh process (``load_cohort``, then one pass over every slide's features as a head's
epoch makes) and reports its peak RSS (VmHWM) and wall time. With ``bags_in_memory_gb: 0`` the
features are packed into memory-mapped files, so the peak should stay flat in N; in RAM it
grows by the features' bytes.

    python benchmarks/fuse_memory.py                       # 16, 32, 64 slides x 2,000 tiles
    python benchmarks/fuse_memory.py --slides 8,16 --tiles 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENCODERS = ("bench-uni2h", "bench-virchow2")
DIM = 1536


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_cohort(root: Path, n: int, tiles: int) -> tuple[str, str]:
    from fusedist.formats.bags import Bag, bag_url, write_bag

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(tiles)))
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:tiles]
    coords = (xy * 448).astype(np.int64)
    rows = ["slide_id,patient_id,label"]
    for i in range(n):
        sid = f"TCGA-{i:04d}"
        for e in ENCODERS:
            feats = rng.standard_normal((tiles, DIM), dtype=np.float32)
            write_bag(bag_url(str(root / "bags"), e, sid),
                      Bag(sid, feats, coords, e, mpp=0.5, tile_size=224))
        rows.append(f"{sid},P{i:04d},{'ab'[i % 2]}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return str(root / "bags"), str(labels)


def child(bags: str, labels: str, n: int, budget: float, out: str) -> None:
    import csv

    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import load_cohort
    from fusedist.fusion.store import remove_packed

    keep = Path(out) / "labels.csv"
    with open(labels) as f:
        rows = list(csv.reader(f))
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text("\n".join(",".join(r) for r in rows[: n + 1]) + "\n")
    t0 = time.perf_counter()
    c = load_cohort(FuseConfig(bags=bags, labels=str(keep), output=out, folds=2,
                               inner_folds=2,
                               encoders=list(ENCODERS), bags_in_memory_gb=budget))
    load_s = time.perf_counter() - t0
    peak = _status_mb("VmHWM")  # the load's peak: packing writes files, maps nothing yet
    t0 = time.perf_counter()
    total = 0.0
    for e in c.encoders:  # what one epoch of a bag head reads: every slide once
        for f in c.bags[e]:
            total += float(f[:, :8].sum())
    epoch_s = time.perf_counter() - t0
    feature_gb = sum(len(f) * f.shape[1] * 4 for e in c.encoders for f in c.bags[e]) / 2**30
    print("RESULT " + json.dumps({"slides": len(c.slide_ids), "feature_gb": feature_gb,
                                  "peak_rss_mb": peak, "load_s": load_s,
                                  # After the pass: private memory only; the mapped pages it
                                  # touched are page cache the kernel can take back.
                                  "anon_mb": _status_mb("RssAnon"),
                                  "epoch_read_s": epoch_s}))
    remove_packed(c.columns())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", default="16,32,64")
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        bags, labels, n, budget, out = args.child
        return child(bags, labels, int(n), float(budget), out)

    counts = [int(x) for x in args.slides.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; {args.tiles} tiles x {DIM}-d x {len(ENCODERS)} "
          "encoders per slide")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        bags, labels = write_cohort(Path(tmp), max(counts), args.tiles)
        print(f"wrote {max(counts)} slides' bags in {time.perf_counter() - t0:.0f} s")
        print("| slides | features GB | in RAM: load peak RSS MB | private MB after an epoch "
              "| load s | packed: load peak RSS MB | private MB after an epoch | load s "
              "| epoch read s (RAM / packed) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        points = []
        for n in counts:
            r = {}
            for mode, budget in (("ram", 1e6), ("packed", 0.0)):
                p = subprocess.run([sys.executable, __file__, "--child", bags, labels, str(n),
                                    str(budget), str(Path(tmp) / f"out-{mode}-{n}")],
                                   capture_output=True, text=True, check=False)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    sys.exit(f"child failed ({mode}, {n} slides):\n{p.stderr[-3000:]}")
                r[mode] = json.loads(line[0][7:])
            points.append((n, r))
            ram, pk = r["ram"], r["packed"]
            print(f"| {n} | {ram['feature_gb']:.2f} | {ram['peak_rss_mb']:.0f} | "
                  f"{ram['anon_mb']:.0f} | {ram['load_s']:.1f} | {pk['peak_rss_mb']:.0f} | "
                  f"{pk['anon_mb']:.0f} | {pk['load_s']:.1f} | {ram['epoch_read_s']:.2f} / "
                  f"{r['packed']['epoch_read_s']:.2f} |", flush=True)
        (a, ra), (b, rb) = points[0], points[-1]
        for mode in ("ram", "packed"):
            grow = (rb[mode]["peak_rss_mb"] - ra[mode]["peak_rss_mb"]) / (b - a)
            print(f"{mode}: peak RSS grows {grow:.1f} MB per slide "
                  f"({a} -> {b} slides: {ra[mode]['peak_rss_mb']:.0f} -> "
                  f"{rb[mode]['peak_rss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
