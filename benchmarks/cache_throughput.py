"""Teacher-feature caching: end-to-end tiles/s against the model-only forward, same run.

End to end = shards -> JPEG decode (CPU tasks) -> every teacher (actor) -> feature shards
written. Model-only = the same encoders' ``embed`` on random uint8 batches of the same size, on
the same device, with the same threads an actor gets. Printed for one and for two teachers
(two teachers' model-only rate is 1 / sum(1 / rate_i)). Tiles are encoder inputs: a pairs
sample counts 16.

    python benchmarks/cache_throughput.py                                  # CPU, test-* models
    python benchmarks/cache_throughput.py --teachers uni,uni2-h --weights random \\
        --batch-size 1024 --slides 8 --size 20000                         # GPU figures
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def model_only(names, weights, batch: int, device: str, threads: int, seconds: float) -> dict:
    import torch

    from fusedist.models import build_encoder

    torch.set_num_threads(threads)
    rates = {}
    for n in names:
        enc = build_encoder(n, weights=weights, device=device)
        x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
        with torch.inference_mode():
            enc.embed(x)  # warm-up (kernels, caches)
            if device == "cuda":
                torch.cuda.synchronize()
            done, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds or done == 0:
                enc.embed(x).float().cpu()
                done += batch
            rates[n] = done / (time.perf_counter() - t)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", default="test-vit,test-vit-reg")
    ap.add_argument("--weights", default=None, help="'random' for real architectures")
    ap.add_argument("--mode", default="pairs", choices=["pairs", "grid"])
    ap.add_argument("--batch-size", type=int, default=64, help="encoder inputs per forward")
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--size", type=int, default=8192, help="level-0 side of each slide")
    ap.add_argument("--seconds", type=float, default=10.0, help="model-only timing window")
    args = ap.parse_args()

    import torch

    from fusedist.config import load_config
    from fusedist.features import CacheConfig, run_cache
    from fusedist.execution.rayrun import init_ray
    from fusedist.synth import make_slide
    from fusedist.tiling import TileConfig, run_tile

    names = args.teachers.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="fusedist-cache-bench-"))
    for i in range(args.slides):
        make_slide(work / "slides" / f"s{i}.tiff", size=args.size, mpp=0.25, seed=i)
    init_ray(None)
    tiles = run_tile(load_config(TileConfig, None, [f"mode={args.mode}", "samples_per_shard=64"],
                                 input=str(work / "slides"), output=str(work / "tiles")),
                     progress=False)
    per = 16 if args.mode == "pairs" else 1
    n_inputs = tiles.manifest["totals"]["tiles"] * per
    threads = 1 if device == "cpu" else torch.get_num_threads()  # what one actor gets
    ref = model_only(names, args.weights, args.batch_size, device, threads, args.seconds)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + f", torch {torch.__version__}; {n_inputs} encoder inputs ({args.mode})")
    print("| teachers | model-only tiles/s | end-to-end tiles/s (engine) | ratio "
          "| wall s (incl. start-up) |")
    print("|---|---:|---:|---:|---:|")
    for group in ([names[0]], names) if len(names) > 1 else ([names[0]],):
        teachers = [{"name": n, "weights": args.weights} if args.weights else n for n in group]
        cfg = load_config(CacheConfig, None, [f"engine.batch_size={args.batch_size}",
                                              "mlflow.enabled=false"],
                          tiles=tiles.dataset_url, output=str(work / f"f{len(group)}"),
                          teachers=teachers)
        t = time.perf_counter()
        res = run_cache(cfg, progress=False)
        wall = time.perf_counter() - t
        e2e = res.tiles * per / res.engine_seconds
        model = 1.0 / sum(1.0 / ref[n] for n in group)
        print(f"| {'+'.join(group)} | {model:.1f} | {e2e:.1f} | {e2e / model:.2f} | "
              f"{wall:.1f} |")


if __name__ == "__main__":
    main()
