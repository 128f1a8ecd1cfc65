"""Tiling throughput: tiles/s and MB/s for both modes, local disk vs S3, in one run.

Reference measured in the same run: the OpenSlide read + resize of the same tiles in one
process with no JPEG encoding and no writing ("read-only"), so the pipeline's figures are
shown as a ratio of what one core can read. S3 is a moto server on 127.0.0.1 (a real HTTP S3
API; real S3 adds network latency and bandwidth limits).

    python benchmarks/tiling.py --size 20000          # the figures in docs/benchmarks.md
    python benchmarks/tiling.py --size 8192 --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def read_only_rate(slide_path: Path, manifest: dict, cfg, limit: int = 200) -> float:
    """Tiles/s of read_region + resize alone (one process), on the tiles the job kept."""
    from fusedist.tiling.slide import open_slide, plan_geometry, read_tile

    slide = open_slide(slide_path)
    rec = manifest["slides"][0]
    geo = plan_geometry(slide, rec["mpp0"], cfg.target_mpp, cfg.out_size, "bench")
    # The kept coordinates are in the slide plan the job saved.
    state = Path(cfg.output) / cfg.dataset / "_state" / "slides" / f"{rec['slide_id']}.json"
    coords = json.loads(state.read_text())["coords"][:limit]
    t = time.perf_counter()
    for x, y in coords:
        img = read_tile(slide, x, y, geo, "bench")
        if cfg.mode == "pairs":
            img.resize((cfg.lo_size, cfg.lo_size))
    return len(coords) / (time.perf_counter() - t)


def run_one(slide_dir: Path, output: str, mode: str, endpoint: str | None, cache: Path,
            per_shard: int):
    from fusedist.config import load_config
    from fusedist.tiling import TileConfig, run_tile

    # Parallelism is one task per shard: small shards spread one slide over every core.
    sets = [f"mode={mode}", f"samples_per_shard={per_shard}", f"storage.cache_dir={cache}"]
    if endpoint:
        sets.append(f"storage.endpoint_url={endpoint}")
    cfg = load_config(TileConfig, None, sets, input=str(slide_dir), output=output,
                      dataset=mode)
    t = time.perf_counter()
    res = run_tile(cfg, progress=False)
    wall = time.perf_counter() - t
    tot = res.manifest["totals"]
    return cfg, res, {"tiles": tot["tiles"], "MB": tot["bytes"] / 1e6, "seconds": wall,
                      "tiles/s": tot["tiles"] / wall, "MB/s": tot["bytes"] / 1e6 / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="level-0 side of the slide (px)")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px (0.25 = 40x)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs")
    ap.add_argument("--quick", action="store_true", help="skip S3")
    args = ap.parse_args()

    import ray

    from fusedist.config import RayConfig
    from fusedist.execution.rayrun import init_ray
    from fusedist.synth import make_slide

    work = Path(tempfile.mkdtemp(prefix="fusedist-bench-"))
    slides = work / "slides"
    t = time.perf_counter()
    info = make_slide(slides / "bench.tiff", size=args.size, mpp=args.mpp, seed=0)
    synth_s = time.perf_counter() - t
    size_mb = (slides / "bench.tiff").stat().st_size / 1e6
    print(f"synthetic slide: {args.size}x{args.size} px at {args.mpp} µm/px, {size_mb:.0f} MB, "
          f"tissue {info.tissue_fraction:.0%}, made in {synth_s:.1f} s")

    server = None
    endpoint = None
    if not args.quick:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    # After the fake credentials are in the environment: Ray workers inherit it at start.
    init_ray(RayConfig(num_cpus=args.cpus))  # started once, outside the timed runs

    # Warm-up, untimed: Ray starts worker processes (and their imports) lazily, which would
    # otherwise be charged to whichever configuration is measured first.
    warm = work / "warm"
    make_slide(warm / "slides" / "w.tiff", size=4096, mpp=args.mpp, seed=1)
    for mode in ("pairs", "grid"):
        run_one(warm / "slides", str(warm / "tiles"), mode, None, work / "cache", 4)

    rows = []
    for mode, per_shard in (("pairs", 8), ("grid", 128)):
        cfg, res, local = run_one(slides, str(work / "tiles"), mode, None, work / "cache",
                                  per_shard)
        ref = read_only_rate(slides / "bench.tiff", res.manifest, cfg)
        rows.append((mode, "local", local, ref))
        if endpoint:
            _, _, s3 = run_one(slides, "s3://bench/tiles", mode, endpoint, work / "cache",
                               per_shard)
            rows.append((mode, "s3 (moto)", s3, ref))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Ray CPUs {args.cpus}, "
          f"python {platform.python_version()}")
    print("| mode | target | tiles | MB | s | tiles/s | MB/s | read-only tiles/s (1 core) "
          "| pipeline / (read-only x CPUs) | S3 / local |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    local_rate = {}
    for mode, target, r, ref in rows:
        if target == "local":
            local_rate[mode] = r["tiles/s"]
        s3_ratio = f"{r['tiles/s'] / local_rate[mode]:.2f}" if target != "local" else "-"
        print(f"| {mode} | {target} | {r['tiles']} | {r['MB']:.1f} | {r['seconds']:.1f} | "
              f"{r['tiles/s']:.1f} | {r['MB/s']:.1f} | {ref:.1f} | "
              f"{r['tiles/s'] / (ref * args.cpus):.2f} | {s3_ratio} |")
    ray.shutdown()
    if server:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
