"""Fixed costs: a one-item run of each stage as a whole process, and where its time goes.

For each stage, one tiny input (one small slide; one shard; one slide's grid tiles; a
12-slide synthetic cohort for fuse) is run as ``fusedist <stage> ... -q`` in a fresh process,
interleaved over ``--reps`` rounds (medians); tile, cache and embed run with their default
executor (no Ray on a laptop) and again on Ray (``executor=ray``). In the same run, the floors it cannot go below:
the CLI's imports, a lean local Ray start + stop (``fusedist.runtime.init_ray``) and a plain
``ray.init(address="local")`` + ``shutdown()`` with Ray's defaults; and the same stages
pointed at a missing input (which must fail before Ray starts).

    python benchmarks/startup.py --reps 3
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

_RAY_LEAN = ("import ray; from fusedist.runtime import init_ray; init_ray(); "
             "ray.get(ray.remote(lambda: 1).remote()); ray.shutdown()")
_RAY_DEFAULT = ("import ray; ray.init(address='local'); "
                "ray.get(ray.remote(lambda: 1).remote()); ray.shutdown()")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(args: list[str], expect: int = 0, tries: int = 2) -> float:
    """Wall time of a run that exits ``expect``; on a loaded machine Ray's start can time
    out, so a failed run is retried once (and said so)."""
    for attempt in range(tries):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env())
        wall = time.perf_counter() - t
        if p.returncode == expect:
            return wall
        print(f"  {args[:4]} exited {p.returncode}, try {attempt + 1}/{tries}: "
              f"{p.stderr.strip().splitlines()[-1:]}", flush=True)
    raise RuntimeError(f"{args[:4]} exited {p.returncode}, expected {expect}:\n"
                       f"{p.stderr[-2000:]}")


def _cli(*args: str) -> list[str]:
    return ["-m", "fusedist.cli", *args, "-q"]


def _setup(work: Path) -> None:
    """Inputs, made once and untimed: a slide, its pairs and grid tiles, a fuse cohort."""
    from fusedist.synth.cohort import synthetic_cohort
    from fusedist.synth import make_slide

    make_slide(work / "slide" / "one.tiff", size=3072, mpp=0.25, seed=0)
    for mode in ("pairs", "grid"):
        _run(_cli("tile", "-i", str(work / "slide"), "-o", str(work / "tiles"), "--dataset",
                  mode, "--mode", mode, "--set", "tile_mpp=0.5", "--set", "tile_size=224"))
    synthetic_cohort(str(work / "cohort"), num_slides=12, tiles=(16, 32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fusedist-startup-"))
    t = time.perf_counter()
    _setup(work)
    print(f"inputs made in {time.perf_counter() - t:.0f} s (untimed)", flush=True)
    missing = str(work / "missing")
    off = ["--set", "mlflow.enabled=false"]
    fuse_sets = ["--set", "folds=3", "--set", "inner_folds=2", "--set", "experts.epochs=2",
                 "--set", "meta.epochs=1", "--set", "fusecpath.epochs=1",
                 "--set", "logitprod.max_epochs=5", *off]
    cases: dict[str, tuple[list[str], int]] = {
        "imports (fusedist --help)": (["-m", "fusedist.cli", "--help"], 0),
        "Ray start+stop, lean (init_ray)": (["-c", _RAY_LEAN], 0),
        "Ray start+stop, Ray defaults": (["-c", _RAY_DEFAULT], 0),
        "tile: 1 slide": (_cli("tile", "-i", str(work / "slide"), "-o", "{out}", "--mode",
                               "grid"), 0),
        "cache: 1 shard, test-vit": (_cli("cache", "--tiles", str(work / "tiles" / "pairs"),
                                          "-o", "{out}", "-t", "test-vit", *off), 0),
        "embed: 1 slide, test-vit": (_cli("embed", "--tiles", str(work / "tiles" / "grid"),
                                          "-o", "{out}", "-e", "test-vit", *off), 0),
        # The same three on Ray (what they ran on before the local executors: a private
        # local Ray each, started and stopped by the stage).
        "tile: 1 slide, on Ray": (_cli("tile", "-i", str(work / "slide"), "-o", "{out}",
                                       "--mode", "grid", "--set", "executor=ray"), 0),
        "cache: 1 shard, test-vit, on Ray": (_cli("cache", "--tiles",
                                                  str(work / "tiles" / "pairs"), "-o", "{out}",
                                                  "-t", "test-vit", *off, "--set",
                                                  "engine.executor=ray"), 0),
        "embed: 1 slide, test-vit, on Ray": (_cli("embed", "--tiles",
                                                  str(work / "tiles" / "grid"), "-o", "{out}",
                                                  "-e", "test-vit", *off, "--set",
                                                  "engine.executor=ray"), 0),
        "fuse: 12 slides, 3 folds": (_cli("fuse", "--bags", str(work / "cohort" / "bags"),
                                          "--labels", str(work / "cohort" / "labels.csv"),
                                          "-o", "{out}", *fuse_sets), 0),
        "tile: missing input": (_cli("tile", "-i", missing, "-o", "{out}"), 2),
        "cache: missing input": (_cli("cache", "--tiles", missing, "-o", "{out}"), 2),
        "embed: missing input": (_cli("embed", "--tiles", missing, "-o", "{out}", "-e",
                                      "test-vit"), 2),
        "fuse: missing labels": (_cli("fuse", "--bags", str(work / "cohort" / "bags"),
                                      "--labels", missing, "-o", "{out}"), 2),
        "distill: missing input": (_cli("distill", "--tiles", missing, "--features", missing),
                                   2),
    }
    times: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for name, (cmd, code) in cases.items():
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            wall = _run([c.replace("{out}", str(out)) for c in cmd], code)
            times.setdefault(name, []).append(wall)
            print(f"rep {rep} {name}: {wall:.1f} s", flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load average now {os.getloadavg()[0]:.1f}; "
          f"medians of {args.reps}, whole processes")
    print("| run | wall s (median) | min | max |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f} | {max(ts):.1f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
