"""Fixed costs: a one-item run of each stage as a whole process, and where its time goes.

For each stage, one tiny input (one small slide; one shard; one slide's grid tiles; a
12-slide synthetic cohort for fuse: 2 folds, 1 epoch) is run as ``fusedist <stage> ... -q``
in a fresh process, interleaved over ``--reps`` rounds (medians); tile, cache, embed and fuse
run with their default executor (no Ray on a laptop) and again on Ray (``executor=ray``).
For fuse the table's last line is its fixed cost: the whole process's wall time less the
folds' own work (each fold timed in this process, warm, as ``run_fold``), placed as the run
places them: a cohort this small runs its folds one after the other in the driver (their
times add up), Ray runs one per ``fold_cpus`` cores at once. Everything else is fixed cost:
imports, the cohort, the report and plots, and the final refit (model training on every
sample, but once per run whatever the folds: it is not fold work). In the same run, the
floors it cannot go below: the CLI's imports, a lean local Ray start + stop
(``fusedist.execution.rayrun.init_ray``) and a plain ``ray.init(address="local")`` +
``shutdown()`` with Ray's defaults; and the same stages pointed at a missing input (which
must fail before Ray starts).

    python benchmarks/startup.py --reps 3
    python benchmarks/startup.py --reps 1 --only fuse   # fuse (and the CLI's imports) only
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

_RAY_LEAN = ("import ray; from fusedist.execution.rayrun import init_ray; init_ray(); "
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


def _setup(work: Path, slides: bool = True) -> None:
    """Inputs, made once and untimed: a slide, its pairs and grid tiles, a fuse cohort."""
    from fusedist.synth.cohort import synthetic_cohort
    from fusedist.synth import make_slide

    if slides:
        make_slide(work / "slide" / "one.tiff", size=3072, mpp=0.25, seed=0)
        for mode in ("pairs", "grid"):
            _run(_cli("tile", "-i", str(work / "slide"), "-o", str(work / "tiles"),
                      "--dataset", mode, "--mode", mode, "--set", "tile_mpp=0.5", "--set",
                      "tile_size=224"))
    synthetic_cohort(str(work / "cohort"), num_slides=12, tiles=(16, 32))


# fuse on 12 slides: 2 folds (2 inner), 1 epoch of every head.
FUSE_SETS = {"folds": "2", "inner_folds": "2", "experts.epochs": "1",
             "experts.survival_epochs": "1", "meta.epochs": "1", "fusecpath.epochs": "1",
             "logitprod.max_epochs": "1", "mlflow.enabled": "false"}


def _fold_work(work: Path) -> tuple[list[float], int, int]:
    """Each fold of the benchmark's fuse run timed in this process (imports warm, one fold
    run untimed first), and how many processes a default run and a Ray run spread them over
    (1: one after the other, e.g. in the driver)."""
    import numpy as np

    from fusedist.config import load_config
    from fusedist.execution.local import local_cpus
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import load_cohort, make_folds
    from fusedist.fusion.fold import run_fold
    from fusedist.fusion.fold import prepare_methods, select_methods
    from fusedist.fusion.run import _fold_tasks

    cfg = load_config(FuseConfig, None, [f"{k}={v}" for k, v in FUSE_SETS.items()],
                      bags=str(work / "cohort" / "bags"),
                      labels=str(work / "cohort" / "labels.csv"), output=str(work / "fw"))
    c = load_cohort(cfg)
    methods, _ = select_methods(cfg, c)
    fold_ids = make_folds(c, np.arange(c.num_samples), cfg.folds, cfg.seed)
    heat = list(range(min(cfg.heatmaps, len(c.slide_ids))))
    prepared, _ = prepare_methods(methods, c, cfg, False)
    run_fold(c, cfg, fold_ids, 0, heat, methods, prepared)  # warm-up (lazy imports, caches)
    times = []
    for f in range(cfg.folds):
        t = time.perf_counter()
        run_fold(c, cfg, fold_ids, f, heat, methods, prepared)
        times.append(time.perf_counter() - t)
    # How a default run places them: the choice run_fuse makes (a cohort this small runs its
    # folds one after the other in the driver, so their work adds up); on Ray, one per
    # fold_cpus cores.
    tasks = _fold_tasks(cfg.model_copy(update={"executor": "local"}), cfg.folds, c.num_samples)
    local = 1 if tasks.inline else tasks.slots
    tasks.close()
    on_ray = max(1, min(cfg.folds, int(local_cpus(cfg.ray.num_cpus) // cfg.fold_cpus)))
    return times, local, on_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["fuse"], default=None,
                    help="run only these cases (and the CLI's imports)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fusedist-startup-"))
    t = time.perf_counter()
    _setup(work, slides=args.only is None)
    print(f"inputs made in {time.perf_counter() - t:.0f} s (untimed)", flush=True)
    missing = str(work / "missing")
    off = ["--set", "mlflow.enabled=false"]
    fuse_sets = [a for k, v in FUSE_SETS.items() for a in ("--set", f"{k}={v}")]
    fuse = _cli("fuse", "--bags", str(work / "cohort" / "bags"), "--labels",
                str(work / "cohort" / "labels.csv"), "-o", "{out}", *fuse_sets)
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
        "fuse: 12 slides, 2 folds": (fuse, 0),
        "fuse: 12 slides, 2 folds, on Ray": (fuse + ["--set", "executor=ray"], 0),
        "tile: missing input": (_cli("tile", "-i", missing, "-o", "{out}"), 2),
        "cache: missing input": (_cli("cache", "--tiles", missing, "-o", "{out}"), 2),
        "embed: missing input": (_cli("embed", "--tiles", missing, "-o", "{out}", "-e",
                                      "test-vit"), 2),
        "fuse: missing labels": (_cli("fuse", "--bags", str(work / "cohort" / "bags"),
                                      "--labels", missing, "-o", "{out}"), 2),
        "distill: missing input": (_cli("distill", "--tiles", missing, "--features", missing),
                                   2),
    }
    if args.only:
        cases = {k: v for k, v in cases.items()
                 if k.startswith(args.only) or k.startswith("imports")}
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
    folds, local, on_ray = _fold_work(work)

    def span(workers: int) -> float:  # the folds' own work spread over `workers` processes
        return max(sum(folds[i::workers]) for i in range(workers))

    wall = statistics.median(times["fuse: 12 slides, 2 folds"])
    ray_wall = statistics.median(times["fuse: 12 slides, 2 folds, on Ray"])
    print(f"\nfuse folds' own work: {', '.join(f'{t:.2f}' for t in folds)} s per fold; "
          f"{span(local):.2f} s in a default run ({local} process(es) at once), "
          f"{span(on_ray):.2f} s on Ray ({on_ray} at once)")
    print("(fixed cost: everything but the folds' own work; the final refit counts in it)")
    print(f"| fuse: fixed cost above the folds' own work (default executor) | "
          f"{wall - span(local):.1f} | | |")
    print(f"| fuse: fixed cost above the folds' own work (on Ray) | "
          f"{ray_wall - span(on_ray):.1f} | | |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
