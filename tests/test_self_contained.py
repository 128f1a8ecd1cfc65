"""The repository stands alone: a user's clone has no shared/ folder beside it.

The test clones this checkout (``git clone`` of the committed tree, so nothing untracked helps)
into a folder with no ``shared/`` anywhere above it, and runs what a user would run there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SCANNED = ("fusedist", "tests", "docs", "README.md", "Makefile", ".ci")
_SHARED_REF = re.compile(r"\.\./shared|/shared/(fixtures|kuberay-crds|methods\.md|design\.md)")


def _clone(tmp_path: Path) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.fail("this test needs git and a git checkout of fusedist (it clones HEAD)")
    dest = tmp_path / "alone" / "fusedist"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dest)], check=True,
                   capture_output=True)
    return dest


def _files(root: Path):
    for top in _SCANNED:
        p = root / top
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from (f for f in p.rglob("*") if f.is_file() and f.suffix != ".pyc"
                        and "fixtures" not in f.parts and "crds" not in f.parts)


def test_nothing_refers_to_shared():
    hits = []
    for f in _files(REPO):
        if f.name == Path(__file__).name:
            continue
        try:
            text = f.read_text(errors="ignore")
        except OSError:
            continue
        hits += [f"{f.relative_to(REPO)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                 if _SHARED_REF.search(line)]
    assert hits == [], f"files that point outside the repository: {hits}"


def test_fresh_clone_without_shared_validates_k8s_and_has_fixtures(tmp_path):
    clone = _clone(tmp_path)
    assert not (clone.parent / "shared").exists()
    # The fixtures and the methods spec travel with the repository.
    fixtures = clone / "tests" / "fixtures" / "openslide"
    assert {"small.svs", "boxes.tiff", "boxes_0.dcm", "unopenable.tiff"} <= {
        p.name for p in fixtures.iterdir()}
    assert (clone / "docs" / "methods.md").stat().st_size > 1000
    # The validator finds its CRDs as package data of the clone's own fusedist.
    env = {k: v for k, v in os.environ.items() if k != "FUSEDIST_KUBERAY_CRDS"}
    env["PYTHONPATH"] = str(clone)
    r = subprocess.run([sys.executable, "-m", "fusedist.launch", "launch", "validate", "k8s/"],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    probe = subprocess.run([sys.executable, "-c", "import fusedist.launch.validate as v; "
                            "print(v.default_crd_dir())"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().startswith(str(clone)), probe.stdout + probe.stderr
