"""`fusedist tile` against hs2p and a plain OpenSlide + PIL loop: whole processes, same slides.

Each configuration runs as its own process (start-up, Ray, planning and writing included),
interleaved over ``--reps`` rounds; the table shows medians and ratios measured in this run.

- ``fusedist``: this checkout, ``fusedist tile --mode grid`` (20x, 224 px), default settings.
- ``fusedist resample=lanczos``: the same with today's Lanczos pixels (tiles identical to the
  code before ``resample`` existed).
- ``fusedist (--before SRC)``: another source tree (e.g. ``git archive main``) for a before/after.
- ``hs2p``: hs2p's CLI (``save_tiles: true``, OpenSlide backend, ``num_workers`` = cores),
  installed in its own virtualenv (``--hs2p /tmp/hs2p-venv/bin/hs2p``), not a fusedist
  dependency. It resizes with bilinear and finds its own tissue, so tile counts differ:
  compare tiles/s as well as wall time.
- ``reference loop``: one process, for each tile fusedist kept: OpenSlide ``read_region`` ->
  RGB -> Lanczos -> JPEG into a tar (no Ray, no tissue step: coordinates are given).

    python benchmarks/tiling_vs_hs2p.py --hs2p /tmp/hs2p-venv/bin/hs2p --before /tmp/main-src
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_REFERENCE = r"""
import io, json, sys, tarfile, time
from pathlib import Path
import openslide
from PIL import Image
state, slides, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
n = 0
with tarfile.open(out, "w") as tar:
    for rec_path in sorted(state.glob("*.json")):
        rec = json.loads(rec_path.read_text())
        if rec.get("status") != "ok":
            continue
        slide = openslide.OpenSlide(rec["url"])
        size0 = round(224 * 0.5 / rec["mpp0"])
        for x, y in rec["coords"]:
            img = slide.read_region((x, y), 0, (size0, size0)).convert("RGB")
            img = img.resize((224, 224), Image.Resampling.LANCZOS)
            buf = io.BytesIO(); img.save(buf, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{rec['slide_id']}_{x}_{y}.jpg"); info.size = buf.tell()
            buf.seek(0); tar.addfile(info, buf); n += 1
print(n)
"""


def _timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None,
           tries: int = 2) -> tuple[float, str]:
    """Wall time of a successful run; on a loaded machine Ray's start can time out: retried."""
    for attempt in range(tries):
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
        wall = time.perf_counter() - t
        if p.returncode == 0:
            return wall, p.stdout
        print(f"  {cmd[:3]} failed ({p.returncode}), try {attempt + 1}/{tries}: "
              f"{p.stderr.strip().splitlines()[-1:]}", flush=True)
    raise RuntimeError(f"{cmd[:3]} failed ({p.returncode}):\n{p.stderr[-2000:]}")


def _fusedist(src: Path, slides: Path, out: Path, extra: list[str]) -> tuple[float, int]:
    import json

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "fusedist.cli", "tile", "-i", str(slides), "-o", str(out),
           "--dataset", "grid", "--mode", "grid", "--set", "tile_mpp=0.5", "--set",
           "tile_size=224", "-q", *extra]
    wall, _ = _timed(cmd, env, cwd=out.parent)
    tiles = json.loads((out / "grid" / "manifest.json").read_text())["totals"]["tiles"]
    return wall, tiles


def _hs2p(exe: str, slides: Path, work: Path, cores: int) -> tuple[float, int]:
    csv = work / "hs2p.csv"
    csv.write_text("sample_id,image_path\n" + "".join(
        f"{p.stem},{p}\n" for p in sorted(slides.glob("*.tiff"))))
    cfg = work / "hs2p.yaml"
    out = work / "hs2p-out"
    cfg.write_text(f"""csv: {csv}
output_dir: {out}
save_tiles: true
tiling:
  backend: openslide
  params: {{requested_spacing_um: 0.5, requested_tile_size_px: 224}}
  preview: {{save_mask_preview: false, save_tiling_preview: false}}
speed: {{num_workers: {cores}}}
""")
    wall, _ = _timed([exe, str(cfg), "--skip-datetime", "--output-dir", str(out)])
    import tarfile

    tiles = 0
    for tar in (out / "tiles").glob("*.tiles.tar"):
        with tarfile.open(tar) as t:
            tiles += sum(1 for m in t.getmembers() if m.isfile())
    shutil.rmtree(out, ignore_errors=True)
    return wall, tiles


def pixel_costs(slide_path: Path, n: int = 150) -> None:
    """CPU ms per grid tile (process time, so load on the machine matters little) of each
    step, for the code before (composite + Lanczos), now through OpenSlide (opaque skip +
    reduce) and now with the default TIFF tile reader."""
    import io

    import openslide
    from PIL import Image

    from fusedist.tiling.slide import _rgba_to_rgb, shrink

    slide = openslide.OpenSlide(str(slide_path))
    w, _ = slide.dimensions
    coords = [(x, y) for y in range(w // 4, 3 * w // 4 - 448, 448)
              for x in range(w // 4, 3 * w // 4 - 448, 448)][:n]

    def composite(r):
        return Image.alpha_composite(Image.new("RGBA", r.size, (255,) * 4), r).convert("RGB")

    def openslide_read(x, y):
        return slide.read_region((x, y), 0, (448, 448))

    def reduce(im):
        return shrink(im, 224)

    steps = {"before": (openslide_read, composite,
                        lambda im: im.resize((224, 224), Image.Resampling.LANCZOS)),
             "now": (openslide_read, _rgba_to_rgb, reduce)}
    # The default reader (fusedist/tiling/tiffread.py): its regions come out already RGB.
    from fusedist.tiling.tiffread import open_reader

    fast = open_reader(str(slide_path), openslide.OpenSlide(str(slide_path)), slide_path.name)
    if fast is not None:
        steps["now, reader=auto (fusedist's TIFF tile reader)"] = (
            lambda x, y: fast.region(x, y, 0, 448,
                                     lambda: _rgba_to_rgb(openslide_read(x, y))),
            lambda im: im, reduce)
    else:
        print("pixels reader=auto: this slide is read by OpenSlide", flush=True)
    for name, (read, to_rgb, resize) in steps.items():
        cost = dict(read=0.0, rgb=0.0, resize=0.0, jpeg=0.0)
        for x, y in coords:
            t = time.process_time()
            r = read(x, y)
            cost["read"] += time.process_time() - t
            t = time.process_time()
            img = to_rgb(r)
            cost["rgb"] += time.process_time() - t
            t = time.process_time()
            img = resize(img)
            cost["resize"] += time.process_time() - t
            t = time.process_time()
            img.save(io.BytesIO(), "JPEG", quality=90)
            cost["jpeg"] += time.process_time() - t
        _print_costs(name, cost, len(coords))


def _print_costs(name: str, cost: dict[str, float], n: int) -> None:
    total = sum(cost.values())
    print(f"pixels {name}: {total / n * 1e3:.1f} CPU ms/tile = "
          + ", ".join(f"{k} {v / n * 1e3:.1f} ({v / total:.0%})" for k, v in cost.items()),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, default=12000, help="level-0 side (px, 0.25 µm/px)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hs2p", help="hs2p executable in its own virtualenv")
    ap.add_argument("--before", type=Path, help="another fusedist source tree to compare")
    ap.add_argument("--work", type=Path, help="work folder (slides are kept and reused)")
    args = ap.parse_args()

    from fusedist.synth import make_slide

    work = args.work or Path(tempfile.mkdtemp(prefix="fusedist-vs-hs2p-"))
    slides = work / "slides"
    for i in range(args.slides):
        if not (slides / f"s{i}.tiff").exists():
            make_slide(slides / f"s{i}.tiff", size=args.size, mpp=0.25, seed=i)
    pixel_costs(slides / "s0.tiff")
    cores = os.cpu_count() or 1
    configs: dict[str, object] = {
        "fusedist": lambda o: _fusedist(REPO, slides, o, []),
        "fusedist resample=lanczos": lambda o: _fusedist(REPO, slides, o,
                                                         ["--set", "resample=lanczos"]),
    }
    if args.before:
        configs["fusedist (before)"] = lambda o: _fusedist(args.before, slides, o, [])
    if args.hs2p:
        configs["hs2p"] = lambda o: _hs2p(args.hs2p, slides, work, cores)
    state = work / "ref-state"

    def reference(o: Path) -> tuple[float, int]:
        wall, out = _timed([sys.executable, "-c", _REFERENCE, str(state), str(slides),
                            str(work / "ref.tar")])
        return wall, int(out.strip())

    results: dict[str, list[tuple[float, int]]] = {}
    for rep in range(args.reps):
        for name, fn in [*configs.items(), ("reference loop", reference)]:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            wall, tiles = fn(out)  # type: ignore[operator]
            if name == "fusedist" and not state.exists():  # the reference reads these tiles
                shutil.copytree(out / "grid" / "_state" / "slides", state)
            results.setdefault(name, []).append((wall, tiles))
            print(f"rep {rep} {name}: {wall:.1f} s, {tiles} tiles", flush=True)

    print(f"\nmachine: {platform.machine()}, {cores} cores, python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}; "
          f"{args.slides} slides of {args.size}² px at 0.25 µm/px, grid 224 px at 0.5 µm/px, "
          f"medians of {args.reps}")
    med = {n: (statistics.median(w for w, _ in r), r[0][1]) for n, r in results.items()}
    base = med.get("hs2p")
    print("| configuration | tiles | wall s (median) | tiles/s | wall / hs2p | tiles/s vs hs2p |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, (wall, tiles) in med.items():
        rel = (f"{wall / base[0]:.2f} | {(tiles / wall) / (base[1] / base[0]):.2f}" if base
               else "- | -")
        print(f"| {n} | {tiles} | {wall:.1f} | {tiles / wall:.1f} | {rel} |")
    ref_w, ref_t = med["reference loop"]
    fd_w, fd_t = med["fusedist"]
    print(f"\nfusedist / reference loop: wall {fd_w / ref_w:.2f}, tiles/s "
          f"{(fd_t / fd_w) / (ref_t / ref_w):.2f}")


if __name__ == "__main__":
    main()
