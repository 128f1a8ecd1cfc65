"""Storage and tracking failures end with exit 3 and one line naming the path or endpoint and
the fix (traceback only with --debug), and leave nothing partial behind.

Real file systems: a read-only tmpfs and a 2 MB tmpfs, mounted for the test (root is
available in CI; elsewhere these tests skip, saying so), and a real permission error (the
test process writing as user ``nobody``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.slides import known_slides
from tests.test_tiling import tile_cfg

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedist.cli", *args], capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), cwd=REPO, timeout=300)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro) -> a fresh tmpfs folder; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted = []

    def mount(size: str = "2m", ro: bool = False) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=True)
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    return known_slides(tmp_path_factory.mktemp("fail") / "slides", 2, width=4096, height=3584)


def test_read_only_output_exits_3_with_one_line(ray_cluster, slides, tmpfs):
    out = tmpfs(ro=True)
    args = ["tile", "-i", str(slides), "-o", str(out), "--dataset", "d", "-q"]
    r = cli(args, {"RAY_ADDRESS": ray_cluster})
    assert r.returncode == 3, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert str(out / "d") in err[-1] and "read-only" in err[-1] and "EROFS" in err[-1]
    r = cli([*args, "--debug"], {"RAY_ADDRESS": ray_cluster})
    assert r.returncode == 3 and "Traceback" in r.stderr and "read-only" in r.stderr


def test_full_disk_in_ray_workers_exits_3_and_writes_nothing_partial(ray_cluster, slides,
                                                                      tmpfs):
    out = tmpfs(size="2m")
    r = cli(["tile", "-i", str(slides), "-o", str(out), "--dataset", "d", "-q", "--set",
             "samples_per_shard=4", "--set", "jpeg_quality=100", "--set", "min_tissue=0.05"],
            {"RAY_ADDRESS": ray_cluster})
    assert r.returncode == 3, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    assert str(out / "d") in line and "no space left" in line and "ENOSPC" in line, r.stderr
    d = out / "d"
    assert not (d / "manifest.json").exists()
    assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")]
    for p in d.glob("*.tar"):  # whatever was published is whole (two writers may both fail)
        with tarfile.open(p) as tf:
            assert all(tf.extractfile(m).read() is not None for m in tf.getmembers())
    for e in (d / "_state" / "shards").glob("*.json"):
        assert (d / json.loads(e.read_text())["name"]).is_file()


def test_unreachable_mlflow_exits_3_naming_the_endpoint(ray_cluster, tmp_path):
    from fusedist.tiling import run_tile

    src = known_slides(tmp_path / "slides", 1, width=1024, height=1024)
    run_tile(tile_cfg(src, tmp_path / "tiles", mode="grid", min_tissue=0.1), progress=False)
    r = cli(["cache", "--tiles", str(tmp_path / "tiles" / "default"), "-t", "test-vit", "-o",
             str(tmp_path / "f"), "-q", "--set", "mlflow.tracking_uri=http://127.0.0.1:9"],
            {"RAY_ADDRESS": ray_cluster})
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "http://127.0.0.1:9" in r.stderr
    assert "unreachable" in r.stderr
    assert not (tmp_path / "f" / "test-vit" / "default" / "manifest.json").exists()


def test_permission_denied_names_the_path(tmp_path):
    """A real EACCES: writing into a root-owned folder as user nobody (effective uid)."""
    from fusedist import storage

    if os.geteuid() != 0:
        pytest.skip("switching to user nobody needs root (CI runs as root)")
    target = tmp_path / "locked" / "x" / "m.json"
    target.parent.parent.mkdir(mode=0o755)
    os.seteuid(65534)
    try:
        with pytest.raises(storage.StorageError) as e:
            storage.write_json(str(target), {})
    finally:
        os.seteuid(0)
    msg = str(e.value)
    assert str(target) in msg and "permission denied" in msg and "EACCES" in msg
