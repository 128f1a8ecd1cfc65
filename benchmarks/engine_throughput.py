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
  features saved) against ``fusedist embed`` as a command, with each engine;
- the peer tool, with ``--trident PYTHON`` (a Python that has TRIDENT installed from its
  source, in its own virtualenv, not a fusedist dependency): TRIDENT's
  ``WSI.extract_patch_features`` on the same slides at the same tile coordinates (its
  ``CustomInferenceEncoder`` around the same timm ViT with the same weights), timed around
  the extraction calls; it reads each tile from the slide where fusedist decodes a JPEG
  shard, so compare it with ``fusedist embed --slides`` (tile + embed) as well.
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


_TRIDENT_SCRIPT = r"""
import json, sys, time
import numpy as np, torch, timm, h5py
from safetensors.torch import load_file
from torchvision import transforms
from trident import OpenSlideWSI
from trident.patch_encoder_models.load import CustomInferenceEncoder

if __name__ == "__main__":
    job = json.load(open(sys.argv[1]))
    model = timm.create_model(job["arch"], pretrained=False, num_classes=0)
    model.load_state_dict(load_file(job["weights"]))
    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize(job["mean"], job["std"])])
    enc = CustomInferenceEncoder("bench", model, tf, torch.float32)
    n, t = 0, time.perf_counter()
    for s in job["slides"]:
        wsi = OpenSlideWSI(slide_path=s["path"], lazy_init=False)
        out = wsi.extract_patch_features(enc, s["coords"], job["out"], device="cpu",
                                         batch_limit=job["batch"])
        with h5py.File(out) as f:
            n += f["features"].shape[0]
    print(json.dumps({"tiles": n, "seconds": time.perf_counter() - t}))
"""


def trident_extract(python: str, work: Path, enc, tiles_manifest: dict, slides: Path,
                    dataset_url: str, batch: int) -> dict:
    """TRIDENT's extraction of the tiles fusedist kept (coordinates from tile's plan
    records, written in TRIDENT's coords format), in its own interpreter."""
    import json

    from safetensors.torch import save_file

    from fusedist.tiling.plan import slide_state
    from tests.trident import coords_attrs, save_h5

    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()},
              str(work / "trident-weights.safetensors"))
    records = slide_state(dataset_url).read_many(
        s["slide_id"] for s in tiles_manifest["slides"] if s["status"] == "ok")
    cfg = tiles_manifest["config"]
    jobs = []
    for sid, rec in sorted(records.items()):
        src_mag = round(10 / float(rec["mpp0"]))  # 0.25 µm/px: 40x
        dst_mag = round(10 / float(cfg["tile_mpp"]))
        path = work / "trident-coords" / f"{sid}_patches.h5"
        save_h5(path, {"coords": np.asarray(rec["coords"], np.int64)},
                {"coords": coords_attrs(sid, int(cfg["tile_size"]), src_mag, dst_mag,
                                        str(path.parent))})
        jobs.append({"path": str(slides / f"{sid}.tiff"), "coords": str(path)})
    spec = {"arch": enc.spec.arch, "weights": str(work / "trident-weights.safetensors"),
            "mean": list(enc.spec.mean), "std": list(enc.spec.std), "batch": batch,
            "out": str(work / "trident-features"), "slides": jobs}
    (work / "trident-job.json").write_text(json.dumps(spec))
    script = work / "trident_extract.py"
    script.write_text(_TRIDENT_SCRIPT)
    import subprocess

    t = time.perf_counter()
    r = subprocess.run([python, str(script), str(work / "trident-job.json")], check=True,
                       capture_output=True, text=True, cwd=work)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t
    return res


def _trident_cosine(work: Path, feats: dict[str, np.ndarray]) -> float:
    import h5py

    cos = []
    for path in sorted((work / "trident-features").glob("*.h5")):
        with h5py.File(path) as f:
            for (x, y), a in zip(f["coords"][:], f["features"][:]):
                b = feats[f"{path.stem}/{x}_{y}"]
                cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return float(np.mean(cos)) if cos else float("nan")


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
    ap.add_argument("--trident", help="a Python with TRIDENT installed (its own virtualenv)")
    args = ap.parse_args()

    import torch

    from fusedist.config import load_config
    from fusedist.features import CacheConfig, EmbedConfig, run_cache, run_embed
    from fusedist.models import build_encoder
    from fusedist.execution.rayrun import init_ray
    from fusedist.synth import make_slide
    from fusedist.tiling import TileConfig, run_tile

    weights = None if args.encoder.startswith("test-") else "random"
    work = Path(tempfile.mkdtemp(prefix="fusedist-engine-bench-"))
    sys.path.insert(0, str(REPO))  # tests.trident: TRIDENT's coords format
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
    # The same slides tiled and embedded by one command (what TRIDENT's extraction does).
    whole["fusedist embed --slides (tile + embed), engine local"] = _whole(
        [sys.executable, "-m", "fusedist.cli", "embed", "--slides", str(work / "slides"),
         "-o", str(work / "bags-cli-slides"), "-q",
         *[a for x in (*sets, "engine.executor=local") for a in ("--set", x)],
         *(["--set", f"encoders=[{{name: {args.encoder}, weights: {weights}}}]"]
           if weights else ["-e", args.encoder])], env)
    trident = None
    if args.trident:
        trident = trident_extract(args.trident, work, enc, tiles.manifest, work / "slides",
                                  tiles.dataset_url, args.batch_size)
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
    if trident:
        rows.append(("TRIDENT extract_patch_features (from the slides, extraction calls)",
                     trident["tiles"] / trident["seconds"]))
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / plain:.2f} | {rate / ref:.2f} |")
    print("\nWhole processes (imports, model build, Ray's start where used, all tiles):")
    print("| process | wall s | tiles/s | vs the plain loop script |")
    print("|---|---:|---:|---:|")
    base = whole["plain loop script"]
    if trident:
        whole["TRIDENT extraction script (its imports, model, the slides)"] = trident["wall"]
    for name, wall in whole.items():
        print(f"| {name} | {wall:.1f} | {n / wall:.1f} | {base / wall:.2f} |")
    if trident:
        print(f"TRIDENT extracted {trident['tiles']} tiles ({n} for fusedist); mean cosine "
              f"of its features to the plain loop's, tile by tile: "
              f"{_trident_cosine(work, plain_feats):.4f} (it reads and resizes the slide "
              "region itself, fusedist's tiles are JPEGs)")
    print(f"\nmax |cache - plain loop| feature difference: {worst:.2e} (float16 storage); "
          f"local and Ray engines' feature shards byte-identical: {same}")
    for ex, r in runs.items():
        st = r["cache"].engine
        print(f"cache, engine {ex}: first chunk back after {st.first_row_s:.1f} s; "
              f"{len(st.chunk_times)} chunks; process-tree memory {r['mem']}; driver intake "
              f"{st.bytes_received / len(urls):.0f} B/shard")


if __name__ == "__main__":
    main()
