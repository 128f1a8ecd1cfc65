"""`fusedist tile` on local disk: geometry, tissue, real formats, failures, resume."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from fusedist.config import ConfigError, load_config
from fusedist.tiling import TileConfig, resolve_mpp, run_tile
from fusedist.tiling.slide import SlideError
from tests.slides import known_slides, make_known_slide, write_pyramid

REPO = Path(__file__).resolve().parents[1]


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def all_samples(dataset: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    out: dict[str, dict[str, bytes]] = {}
    for s in manifest["shards"]:
        out.update(read_shard(dataset / s["name"]))
    return out


def decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32)


def tile_cfg(input, output, **kw) -> TileConfig:
    sets = [f"{k}={v}" for k, v in kw.items()]
    return load_config(TileConfig, None, sets, input=str(input), output=str(output))


@pytest.fixture(scope="module")
def known_slide(tmp_path_factory):
    """A 20x slide (0.5 µm/px) with a known tissue mask: pairs tiles are 896 level-0 px."""
    d = tmp_path_factory.mktemp("known")
    path, mask = make_known_slide(d / "known.tiff", width=6144, height=5120, mpp=0.5)
    return path, mask


def test_pairs_geometry_and_tissue(ray_cluster, known_slide, tmp_path):
    path, mask = known_slide
    res = run_tile(tile_cfg(path, tmp_path, dataset="p", samples_per_shard=4), progress=False)
    m = res.manifest
    assert m["totals"]["slides_ok"] == 1 and m["totals"]["tiles"] > 4
    samples = all_samples(tmp_path / "p")
    assert len(samples) == m["totals"]["tiles"]
    slide = openslide.OpenSlide(str(path))
    for key, s in samples.items():
        assert sorted(s) == ["hi.jpg", "lo.jpg", "meta.json"]
        meta = json.loads(s["meta.json"])
        x, y = meta["x"], meta["y"]
        assert key == f"known/{x}_{y}" and meta["tile_mpp"] == 0.5 and meta["size"] == 896
        hi, lo = decode(s["hi.jpg"]), decode(s["lo.jpg"])
        assert hi.shape == (896, 896, 3) and lo.shape == (224, 224, 3)
        # lo.jpg is the Lanczos downsample of the same region (up to JPEG noise)...
        ref = np.asarray(Image.fromarray(hi.astype(np.uint8)).resize(
            (224, 224), Image.Resampling.LANCZOS), np.float32)
        assert np.abs(ref - lo).mean() < 5.0
        # ...and not of a region shifted by 2 px (8 px at 20x): the check can tell.
        assert np.abs(np.roll(ref, 2, axis=1) - lo).mean() > 2 * np.abs(ref - lo).mean()
        # hi.jpg is the slide's own pixels at that place (mpp 0.5 = level 0 here).
        region = np.asarray(slide.read_region((x, y), 0, (896, 896)).convert("RGB"), np.float32)
        assert np.abs(region - hi).mean() < 4.0
        # Every kept tile is mostly on the known tissue.
        assert mask[y:y + 896, x:x + 896].mean() >= 0.4
    # Every candidate position that is (almost) all tissue was kept.
    kept = {(json.loads(s["meta.json"])["x"], json.loads(s["meta.json"])["y"])
            for s in samples.values()}
    for y in range(0, 5120 - 895, 896):
        for x in range(0, 6144 - 895, 896):
            if mask[y:y + 896, x:x + 896].mean() > 0.9:
                assert (x, y) in kept
    assert (tmp_path / "p" / "thumbnails" / "known.png").is_file()
    shard_names = [s["name"] for s in m["shards"]]
    # Named by slide and part, never by position among slides (docs/formats.md).
    assert shard_names == [f"known-{i:06d}.tar" for i in range(len(shard_names))]


def test_grid_reads_from_the_level_above_target(ray_cluster, tmp_path):
    path, mask = make_known_slide(tmp_path / "fine.tiff", width=3072, height=2560, mpp=0.25)
    # 224 px at 2.0 µm/px = 1792 level-0 px; levels have downsamples 1, 2, 4 -> read level 2.
    res = run_tile(tile_cfg(path, tmp_path / "out", mode="grid", tile_mpp=2.0, min_tissue=0.3),
                   progress=False)
    rec = res.manifest["slides"][0]
    assert rec["status"] == "ok" and rec["read_level"] == 2 and rec["mpp0"] == 0.25
    samples = all_samples(tmp_path / "out" / "default")
    slide = openslide.OpenSlide(str(path))
    for s in samples.values():
        assert sorted(s) == ["img.jpg", "meta.json"]
        meta = json.loads(s["meta.json"])
        img = decode(s["img.jpg"])
        assert img.shape == (224, 224, 3)
        full = slide.read_region((meta["x"], meta["y"]), 0, (1792, 1792)).convert("RGB")
        ref = np.asarray(full.resize((224, 224), Image.Resampling.LANCZOS), np.float32)
        assert np.abs(ref - img).mean() < 6.0


def test_resolve_mpp_order_and_errors():
    assert resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, "s").value == 0.25
    m = resolve_mpp({"openslide.objective-power": "20"}, "s")
    assert (m.value, m.source) == (0.5, "objective-power")
    m = resolve_mpp({}, "s", override=0.3)
    assert (m.value, m.source) == (0.3, "override")
    m = resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, "s", 0.5, force=True)
    assert m.value == 0.5
    with pytest.raises(SlideError) as e:
        resolve_mpp({}, "slides/x.tiff")
    assert e.value.code == "no_mpp" and "slides/x.tiff" in str(e.value)
    assert "--mpp-override" in str(e.value)


def test_missing_mpp_fails_then_override_tiles(ray_cluster, tmp_path):
    rgb = np.full((2048, 2048, 3), 245, np.uint8)
    rgb[200:1800, 200:1800] = (220, 140, 180)
    path = write_pyramid(tmp_path / "nompp.tiff", rgb, mpp=None)
    res = run_tile(tile_cfg(path, tmp_path / "a", mode="grid"), progress=False)
    rec = res.manifest["slides"][0]
    assert rec["status"] == "failed" and rec["code"] == "no_mpp"
    assert "nompp.tiff" in rec["reason"] and "--mpp-override" in rec["reason"]
    res = run_tile(tile_cfg(path, tmp_path / "b", mode="grid", mpp_override=0.5), progress=False)
    rec = res.manifest["slides"][0]
    assert rec["status"] == "ok" and rec["mpp_source"] == "override" and rec["tiles"] > 0


def test_real_format_fixtures_give_clear_outcomes(ray_cluster, fixtures_dir, tmp_path):
    res = run_tile(tile_cfg(fixtures_dir, tmp_path), progress=False)
    by_id = {s["slide_id"]: s for s in res.manifest["slides"]}
    # Real Aperio SVS, generic TIFF and DICOM open and resolve mpp via the same code path.
    assert by_id["small"]["vendor"] == "aperio" and by_id["small"]["mpp0"] == pytest.approx(0.499)
    assert by_id["boxes"]["vendor"] == "generic-tiff"
    assert by_id["boxes"]["mpp0"] == pytest.approx(352.78, rel=1e-3)
    assert by_id["boxes_0"]["vendor"] == "dicom"
    assert by_id["boxes_0"]["mpp0"] == pytest.approx(0.499)
    expected = {"small": "too_small", "boxes": "too_coarse", "boxes_0": "too_small",
                "boxes_1": "duplicate", "unopenable": "unopenable", "unreadable": "unreadable"}
    assert {k: v["code"] for k, v in by_id.items()} == expected
    for sid, rec in by_id.items():
        assert rec["url"].endswith(Path(rec["url"]).name) and Path(rec["url"]).name in rec["reason"]
    assert "smaller than one tile" in by_id["small"]["reason"]
    assert "coarser than the requested" in by_id["boxes"]["reason"]
    assert len(res.failed) == 5 and res.manifest["totals"]["slides_skipped"] == 1


def test_failures_do_not_stop_good_slides(ray_cluster, fixtures_dir, known_slide, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("unopenable.tiff", "unreadable.svs"):
        (src / name).write_bytes((fixtures_dir / name).read_bytes())
    (src / "good.tiff").write_bytes(known_slide[0].read_bytes())
    res = run_tile(tile_cfg(src, tmp_path / "out", mode="grid"), progress=False)
    st = {s["slide_id"]: s["status"] for s in res.manifest["slides"]}
    assert st == {"good": "ok", "unopenable": "failed", "unreadable": "failed"}
    assert res.manifest["totals"]["tiles"] > 0


def run_cli(args, env_extra=None, **kw):
    """The CLI in a subprocess; ``env_extra`` values of None remove that variable."""
    env = dict(os.environ, **(env_extra or {}))
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "fusedist.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300, **kw)


def test_cli_exit_status_and_summary(ray_cluster, fixtures_dir, tmp_path):
    r = run_cli(["tile", "-c", "configs/tile/pairs.yaml", "-i", str(fixtures_dir), "-o",
                 str(tmp_path), "-q"], {"RAY_ADDRESS": ray_cluster})
    assert r.returncode == 1, r.stderr
    assert "0/6 slides ok, 5 failed" in r.stdout and "FAILED unreadable [unreadable]" in r.stdout
    r = run_cli(["tile", "-c", "configs/tile/pairs.yaml", "-i", str(fixtures_dir), "--set",
                 "min_tisue=0.2"])
    assert r.returncode == 2 and "unknown key 'min_tisue'" in r.stderr and "min_tissue" in r.stderr


def test_rerun_skips_finished_work_and_refuses_other_config(ray_cluster, known_slide, tmp_path):
    cfg = tile_cfg(known_slide[0], tmp_path, mode="grid", samples_per_shard=16)
    first = run_tile(cfg, progress=False)
    assert first.written_shards == len(first.manifest["shards"]) > 1
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "default").glob("*.tar")}
    again = run_tile(cfg, progress=False)
    assert again.written_shards == 0 and again.manifest == first.manifest
    assert mtimes == {p.name: p.stat().st_mtime_ns
                      for p in (tmp_path / "default").glob("*.tar")}
    # Every shard has its index beside it; one whose index is lost is rewritten, alone.
    idx = sorted((tmp_path / "default").glob("*.tar.idx.json"))
    assert [p.name[: -len(".idx.json")] for p in idx] == sorted(mtimes)
    lost = idx[1].read_bytes()
    idx[1].unlink()
    healed = run_tile(cfg, progress=False)
    assert healed.written_shards == 1 and idx[1].read_bytes() == lost
    assert healed.manifest == first.manifest
    with pytest.raises(ConfigError, match="different tiling config.*overwrite=true"):
        run_tile(tile_cfg(known_slide[0], tmp_path, mode="grid", min_tissue=0.9), progress=False)
    other = run_tile(tile_cfg(known_slide[0], tmp_path, mode="grid", min_tissue=0.9,
                              overwrite=True), progress=False)
    assert other.manifest["totals"]["tiles"] < first.manifest["totals"]["tiles"]
    names = {s["name"] for s in other.manifest["shards"]}
    assert {p.name for p in (tmp_path / "default").glob("*.tar")} == names


def test_killed_run_resumes_to_identical_output(ray_cluster, tmp_path):
    """The clean run is on Ray; the killed and the resumed run use no Ray (``executor: auto``
    with no Ray address: local processes), so this also checks both give the same bytes."""
    src = known_slides(tmp_path / "slides", 3, width=4096, height=3584)
    args = ["tile", "-i", str(src), "--dataset", "d", "--set", "samples_per_shard=2"]
    clean = run_cli([*args, "-q", "-o", str(tmp_path / "clean")], {"RAY_ADDRESS": ray_cluster})
    assert clean.returncode == 0, clean.stderr
    env = {"RAY_ADDRESS": None}

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fusedist.cli", *args, "-q", "-o", str(out)],
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                            cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "d" / "_state" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(state.glob("*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill: no cleanup handlers run
    proc.wait()
    done_at_kill = len(list(state.glob("*.json")))
    assert not (out / "d" / "manifest.json").exists(), "the run finished before the kill"
    n_total = len(json.loads((tmp_path / "clean" / "d" / "manifest.json").read_text())["shards"])
    assert 3 <= done_at_kill < n_total

    resumed = run_cli([*args, "-o", str(out)], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "local processes without Ray (executor=auto" in resumed.stderr
    assert "started a local Ray" not in resumed.stderr
    # The re-run writes only what was missing (tasks in flight at the kill may have finished).
    wrote = int(re.search(r"wrote (\d+) shards", resumed.stdout).group(1))
    assert 1 <= wrote <= n_total - done_at_kill
    a, b = tmp_path / "clean" / "d", out / "d"
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
    names = sorted(p.name for p in a.glob("*.tar"))
    assert names == sorted(p.name for p in b.glob("*.tar")) and len(names) == n_total
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert not list(b.rglob(".*.tmp"))


def test_shard_names_survive_failed_and_added_slides(ray_cluster, tmp_path):
    """A shard is named by its slide and part: a slide that fails on a re-run, or slides added
    that sort earlier, leave every other shard untouched (same names, bytes, mtimes)."""
    src = known_slides(tmp_path / "slides", 3, width=2048, height=1792)
    cfg = tile_cfg(src, tmp_path / "out", mode="grid", samples_per_shard=8)
    out = tmp_path / "out" / "default"

    def state() -> dict[str, tuple[bytes, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}

    first = run_tile(cfg, progress=False)
    before = state()
    assert {s["slide_id"] for s in first.manifest["shards"]} == {"s0", "s1", "s2"}
    assert any(n.endswith("-000001.tar") for n in before)  # slides span several parts
    # s1 becomes unreadable between runs (a truncated upload): its shards go, nobody else's.
    data = (src / "s1.tiff").read_bytes()
    (src / "s1.tiff").write_bytes(data[: len(data) // 2])
    second = run_tile(cfg, progress=False)
    assert [s["slide_id"] for s in second.failed] == ["s1"] and second.written_shards == 0
    kept = {n: v for n, v in before.items() if not n.startswith("s1-")}
    assert state() == kept
    assert [s["name"] for s in second.manifest["shards"]] == sorted(kept)
    # A slide that sorts before all others is added: only its own shards are written.
    (src / "a0.tiff").write_bytes((src / "s0.tiff").read_bytes())
    third = run_tile(cfg, progress=False)
    now = state()
    assert {n: v for n, v in now.items() if not n.startswith("a0-")} == kept
    assert third.written_shards == sum(n.startswith("a0-") for n in now) > 0
    # The manifest carries the slide -> shards mapping readers use.
    rows = {r["slide_id"]: r["shards"] for r in third.manifest["slides"]}
    assert rows["s1"] == [] and rows["a0"] == sorted(n for n in now if n.startswith("a0-"))


def test_missing_input_says_it_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"input .*/nowhere does not exist; check the --input"):
        run_tile(tile_cfg(tmp_path / "nowhere", tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no slides found"):
        run_tile(tile_cfg(tmp_path / "empty", tmp_path / "out"), progress=False)
