"""Engine throughput: `fusedist cache`/`embed` end to end against the model-only forward and a
plain DataLoader + timm loop, same tiles, same weights, same cores, in one run.

- model-only: the encoder's ``embed`` on a fixed uint8 batch, all cores' torch threads;
- plain loop: what a user would write: a torch DataLoader (1 worker) reading the same tile
  shards and decoding the JPEGs, batches of ``--batch-size``, the model on all cores;
- cache / embed, each engine: ``engine.executor=local`` (no Ray: DataLoader workers decode,
  the driver's encoders compute) and ``ray`` (Ray Data on a private local Ray with every CPU,
  default split); "engine" time excludes the stage's own start (weights loaded in the driver),
  "wall" includes it;
- whole processes: the plain loop as a script of its own (imports, model build, loop,
  features saved) against ``fusedist embed`` as a command, with each engine.
The local contenders run before this process starts Ray (so the process-tree memory of the
local engine counts no Ray process). Features of the plain loop and of cache are compared
(same weights: random, seed 0), and the two engines' feature shards byte for byte.

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


_PLAIN_SCRIPT = r"""
import io, sys, time
import numpy as np, torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from fusedist.data.reader import iter_tar_samples
from fusedist.models import build_encoder

class Tiles(IterableDataset):
    def __init__(self, urls): self.urls = urls
    def __iter__(self):
        for url in self.urls:
            for key, s in iter_tar_samples(url):
                img = np.asarray(Image.open(io.BytesIO(s["img.jpg"])).convert("RGB"))
                yield key, torch.from_numpy(img).permute(2, 0, 1).contiguous()

if __name__ == "__main__":
    name, weights, batch, out, *urls = sys.argv[1:]
    enc = build_encoder(name, weights=None if weights == "-" else weights)
    keys, feats = [], []
    with torch.inference_mode():
        for k, x in DataLoader(Tiles(urls), batch_size=int(batch), num_workers=1):
            keys += k
            feats.append(enc.embed(x).numpy())
    np.savez(out, keys=np.array(keys), feats=np.concatenate(feats).astype(np.float16))
    print(len(keys))
"""


def _whole(cmd: list[str], env: dict | None = None) -> float:
    import subprocess

    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=REPO)
    return time.perf_counter() - t


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
    tiles = run_tile(load_config(TileConfig, None, ["mode=grid",
                                                    f"samples_per_shard={args.samples_per_shard}"],
                                 input=str(work / "slides"), output=str(work / "tiles")),
                     progress=False)  # no Ray here yet: local processes
    urls = [os.path.join(tiles.dataset_url, s["name"]) for s in tiles.manifest["shards"]]
    n = tiles.manifest["totals"]["tiles"]
    torch.set_num_threads(os.cpu_count())
    enc = build_encoder(args.encoder, weights=weights)
    ref = model_only(enc, args.batch_size, args.seconds)
    plain, plain_feats = plain_loop(enc, urls, args.batch_size)
    teacher = [{"name": args.encoder, "weights": weights}] if weights else [args.encoder]
    sets = [f"engine.batch_size={args.batch_size}", "mlflow.enabled=false"]
    runs: dict[str, dict] = {}

    def run_both(executor: str) -> None:
        ex = [*sets, f"engine.executor={executor}"]
        t = time.perf_counter()
        with TreeMemory() as mem:
            cache = run_cache(load_config(CacheConfig, None, ex, tiles=tiles.dataset_url,
                                          output=str(work / f"feats-{executor}"),
                                          teachers=teacher), progress=False)
        cache_wall = time.perf_counter() - t
        t = time.perf_counter()
        embed = run_embed(load_config(EmbedConfig, None, ex, tiles=tiles.dataset_url,
                                      output=str(work / f"bags-{executor}"),
                                      encoders=teacher), progress=False)
        runs[executor] = {"cache": cache, "cache_wall": cache_wall, "mem": mem,
                          "embed": embed, "embed_wall": time.perf_counter() - t}

    run_both("local")  # before this process starts Ray
    # Whole processes, each with its own imports: a user's script and the fusedist command.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = work / "plain_loop.py"
    script.write_text(_PLAIN_SCRIPT)
    whole = {"plain loop script": _whole([sys.executable, str(script), args.encoder,
                                          weights or "-", str(args.batch_size),
                                          str(work / "plain.npz"), *urls], env)}
    for executor in ("local", "ray"):
        whole[f"fusedist embed, engine {executor}"] = _whole(
            [sys.executable, "-m", "fusedist.cli", "embed", "--tiles", tiles.dataset_url,
             "-o", str(work / f"bags-cli-{executor}"), "-q",
             *[a for x in (*sets, f"engine.executor={executor}") for a in ("--set", x)],
             # -e would drop the weights: random ones are named through the config
             *(["--set", f"encoders=[{{name: {args.encoder}, weights: {weights}}}]"]
               if weights else ["-e", args.encoder])], env)
    start_ray(init_ray)
    run_both("ray")

    from fusedist.data.reader import iter_tar_samples

    folder = {ex: os.path.join(work / f"feats-{ex}", enc.spec.name, tiles.manifest["dataset"])
              for ex in runs}
    worst, same = 0.0, True
    for s in runs["local"]["cache"].manifests[enc.spec.name]["shards"]:
        for key, m in iter_tar_samples(os.path.join(folder["local"], s["name"])):
            got = np.load(io.BytesIO(m[f"{enc.spec.name}.npy"])).astype(np.float32)
            worst = max(worst, float(np.abs(got - plain_feats[key]).max()))
        same &= (Path(folder["local"], s["name"]).read_bytes()
                 == Path(folder["ray"], s["name"]).read_bytes())

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, CPU, torch "
          f"{torch.__version__}; {args.encoder} ({weights or 'seeded test'} weights), {n} tiles, "
          f"{len(urls)} shards, batch {args.batch_size}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| contender | tiles/s | vs plain loop | vs model-only |")
    print("|---|---:|---:|---:|")
    rows = [("model-only forward", ref), ("plain DataLoader + timm loop", plain)]
    for ex, r in runs.items():
        c, st = r["cache"], r["cache"].engine
        rows += [(f"fusedist cache, engine {ex} (engine time)", c.tiles / c.engine_seconds),
                 (f"fusedist cache, engine {ex} (steady state, after the first chunk)",
                  st.steady_rate or 0.0),
                 (f"fusedist cache, engine {ex} (wall, with its start)", c.tiles / r["cache_wall"]),
                 (f"fusedist embed, engine {ex} (wall, with its start)",
                  r["embed"].tiles / r["embed_wall"])]
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / plain:.2f} | {rate / ref:.2f} |")
    print("\nWhole processes (imports, model build, Ray's start where used, all tiles):")
    print("| process | wall s | tiles/s | vs the plain loop script |")
    print("|---|---:|---:|---:|")
    base = whole["plain loop script"]
    for name, wall in whole.items():
        print(f"| {name} | {wall:.1f} | {n / wall:.1f} | {base / wall:.2f} |")
    print(f"\nmax |cache - plain loop| feature difference: {worst:.2e} (float16 storage); "
          f"local and Ray engines' feature shards byte-identical: {same}")
    for ex, r in runs.items():
        st = r["cache"].engine
        print(f"cache, engine {ex}: first chunk back after {st.first_row_s:.1f} s; "
              f"{len(st.chunk_times)} chunks; process-tree memory {r['mem']}; driver intake "
              f"{st.bytes_received / len(urls):.0f} B/shard")


if __name__ == "__main__":
    main()
