"""Digests of every output file of a small end-to-end run, to prove a refactor changes no byte.

Runs ``fusedist demo`` (synth, tile pairs + grid, cache, embed, distill + export, embed with the
student, fuse on classification, survival and regression, predict on held-out slides) and a
``fuse`` of ``tile_classification`` on the synthetic multi-encoder cohort, each in a fresh
process, then writes ``sha256  path`` for every file under the run folder::

    python scripts/output_digests.py OUT > before.txt     # on the old code
    python scripts/output_digests.py OUT2 > after.txt     # on the new code
    python scripts/output_digests.py --compare before.txt after.txt

Text files are hashed with the run folder's path and wall-clock stamps replaced by
placeholders, bags by their datasets and attributes (an attribute names the encoder's folder);
MLflow stores, checkpoints and logs are left out (``VOLATILE``). Run both in the same folder:
what still differs between two runs of the same code there is wall time (``train_s``, the
results tables' seconds), which ``--compare`` reports apart when given ``--noise FILE`` (the
``--compare`` output of two runs of the old code).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import re
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


_STAMP = re.compile(rb"\d{4}-\d\d-\d\d[T_ ]\d\d[:-]\d\d[:-]\d\d(\.\d+)?(\+00:00|Z)?")


def _normalized(data: bytes, out: Path) -> bytes:
    """Bytes with the run folder's own path and wall-clock stamps taken out: two runs in two
    folders at two times must hash alike; nothing else is touched."""
    return _STAMP.sub(b"<time>", data.replace(str(out).encode(), b"<run>"))


def _h5_digest(path: Path, out: Path) -> str:
    # A bag's attributes name its encoder's folder (``encoder_ref``); hash every dataset's
    # bytes and every attribute, the path normalized, instead of the file's bytes.
    import h5py
    import numpy as np

    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for k in sorted(f.attrs):
            h.update(k.encode() + _normalized(repr(f.attrs[k]).encode(), out))
        for k in sorted(f):
            h.update(k.encode() + np.ascontiguousarray(f[k][()]).tobytes())
    return h.hexdigest()


def digests(out: Path) -> list[str]:
    lines = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if not p.is_file() or any(fnmatch.fnmatch(rel, g) for g in VOLATILE):
            continue
        if p.suffix == ".h5":
            d = _h5_digest(p, out)
        elif p.suffix in (".json", ".csv", ".md", ".txt", ".jsonl", ".yaml"):
            d = hashlib.sha256(_normalized(p.read_bytes(), out)).hexdigest()
        else:
            d = hashlib.sha256(p.read_bytes()).hexdigest()
        lines.append(f"{d}  {rel}")
    return lines


def compare(a: str, b: str, noise: str | None = None) -> int:
    def load(f):
        return dict(reversed(line.split("  ", 1)) for line in Path(f).read_text().splitlines())
    da, db = load(a), load(b)
    bad = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    if noise:
        timing = set(Path(noise).read_text().split())
        print(f"{len(set(bad) & timing)} differ as two runs of the old code do (wall times)")
        bad = [k for k in bad if k not in timing]
    for k in bad:
        print(f"{'changed' if k in da and k in db else 'only in ' + (a if k in da else b)}: {k}")
    print(f"{len(da)} files, {len(bad)} differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--noise", help="files that differ between two runs of the same code")
    ap.add_argument("--hash-only", action="store_true", help="hash an existing run folder")
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare, noise=a.noise)
    out = Path(a.out).resolve()
    if not a.hash_only:
        produce(out)
    print("\n".join(digests(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
