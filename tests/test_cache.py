"""`fusedist cache` and `fusedist embed` on a real local Ray (Ray Data, CPU actors)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusedist.config import ConfigError, load_config
from fusedist.features import CacheConfig, EmbedConfig, run_cache, run_embed
from fusedist.models import build_encoder, save_weights
from fusedist.tiling import run_tile
from tests import trident
from tests.slides import known_slides
from tests.test_tiling import read_shard, tile_cfg

REPO = Path(__file__).resolve().parents[1]
TEACHERS = ["test-vit", "test-convnext"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, ray_cluster):
    """Pairs and grid tile datasets of two small 20x slides with known tissue."""
    d = tmp_path_factory.mktemp("cache")
    src = known_slides(d / "slides", 2)
    run_tile(tile_cfg(src, d / "tiles", dataset="pairs", mode="pairs", min_tissue=0.3,
                      samples_per_shard=2), progress=False)
    run_tile(tile_cfg(src, d / "tiles", dataset="grid", mode="grid", samples_per_shard=25),
             progress=False)
    return d


def shard_names(dataset: Path) -> list[str]:
    return [s["name"] for s in json.loads((dataset / "manifest.json").read_text())["shards"]]


def cache_cfg(tiles, output, teachers=TEACHERS, **kw) -> CacheConfig:
    sets = [f"{k}={v}" for k, v in {"engine.batch_size": 32, "mlflow.enabled": False,
                                     **kw}.items()]
    return load_config(CacheConfig, None, sets, tiles=str(tiles), output=str(output),
                       teachers=list(teachers))


def npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def uint8_chw(jpeg: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["pairs", "grid"])
def test_cached_features_equal_teacher_forward(datasets, tmp_path, mode):
    tiles = datasets / "tiles" / mode
    res = run_cache(cache_cfg(tiles, tmp_path / "feats"), progress=False)
    assert not res.failed and set(res.manifests) == set(TEACHERS)
    tile_manifest = json.loads((tiles / "manifest.json").read_text())
    encoders = {n: build_encoder(n) for n in TEACHERS}
    for name, enc in encoders.items():
        m = res.manifests[name]
        folder = tmp_path / "feats" / name / mode
        assert json.loads((folder / "manifest.json").read_text()) == m
        assert m["weights_digest"] == enc.weights_digest and m["dim"] == enc.spec.dim
        assert m["dtype"] == "float16" and m["random_weights"] is True
        # Mirrors the tile shards one to one: same names, counts, source hashes.
        assert [(s["name"], s["samples"], s["source_sha256"]) for s in m["shards"]] == \
            [(s["name"], s["samples"], s["sha256"]) for s in tile_manifest["shards"]]
        for shard in m["shards"][:3]:
            feats = read_shard(folder / shard["name"])
            tiles_ = read_shard(tiles / shard["name"])
            assert list(feats) == list(tiles_)  # same keys, same order
            for key, members in feats.items():
                got = npy(members[f"{name}.npy"])
                assert got.dtype == np.float16
                if mode == "pairs":
                    hi = uint8_chw(tiles_[key]["hi.jpg"])
                    # Row-major 4x4 grid of 224 px sub-tiles.
                    subs = torch.stack([hi[:, r * 224:(r + 1) * 224, c * 224:(c + 1) * 224]
                                        for r in range(4) for c in range(4)])
                    assert got.shape == (16, enc.spec.dim)
                else:
                    subs = uint8_chw(tiles_[key]["img.jpg"])[None]
                    assert got.shape == (enc.spec.dim,)
                want = enc.embed(subs).float().numpy().reshape(got.shape)
                np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
                # Sensitivity: a transposed grid (column-major) would not match.
                if mode == "pairs":
                    assert not np.allclose(got.astype(np.float32), want.reshape(4, 4, -1)
                                           .transpose(1, 0, 2).reshape(16, -1), atol=2e-3)


def features_of(name: str, payload, results) -> dict:
    """A finish function for engine tests: hands the features back (small test shards, as
    lists: a done-entry is JSON) and the process that finished the group."""
    return {**{n: {k: v.tolist() for k, v in r.features.items()} for n, r in results.items()},
            "finish_pid": os.getpid()}


def run_engine_collect(spec, shards, pool=None, finish_pids: set | None = None
                       ) -> tuple[dict, object]:
    """Run the engine with one group per shard; ({shard: features or error}, stats). The
    processes that ran the finish calls are added to ``finish_pids``."""
    from fusedist.features.engine.core import Group, PoolSpec
    from fusedist.features.engine.raydata import run_engine

    out: dict = {}

    def on_group(g, e, err):
        out[g] = err or {k: np.asarray(v, np.float32) for k, v in e[g].items()}
        if e and finish_pids is not None:
            finish_pids.add(e["finish_pid"])

    stats = run_engine(spec, shards, {n: Group((n,)) for n, _ in shards}, features_of,
                       on_group, pool or PoolSpec(1, 1, 0.0, 1.0, 0.25))
    return out, stats


def _exits(pid: int, within_s: float) -> bool:
    """True once process ``pid`` is gone (or a zombie) within ``within_s`` (ray.kill is async)."""
    import psutil

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_decoding_runs_in_cpu_tasks_apart_from_the_encoder_actor(datasets, tmp_path):
    """The encoders must never wait on JPEG decode: Ray Data must not fuse the two maps."""
    from fusedist.features.engine.core import EngineSpec

    tiles = datasets / "tiles" / "grid"
    m = json.loads((tiles / "manifest.json").read_text())
    spec = EngineSpec(tiles_url=str(tiles), mode="grid", image_key="img.jpg", tile_px=224,
                      chunk=16, encoders=(("test-vit", None),), device="cpu",
                      staging=str(tmp_path / "parts"))
    finish_pids: set[int] = set()
    out, stats = run_engine_collect(spec, [(s["name"], s["samples"]) for s in m["shards"][:3]],
                                    finish_pids=finish_pids)
    assert len(out) == 3 and all(isinstance(v, dict) for v in out.values())
    assert stats.decode_pids and stats.actor_pids and not stats.decode_pids & stats.actor_pids
    # The 3 groups were finished by one long-lived finisher (no worker start per group), not
    # by the driver or an encoder actor, and it is gone once the engine returns.
    assert len(finish_pids) == 1 and not finish_pids & (stats.actor_pids | {os.getpid()})
    assert _exits(next(iter(finish_pids)), within_s=20)
    # Every chunk's work is timed in the actor: the steady-state rate counts only what ran
    # after the first chunk, so it excludes the start-up that first_row_s measures.
    total = sum(s["samples"] for s in m["shards"][:3])
    assert sum(n for _, _, n in stats.chunk_times) == total and len(stats.chunk_times) >= 3
    assert all(0 < end - start for start, end, _ in stats.chunk_times)
    assert stats.first_row_s > 0 and stats.steady_rate > 0
    assert not (tmp_path / "parts").exists()  # finish calls and the end clear the staging


def test_local_engine_decodes_in_workers_and_matches_the_ray_engine(datasets, tmp_path):
    """``engine.executor: local``: DataLoader workers decode, the driver's own encoders compute
    in this process, a writer thread finishes the groups; the features are exactly the Ray
    engine's."""
    from fusedist.features.engine.core import EngineSpec, Group
    from fusedist.features.engine.local import run_engine_local

    tiles = datasets / "tiles" / "grid"
    m = json.loads((tiles / "manifest.json").read_text())
    shards = [(s["name"], s["samples"]) for s in m["shards"][:3]]
    spec = EngineSpec(tiles_url=str(tiles), mode="grid", image_key="img.jpg", tile_px=224,
                      chunk=16, encoders=(("test-vit", None),), device="cpu",
                      staging=str(tmp_path / "parts"), threads=torch.get_num_threads())
    ray_out, _ = run_engine_collect(spec, shards)
    out: dict = {}
    finish_pids: set[int] = set()

    def on_group(g, e, err):
        out[g] = err or {k: np.asarray(v, np.float32) for k, v in e[g].items()}
        finish_pids.add(e["finish_pid"])

    stats = run_engine_local(spec, shards, {n: Group((n,)) for n, _ in shards}, features_of,
                             on_group, [build_encoder("test-vit")], decode_workers=2)
    assert set(out) == {n for n, _ in shards}
    for name in out:
        np.testing.assert_array_equal(out[name]["test-vit"], ray_out[name]["test-vit"])
    # Decoding ran in two worker processes; the model and the finish calls in this one.
    assert len(stats.decode_pids) == 2 and os.getpid() not in stats.decode_pids
    assert stats.actor_pids == finish_pids == {os.getpid()}
    assert sum(n for _, _, n in stats.chunk_times) == sum(n for _, n in shards)
    assert stats.groups == 3 and stats.first_row_s > 0
    assert not (tmp_path / "parts").exists()


def test_reader_zips_tiles_with_cached_features(datasets, tmp_path):
    from fusedist.data import ShardReader

    tiles = datasets / "tiles" / "pairs"
    run_cache(cache_cfg(tiles, tmp_path / "feats", teachers=["test-vit"]), progress=False)
    reader = ShardReader([str(tiles), str(tmp_path / "feats" / "test-vit" / "pairs")],
                         shuffle=False)
    samples = list(reader)
    n = json.loads((tiles / "manifest.json").read_text())["totals"]["tiles"]
    assert len(samples) == n and all({"lo.jpg", "test-vit.npy"} <= set(s) for s in samples)


def test_rerun_skips_and_other_weights_need_overwrite(datasets, tmp_path):
    tiles = datasets / "tiles" / "grid"
    first = run_cache(cache_cfg(tiles, tmp_path / "f", teachers=["test-vit"]), progress=False)
    assert first.written == len(first.manifests["test-vit"]["shards"]) > 1
    again = run_cache(cache_cfg(tiles, tmp_path / "f", teachers=["test-vit"]), progress=False)
    assert again.written == 0 and again.manifests == first.manifests
    # Same teacher name, different weights: refused, then replaced with overwrite.
    enc = build_encoder("test-vit")
    with torch.no_grad():
        next(enc.parameters()).add_(0.5)
    w = save_weights(enc, tmp_path / "other.safetensors") or tmp_path / "other.safetensors"
    other = [{"name": "test-vit", "weights": str(w)}]
    with pytest.raises(ConfigError, match="other weights.*overwrite=true"):
        run_cache(cache_cfg(tiles, tmp_path / "f", teachers=other), progress=False)
    res = run_cache(cache_cfg(tiles, tmp_path / "f", teachers=other, overwrite=True),
                    progress=False)
    assert res.written == again.manifests["test-vit"]["totals"]["shards"]
    assert res.manifests["test-vit"]["weights_digest"] != first.manifests["test-vit"][
        "weights_digest"]


def test_wrong_architecture_weights_fail_before_any_work(datasets, tmp_path):
    w = tmp_path / "vit.safetensors"
    save_weights(build_encoder("test-vit"), w)
    cfg = cache_cfg(datasets / "tiles" / "grid", tmp_path / "f",
                    teachers=[{"name": "test-convnext", "weights": str(w)}])
    with pytest.raises(ConfigError) as e:
        run_cache(cfg, progress=False)
    assert str(w) in str(e.value) and "test-convnext" in str(e.value)
    assert not (tmp_path / "f").exists()


def corrupt_copy(src: Path, dst: Path, shard: str, member: str) -> str:
    """Copy a tile dataset, replacing one image in one shard with garbage; returns its key."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / shard
    samples = read_shard(path)
    key = list(samples)[1]
    samples[key][member] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    from fusedist.shards import write_shard

    info = write_shard(str(path), ((k, v) for k, v in samples.items()))
    m = json.loads((dst / "manifest.json").read_text())
    for s in m["shards"]:
        if s["name"] == shard:
            s["sha256"], s["bytes"] = info["sha256"], info["bytes"]
    (dst / "manifest.json").write_text(json.dumps(m))
    return key


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_corrupt_jpeg_fails_its_shard_only(datasets, tmp_path, executor):
    tiles = tmp_path / "tiles"
    bad = shard_names(datasets / "tiles" / "grid")[1]
    key = corrupt_copy(datasets / "tiles" / "grid", tiles, bad, "img.jpg")
    res = run_cache(cache_cfg(tiles, tmp_path / "f", teachers=["test-vit"],
                              **{"engine.executor": executor}), progress=False)
    assert [f["name"] for f in res.failed] == [bad]
    reason = res.failed[0]["reason"]
    assert bad in reason and key in reason and "decode" in reason
    m = res.manifests["test-vit"]
    total = len(json.loads((tiles / "manifest.json").read_text())["shards"])
    assert len(m["shards"]) == total - 1 and m["failed"][0]["name"] == bad
    assert not (tmp_path / "f" / "test-vit" / "grid" / bad).exists()


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_changed_tile_bytes_fail_their_shard_naming_both_hashes(datasets, tmp_path, executor):
    """Bytes flipped inside a JPEG member (the tar intact, the JPEG still decodes): cache
    hashes each shard as it streams and fails that one; the others proceed, and the feature
    manifest records the hash actually read."""
    import hashlib
    import shutil

    from tests.test_reader import flip_member_byte

    tiles = tmp_path / "tiles"
    shutil.copytree(datasets / "tiles" / "grid", tiles)
    names = shard_names(tiles)
    bad = tiles / names[-1]
    listed = json.loads((tiles / "manifest.json").read_text())["shards"][-1]["sha256"]
    flip_member_byte(bad, ".img.jpg")
    got = hashlib.sha256(bad.read_bytes()).hexdigest()
    res = run_cache(cache_cfg(tiles, tmp_path / "f", teachers=["test-vit"],
                              **{"engine.executor": executor}), progress=False)
    assert [f["name"] for f in res.failed] == [names[-1]]
    reason = res.failed[0]["reason"]
    assert str(bad) in reason and got in reason and listed in reason
    m = res.manifests["test-vit"]
    assert m["failed"][0]["reason"] == reason and [s["name"] for s in m["shards"]] == names[:-1]
    for s in m["shards"]:
        assert s["source_sha256"] == hashlib.sha256((tiles / s["name"]).read_bytes()).hexdigest()
    assert not (tmp_path / "f" / "test-vit" / "grid" / names[-1]).exists()


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_nan_features_are_an_error_not_written(datasets, tmp_path, executor):
    enc = build_encoder("test-vit")
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(float("nan"))
    w = tmp_path / "nan.safetensors"
    save_weights(enc, w)
    res = run_cache(cache_cfg(datasets / "tiles" / "grid", tmp_path / "f",
                              teachers=[{"name": "test-vit", "weights": str(w)}],
                              **{"engine.executor": executor}), progress=False)
    assert res.failed and all("NaN/inf" in f["reason"] and "test-vit" in f["reason"]
                              for f in res.failed)
    grid = datasets / "tiles" / "grid"
    first_key = read_shard(grid / shard_names(grid)[0])
    assert any(next(iter(first_key)) in f["reason"] for f in res.failed)
    assert res.manifests["test-vit"]["shards"] == []
    assert not list((tmp_path / "f" / "test-vit" / "grid").glob("*.tar"))


def test_killed_cache_run_resumes_to_identical_output(datasets, tmp_path, ray_cluster):
    """The clean run is on Ray; the killed and the resumed one have no Ray address, so they
    run the local engine (``engine.executor: auto``): the same bytes either way."""
    tiles = datasets / "tiles" / "pairs"
    args = ["cache", "--tiles", str(tiles), "-t", "test-vit", "-t", "test-convnext", "-q",
            "--set", "engine.batch_size=16", "--set", "mlflow.enabled=false"]
    clean = subprocess.run([sys.executable, "-m", "fusedist.cli", *args, "-o",
                            str(tmp_path / "clean")], env=dict(os.environ, RAY_ADDRESS=ray_cluster),
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fusedist.cli", *args, "-o", str(out)],
                            env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "test-convnext" / "pairs" / "_state" / "shards"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(state.glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_total = len(json.loads((tiles / "manifest.json").read_text())["shards"])
    done = len(list(state.glob("*.json")))
    assert 2 <= done < n_total and not (out / "test-vit" / "pairs" / "manifest.json").exists()
    verbose = [a for a in args if a != "-q"]  # its log says which engine ran
    again = subprocess.run([sys.executable, "-m", "fusedist.cli", *verbose, "-o", str(out)],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "engine: local, without Ray (engine.executor=auto" in again.stderr
    assert "started a local Ray" not in again.stderr
    for t in ("test-vit", "test-convnext"):
        a, b = tmp_path / "clean" / t / "pairs", out / t / "pairs"
        assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
        names = sorted(p.name for p in a.glob("*.tar"))
        assert len(names) == n_total
        for n in names:
            assert (a / n).read_bytes() == (b / n).read_bytes(), (t, n)


def test_embed_bags_from_grid_tiles_and_from_slides(datasets, tmp_path):
    from fusedist.formats.bags import read_bag

    tiles = datasets / "tiles" / "grid"
    cfg = load_config(EmbedConfig, None, ["engine.batch_size=32", "mlflow.enabled=false"],
                      tiles=str(tiles), output=str(tmp_path / "bags"), encoders=TEACHERS)
    res = run_embed(cfg, progress=False)
    tm = json.loads((tiles / "manifest.json").read_text())
    assert res.written == 2 * len(tm["slides"]) and not res.failed
    enc = build_encoder("test-convnext")
    for slide in tm["slides"]:
        keys = [k for n in slide["shards"] for k in read_shard(tiles / n)]
        bag = read_bag(str(tmp_path / "bags" / "test-convnext" / f"{slide['slide_id']}.h5"))
        assert bag.features.shape == (len(keys), enc.spec.dim)
        assert bag.coords.tolist() == [[int(v) for v in k.split("/")[1].split("_")]
                                       for k in keys]
        assert bag.encoder == "test-convnext" and bag.mpp == 0.5 and bag.tile_size == 224
        # TRIDENT's own readers accept the bag (its attribute names on coords and features).
        tri = trident.read_patch_features(
            tmp_path / "bags" / "test-convnext" / f"{slide['slide_id']}.h5")
        assert tri["encoder"] == "test-convnext" and tri["attrs"]["target_magnification"] == 20
        assert tri["attrs"]["patch_size_level0"] == round(224 * 0.5 / slide["mpp0"])
        assert tri["attrs"]["level0_magnification"] in (20, 40)
        first = read_shard(tiles / slide["shards"][0])[keys[0]]["img.jpg"]
        np.testing.assert_allclose(bag.features[0], enc.embed(uint8_chw(first)[None])[0].numpy(),
                                   rtol=1e-4, atol=1e-4)
    assert run_embed(cfg, progress=False).written == 0  # resumable per slide: all current
    # The re-run's check reads done-entries, not every HDF5 file: a bag cut short is stale (its
    # size is not the entry's), a bag whose entry is gone is asked itself (still current).
    from fusedist.features.embed import bag_state, bags_to_do

    out, slides = str(tmp_path / "bags"), [s for s in tm["slides"] if s["shards"]]
    sha = {s["name"]: s["sha256"] for s in tm["shards"]}
    sids = [s["slide_id"] for s in slides]
    weights = {n: bag_state(out, n).read(sids[0])["weights_digest"] for n in res.bags}
    assert bags_to_do(out, weights, slides, sha) == ({}, len(weights) * len(slides))
    cut = tmp_path / "bags" / "test-convnext" / f"{sids[0]}.h5"
    cut.write_bytes(cut.read_bytes()[:-100])
    bag_state(out, "test-convnext").delete(sids[1])
    todo, skipped = bags_to_do(out, weights, slides, sha)
    assert todo == {sids[0]: ["test-convnext"]} and skipped == len(weights) * len(slides) - 1
    other = dict(weights, **{"test-convnext": "other-weights"})
    assert sorted(bags_to_do(out, other, slides, sha)[0]) == sorted(sids)  # entry or file
    # From slides: tiled first at the encoder's resolution, then embedded.
    cfg2 = load_config(EmbedConfig, None, ["engine.batch_size=32", "mlflow.enabled=false"],
                       slides=str(datasets / "slides"), output=str(tmp_path / "b2"),
                       encoders=["test-vit"])
    res2 = run_embed(cfg2, progress=False)
    assert res2.written == 2 and (tmp_path / "b2" / "test-vit" / "s0.h5").is_file()


def test_embed_refuses_tiles_at_the_wrong_resolution(datasets, tmp_path, ray_cluster):
    from fusedist.tiling import TileConfig

    run_tile(load_config(TileConfig, None, ["mode=grid", "tile_mpp=2.0"],
                         input=str(datasets / "slides"), output=str(tmp_path / "t")),
             progress=False)
    cfg = load_config(EmbedConfig, None, ["mlflow.enabled=false"],
                      tiles=str(tmp_path / "t" / "default"), output=str(tmp_path / "b"),
                      encoders=["test-vit"])
    with pytest.raises(ConfigError, match=r"0\.5 µm/px.*tile_mpp=0\.5"):
        run_embed(cfg, progress=False)


def test_embed_checks_an_export_cards_dim_against_its_weights(tmp_path):
    from fusedist.distill.export import export_student
    from fusedist.features.config import EncoderRef
    from fusedist.models.refs import load_encoders
    from fusedist.models.student import XmagStudent

    out = tmp_path / "export"
    export_student(XmagStudent.from_registry("test-vit", teacher_dim=64), str(out),
                   {"name": "dimcheck-student"})
    assert load_encoders([EncoderRef(name=str(out))])[0].spec.dim == 64  # a true card loads
    card = json.loads((out / "card.json").read_text())
    (out / "card.json").write_text(json.dumps({**card, "dim": 65}))
    with pytest.raises(ConfigError, match=r"card.json says dim=65 but its weights give 64-d"):
        load_encoders([EncoderRef(name=str(out))])


def test_device_comes_from_the_config_not_from_a_startup_snapshot(caplog):
    """An autoscaling cluster has no GPU until something asks: ``cuda`` requests GPU actors
    anyway; ``auto`` on such a cluster runs on CPU but says why and how to ask for GPUs."""
    from fusedist.features.config import EngineConfig
    from fusedist.features.engine.core import choose_device

    assert choose_device("cuda", "joined cluster", 0) == "cuda"
    with pytest.raises(ConfigError, match="local Ray has no GPUs.*engine.device=cpu"):
        choose_device("cuda", "local ray", 0)
    with pytest.raises(ConfigError, match="machine has no CUDA GPU.*engine.device=cpu"):
        choose_device("cuda", "local", 0)
    with caplog.at_level("INFO", logger="fusedist.features"):
        assert choose_device("auto", "joined cluster", 0) == "cpu"
        assert choose_device("auto", "joined cluster", 8) == "cuda"
        assert choose_device("auto", "local", 0) == "cpu"
    assert "set engine.device=cuda" in caplog.text and "has 8 GPU(s)" in caplog.text
    assert choose_device("cuda", "actor") == "cuda"  # an actor computes where it was placed
    with pytest.raises(ValueError, match="max_actors.*below.*min_actors"):
        EngineConfig(min_actors=3, max_actors=2)


def test_decode_tasks_can_never_keep_a_cpu_actor_from_its_node(ray_cluster):
    """On CPU, Ray leases decode tasks before the GCS places an actor: decode tasks that land
    first must leave every node room for an actor (a node's CPUs minus decode_cpus). At most
    one decode task per actor runs at once and together they hold ``decode_cpus``."""
    import ray

    from fusedist.config import RayConfig
    from fusedist.features.config import EngineConfig
    from fusedist.features.engine.raydata import engine_pool

    node = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    for actors in (1, 2, 3):
        cfg = EngineConfig(device="cpu", min_actors=actors)
        _, pool, threads = engine_pool(cfg, RayConfig())
        assert pool.decode_tasks == actors
        assert pool.decode_tasks * pool.decode_cpus <= cfg.decode_cpus
        assert pool.cpus_per_actor + pool.decode_tasks * pool.decode_cpus <= node
        assert threads == max(1, round(node - cfg.decode_cpus))
    # GPUs need decode throughput: there Ray Data decides how many tasks run.
    _, gpu_pool, _ = engine_pool(EngineConfig(device="cuda"), RayConfig(address="auto"))
    assert gpu_pool.decode_tasks is None and gpu_pool.decode_cpus == 0.25
