"""Engine throughput: `fusedist cache`/`embed` end to end against the model-only forward and a
plain DataLoader + timm loop, same tiles, same weights, same cores, in one run.

- model-only: the encoder's ``embed`` on a fixed uint8 batch, all cores' torch threads;
- plain loop: what a user would write: a torch DataLoader (1 worker) reading the same tile
  shards and decoding the JPEGs, batches of ``--batch-size``, the model on all cores;
- cache / embed: the fusedist stages on a private local Ray with every CPU, default engine
  split (decode tasks 0.25 CPU, the actor the rest); "engine" time excludes start-up.
Features of the plain loop and of cache are compared (same weights: random, seed 0).

    python benchmarks/engine_throughput.py                        # ViT-S/16, ~400 tiles
    python benchmarks/engine_throughput.py --encoder test-vit --slides 1   # quick
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_ray import TreeMemory, start_ray  # noqa: E402 - beside this script


def model_only(enc, batch: int, seconds: float) -> float:
    import torch

    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        enc.embed(x)  # warm-up
        done, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds or done == 0:
            enc.embed(x)
            done += batch
    return done / (time.perf_counter() - t)


class _Tiles:
    """torch IterableDataset over the tile shards (a user's loader: decode in the worker)."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    def __iter__(self):
        import torch
        from PIL import Image

        from fusedist.data.reader import iter_tar_samples

        for url in self.urls:
            for key, s in iter_tar_samples(url):
                img = np.asarray(Image.open(io.BytesIO(s["img.jpg"])).convert("RGB"))
                yield key, torch.from_numpy(img).permute(2, 0, 1).contiguous()


def plain_loop(enc, urls: list[str], batch: int) -> tuple[float, dict[str, np.ndarray]]:
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    ds = type("TileDS", (_Tiles, IterableDataset), {})(urls)
    dl = DataLoader(ds, batch_size=batch, num_workers=1)
    feats: dict[str, np.ndarray] = {}
    t = time.perf_counter()
    with torch.inference_mode():
        for keys, x in dl:
            for k, f in zip(keys, enc.embed(x).numpy()):
                feats[k] = f
    return len(feats) / (time.perf_counter() - t), feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="bench-vit-s16")
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--size", type=int, default=9000, help="level-0 side (0.25 µm/px)")
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--samples-per-shard", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()

    import torch

    from fusedist.config import load_config
    from fusedist.features import CacheConfig, EmbedConfig, run_cache, run_embed
    from fusedist.models import build_encoder
    from fusedist.runtime import init_ray
    from fusedist.synth import make_slide
    from fusedist.tiling import TileConfig, run_tile

    weights = None if args.encoder.startswith("test-") else "random"
    work = Path(tempfile.mkdtemp(prefix="fusedist-engine-bench-"))
    for i in range(args.slides):
        make_slide(work / "slides" / f"s{i}.tiff", size=args.size, mpp=0.25, seed=i)
    start_ray(init_ray)
    tiles = run_tile(load_config(TileConfig, None, ["mode=grid",
                                                    f"samples_per_shard={args.samples_per_shard}"],
                                 input=str(work / "slides"), output=str(work / "tiles")),
                     progress=False)
    urls = [os.path.join(tiles.dataset_url, s["name"]) for s in tiles.manifest["shards"]]
    n = tiles.manifest["totals"]["tiles"]
    torch.set_num_threads(os.cpu_count())
    enc = build_encoder(args.encoder, weights=weights)
    ref = model_only(enc, args.batch_size, args.seconds)
    plain, plain_feats = plain_loop(enc, urls, args.batch_size)
    teacher = [{"name": args.encoder, "weights": weights}] if weights else [args.encoder]
    sets = [f"engine.batch_size={args.batch_size}", "mlflow.enabled=false"]
    t = time.perf_counter()
    with TreeMemory() as cache_mem:
        cache = run_cache(load_config(CacheConfig, None, sets, tiles=tiles.dataset_url,
                                      output=str(work / "feats"), teachers=teacher),
                          progress=False)
    cache_wall = time.perf_counter() - t
    t = time.perf_counter()
    embed = run_embed(load_config(EmbedConfig, None, sets, tiles=tiles.dataset_url,
                                  output=str(work / "bags"), encoders=teacher), progress=False)
    embed_wall = time.perf_counter() - t
    cache_rate = cache.tiles / cache.engine_seconds

    from fusedist.data.reader import iter_tar_samples

    folder = os.path.join(work / "feats", enc.spec.name, tiles.manifest["dataset"])
    worst = 0.0
    for s in cache.manifests[enc.spec.name]["shards"]:
        for key, m in iter_tar_samples(os.path.join(folder, s["name"])):
            got = np.load(io.BytesIO(m[f"{enc.spec.name}.npy"])).astype(np.float32)
            worst = max(worst, float(np.abs(got - plain_feats[key]).max()))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, CPU, torch "
          f"{torch.__version__}; {args.encoder} ({weights or 'seeded test'} weights), {n} tiles, "
          f"{len(urls)} shards, batch {args.batch_size}; load average "
          f"{os.getloadavg()[0]:.1f}")
    st = cache.engine
    steady = st.steady_rate or 0.0
    print("| contender | tiles/s | vs plain loop | vs model-only |")
    print("|---|---:|---:|---:|")
    for name, rate in (("model-only forward", ref), ("plain DataLoader + timm loop", plain),
                       ("fusedist cache (engine time)", cache_rate),
                       ("fusedist cache (steady state, after the first chunk)", steady),
                       ("fusedist cache (wall, with start-up)", cache.tiles / cache_wall),
                       ("fusedist embed (wall, with start-up)", embed.tiles / embed_wall)):
        print(f"| {name} | {rate:.1f} | {rate / plain:.2f} | {rate / ref:.2f} |")
    print(f"max |cache - plain loop| feature difference: {worst:.2e} (float16 storage)")
    print(f"cache engine: first chunk back after {st.first_row_s:.1f} s (Ray Data start, actor "
          f"spawned, encoder built, first forward); {len(st.chunk_times)} chunks")
    print(f"cache memory: {cache_mem} ({n} tiles; run twice with other --size to see it "
          "stay flat)")
    print(f"driver intake: {st.bytes_received} B for {len(urls)} shards "
          f"({st.bytes_received / len(urls):.0f} B/shard; features written "
          f"{cache.manifests[enc.spec.name]['totals']['bytes'] / len(urls):.0f} B/shard)")


if __name__ == "__main__":
    main()
