"""Digests of every output file of a small end-to-end run, to prove a refactor changes no byte.

Runs ``fusedist demo`` (synth, tile pairs + grid, cache, embed, distill + export, embed with the
student, fuse on classification, survival and regression, predict on held-out slides) and a
``fuse`` of ``tile_classification`` on the synthetic multi-encoder cohort, each in a fresh
process, then writes ``sha256  path`` for every file under the run folder::

    python scripts/output_digests.py OUT > before.txt     # on the old code
    python scripts/output_digests.py OUT2 > after.txt     # on the new code
    python scripts/output_digests.py --compare before.txt after.txt

Files that differ between two runs of the *same* code (wall times, run ids, MLflow stores,
logs) are listed in ``VOLATILE`` and left out; everything else must match byte for byte.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Paths (globs, relative to the run folder) whose bytes legitimately change run to run.
VOLATILE = [
    "*/mlruns/*", "demo/runs/*/checkpoint_*", "*.log", "*/logs/*", "demo/report.md",
]

_COHORT = """
import sys
try:
    from fusedist.synth.cohort import synthetic_cohort
except ImportError:
    from fusedist.fusion.synthetic import synthetic_cohort
synthetic_cohort(sys.argv[1], num_slides=30, tiles=(12, 24), seed=3)
"""

_FUSE_SETS = [
    "folds=3", "inner_folds=2", "experts.epochs=3", "experts.hidden=64",
    "logitprod.max_epochs=40", "logitprod.patience=10",
    "meta.strategies=[token_attention]", "meta.epochs=2", "meta.embed_dim=64",
    "meta.token_dim=32", "tiles_per_slide=8", "heatmaps=1", "mlflow.enabled=false",
    "final.enabled=false", "task=tile_classification", "target=label",
]


def _run(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    subprocess.run([sys.executable, *args], check=True, env=env, cwd=REPO, stdout=sys.stderr)


def produce(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _run("-m", "fusedist.cli", "demo", "--workdir", str(out / "demo"), "-q",
         "-s", "distill_steps=20", "-s", "fuse_tasks=[classification,survival,regression]",
         "-s", "heldout_slides=2")
    _run("-c", _COHORT, str(out / "cohort"))
    sets = [a for s in _FUSE_SETS for a in ("-s", s)]
    _run("-m", "fusedist.cli", "fuse", "--bags", str(out / "cohort" / "bags"),
         "--labels", str(out / "cohort" / "labels.csv"), "--output", str(out / "fuse_tile"),
         "-q", *sets)


def digests(out: Path) -> list[str]:
    lines = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if not p.is_file() or any(fnmatch.fnmatch(rel, g) for g in VOLATILE):
            continue
        lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {rel}")
    return lines


def compare(a: str, b: str) -> int:
    def load(f):
        return dict(reversed(line.split("  ", 1)) for line in Path(f).read_text().splitlines())
    da, db = load(a), load(b)
    bad = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    for k in bad:
        print(f"{'changed' if k in da and k in db else 'only in ' + (a if k in da else b)}: {k}")
    print(f"{len(da)} files, {len(bad)} differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--hash-only", action="store_true", help="hash an existing run folder")
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare)
    out = Path(a.out).resolve()
    if not a.hash_only:
        produce(out)
    print("\n".join(digests(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
