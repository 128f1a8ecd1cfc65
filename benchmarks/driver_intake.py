"""What the `fusedist cache` driver receives and holds, against the number of shards.

The same tiles are cut into more and more shards (``samples_per_shard``); for each, `cache`
runs in a fresh driver process on a private local Ray, which reports the bytes it received
from Ray (rows + done-entries, ``CacheResult.engine.bytes_received``) and its own peak RSS
(VmHWM). Features are written by workers, so both should stay flat per shard / in total.

    python benchmarks/driver_intake.py                    # test-vit, 4 shard counts
    python benchmarks/driver_intake.py --encoder bench-vit-s16 --per-shard 64,16,4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_ray import start_ray  # noqa: E402 - beside this script


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(tiles: str, out: str, encoder: str, batch: int) -> None:
    """One driver: cache, then print its intake and peak RSS as JSON."""
    from fusedist.config import load_config
    from fusedist.features import CacheConfig, run_cache

    weights = None if encoder.startswith("test-") else "random"
    teacher = [{"name": encoder, "weights": weights}] if weights else [encoder]
    res = run_cache(load_config(CacheConfig, None, [f"engine.batch_size={batch}",
                                                    "mlflow.enabled=false"],
                                tiles=tiles, output=out, teachers=teacher), progress=False)
    m = next(iter(res.manifests.values()))
    print("RESULT " + json.dumps({"shards": m["totals"]["shards"], "tiles": res.tiles,
                                  "bytes_received": res.engine.bytes_received,
                                  "feature_bytes": m["totals"]["bytes"],
                                  "peak_rss_mb": _peak_rss_mb(),
                                  "engine_s": res.engine_seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="test-vit")
    ap.add_argument("--per-shard", default="64,16,4,2", help="samples_per_shard values")
    ap.add_argument("--size", type=int, default=9000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.encoder, args.batch_size)

    from fusedist.config import load_config
    from fusedist.execution.rayrun import init_ray
    from fusedist.synth import make_slide
    from fusedist.tiling import TileConfig, run_tile

    work = Path(tempfile.mkdtemp(prefix="fusedist-intake-bench-"))
    make_slide(work / "slides" / "s0.tiff", size=args.size, mpp=0.25, seed=0)
    start_ray(init_ray)
    datasets = {}
    for k in [int(x) for x in args.per_shard.split(",")]:
        r = run_tile(load_config(TileConfig, None, ["mode=grid", f"samples_per_shard={k}",
                                                    f"dataset=grid{k}"],
                                 input=str(work / "slides"), output=str(work / "tiles")),
                     progress=False)
        datasets[k] = r.dataset_url
    import ray

    ray.shutdown()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, CPU; {args.encoder}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| shards | tiles | driver received (B) | B / shard | features written (B) "
          "| driver peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k, url in datasets.items():
        p = subprocess.run([sys.executable, __file__, "--encoder", args.encoder,
                            "--batch-size", str(args.batch_size), "--child", url,
                            str(work / f"f{k}")], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"driver for {k} samples/shard failed:\n{p.stderr[-3000:]}")
        r = json.loads(line[7:])
        print(f"| {r['shards']} | {r['tiles']} | {r['bytes_received']} | "
              f"{r['bytes_received'] / r['shards']:.0f} | {r['feature_bytes']} | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
