"""Stages on a real multi-node Ray cluster shaped like KubeRay's (tests/cluster.py).

Declared GPUs do not exist here: ``FUSEDIST_DEVICE_OVERRIDE=cpu`` (set by the fixture) makes
actors compute on CPU while their Ray resource requests stay those of a GPU cluster.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.s3util import moto_server, s3_bucket  # noqa: F401
from tests.slides import known_slides

pytestmark = pytest.mark.cluster


def test_fixture_is_a_cpu0_head_with_gpu_workers_that_come_and_go(multinode):
    import ray

    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert nodes[multinode.head_node_id]["Resources"].get("CPU", 0) == 0
    assert len(multinode.gpu_node_ids()) == 2 and multinode.head_node_id not in \
        multinode.gpu_node_ids()

    @ray.remote(num_gpus=1, num_cpus=1)
    def where():
        import os
        return ray.get_runtime_context().get_node_id(), os.environ.get("FUSEDIST_DEVICE_OVERRIDE")

    node, override = ray.get(where.remote())
    assert node in multinode.gpu_node_ids() and override == "cpu"
    lost = multinode.gpu_workers[0]
    multinode.remove(lost)
    assert lost.node_id not in multinode.gpu_node_ids() and len(multinode.gpu_node_ids()) == 1
    added = multinode.add_gpu_worker()
    assert added.node_id in multinode.gpu_node_ids() and len(multinode.gpu_node_ids()) == 2


def test_fuse_refuses_features_packed_on_a_node_local_disk_of_a_multinode_cluster(
        multinode, tmp_path):
    """A cohort packed on disk (past bags_in_memory_gb) must reach every fold task: with a
    node-local `output` on 3 nodes, fuse stops before any fold with the fix; on S3 it goes."""
    from types import SimpleNamespace

    from fusedist.config import ConfigError
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.run import _check_packed_reachable
    from fusedist.fusion.store import Rows

    packed = SimpleNamespace(columns=lambda: [Rows(str(tmp_path / "e.float32"), [0, 1], 4, [0.0])])
    in_memory = SimpleNamespace(columns=lambda: [[]])
    local = FuseConfig(bags="b", labels="l", output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="3 nodes.*Put output on S3.*bags_in_memory_gb"):
        _check_packed_reachable(packed, local)
    _check_packed_reachable(in_memory, local)
    _check_packed_reachable(packed, FuseConfig(bags="b", labels="l", output="s3://b/fuse"))


def _tiles(slides, out, **kw):
    from fusedist.tiling import run_tile
    from tests.test_tiling import tile_cfg

    # executor=ray: these tests are about Ray tasks on worker nodes (auto would pick Ray here
    # too, since the fixture runs Ray in this process; pinned so a change there can't hide).
    return run_tile(tile_cfg(slides, out, dataset="grid", mode="grid", samples_per_shard=6,
                             executor="ray", **kw), progress=False)


def _cache(tiles, out, **kw):
    from fusedist.features import run_cache
    from tests.test_cache import cache_cfg

    sets = {"engine.device": "cuda", "engine.min_actors": 1, "engine.max_actors": 2,
            "engine.batch_size": 4, **kw}
    return run_cache(cache_cfg(tiles, out, teachers=["test-vit"], **sets), progress=False)


def _remove_when(multinode, state: Path, n: int, record: dict) -> threading.Thread:
    """Remove a worker node once ``n`` done-entries exist under ``state`` (mid-run). Ray starts
    nodes only from the main thread: the test adds the replacement pod after the run."""
    def go():
        deadline = time.monotonic() + 240
        while len(list(state.glob("*.json"))) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        record["done_at_removal"] = len(list(state.glob("*.json")))
        multinode.remove(multinode.gpu_workers[0])
        record["removed"] = True

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def _same_dataset(a: Path, b: Path) -> None:
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
    names = sorted(p.name for p in a.glob("*.tar"))
    assert names == sorted(p.name for p in b.glob("*.tar")) and names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_tile_and_cache_on_gpu_nodes_survive_losing_a_node(multinode, tmp_path):
    """Tile and cache on head(CPU 0) + 2 GPU nodes: encoder actors run only on GPU nodes, the
    driver receives only small rows and done-entries, and losing a worker node mid-run still
    gives byte-identical shards and manifests. (GPUs are declared, compute is on CPU:
    FUSEDIST_DEVICE_OVERRIDE=cpu.)"""
    slides = known_slides(tmp_path / "slides", 2)
    clean = _tiles(slides, tmp_path / "tiles-clean")
    n_shards = clean.manifest["totals"]["shards"]
    assert n_shards >= 6
    # Tile with a node lost after the first shards are written.
    rec: dict = {}
    t = _remove_when(multinode, tmp_path / "tiles" / "grid" / "_state" / "shards", 1, rec)
    lossy = _tiles(slides, tmp_path / "tiles")
    t.join(120)
    assert rec["removed"] and 1 <= rec["done_at_removal"] < n_shards and not lossy.failed
    _same_dataset(tmp_path / "tiles-clean" / "grid", tmp_path / "tiles" / "grid")
    multinode.add_gpu_worker()  # KubeRay starts the lost pod again

    tiles = tmp_path / "tiles" / "grid"
    # One actor, no interruption: the reference features.
    ref = _cache(tiles, tmp_path / "f-clean", **{"engine.max_actors": 1})
    assert not ref.failed and ref.written == n_shards
    gpu_nodes = multinode.gpu_node_ids()
    assert ref.engine.actor_nodes and ref.engine.actor_nodes <= gpu_nodes
    assert multinode.head_node_id not in ref.engine.actor_nodes
    # Driver intake per shard: a few small rows and one done-entry, far below the features.
    feature_bytes = ref.manifests["test-vit"]["totals"]["bytes"]
    assert ref.engine.bytes_received / n_shards < 4096 < feature_bytes / n_shards

    rec = {}
    t = _remove_when(multinode, tmp_path / "f" / "test-vit" / "grid" / "_state" / "shards", 1,
                     rec)
    lossy = _cache(tiles, tmp_path / "f")
    t.join(120)
    assert rec["removed"] and 1 <= rec["done_at_removal"] < n_shards
    assert not lossy.failed and lossy.written == n_shards
    assert lossy.engine.actor_nodes and multinode.head_node_id not in lossy.engine.actor_nodes
    _same_dataset(tmp_path / "f-clean" / "test-vit" / "grid", tmp_path / "f" / "test-vit" / "grid")


def test_tile_and_cache_on_a_gpu_group_that_autoscales_from_zero(autoscaling, tmp_path, caplog):
    """The shipped GPU RayJobs' shape: head CPU 0, GPU workers minReplicas 0. Ray's autoscaler
    (fake multi-node provider: real raylets on this machine) brings up GPU nodes for the tile
    tasks and the encoder actors, every actor runs on one of them, and the group goes back to
    zero when idle. (GPUs are declared, compute is on CPU: FUSEDIST_DEVICE_OVERRIDE=cpu.)"""
    import logging

    from tests.cluster import FAKE_NODE_PREFIX

    assert autoscaling.gpu_node_ids() == set()  # nothing up but the head
    join = {"ray.address": autoscaling.address}
    slides = known_slides(tmp_path / "slides", 1)
    tiled = _tiles(slides, tmp_path / "tiles", **join)
    n_shards = tiled.manifest["totals"]["shards"]
    assert not tiled.failed and n_shards >= 2
    with caplog.at_level(logging.INFO, logger="fusedist"):
        res = _cache(tmp_path / "tiles" / "grid", tmp_path / "f", **join)
    assert not res.failed and res.written == n_shards
    launched = res.engine.actor_nodes
    assert launched and all(n.startswith(FAKE_NODE_PREFIX) for n in launched), launched
    assert autoscaling.head_node_id not in launched
    # The device came from the config, not from the (GPU-less) cluster at start, and the log
    # says so.
    assert "engine.device=cuda (from the config)" in caplog.text
    deadline = time.monotonic() + 90
    while autoscaling.gpu_node_ids() and time.monotonic() < deadline:
        time.sleep(1)
    assert autoscaling.gpu_node_ids() == set(), "the idle GPU group did not scale back to 0"


def test_multinode_distill_refuses_local_storage_and_survives_losing_rank_1s_node(
        multinode, tmp_path, s3_bucket, moto_server):
    """distill on head(CPU 0) + 2 worker nodes, one Ray Train worker each.

    A node-local ``storage_path`` is refused before any work, with the fix. On S3 (moto),
    rank 1 stops mid-epoch and its node is removed, as a lost pod would be: Ray Train restarts
    the group from the last committed checkpoint once the replacement node joins (each worker
    reserves a whole node, so the group cannot restart on the survivor alone), the run
    finishes, and the committed sample log shows every sample exactly once per epoch."""
    import os
    import subprocess
    import sys

    import yaml

    from fusedist import storage
    from fusedist.config import ConfigError
    from fusedist.distill.checkpoint import find_checkpoint, read_sample_log, read_state
    from fusedist.distill.config import DistillConfig
    from fusedist.distill.data import steps_per_epoch
    from fusedist.distill.train import run_distill
    from fusedist.tiling import run_tile
    from tests.test_tiling import tile_cfg

    tiles = run_tile(tile_cfg(known_slides(tmp_path / "slides", 1), tmp_path / "tiles",
                              dataset="pairs", mode="pairs", min_tissue=0.1,
                              samples_per_shard=4), progress=False)
    _cache(tmp_path / "tiles" / "pairs", tmp_path / "f")
    # micro_batch 2: the student's heads batch-normalise, which needs more than one sample.
    spe = steps_per_epoch(tiles.manifest["totals"]["tiles"], 2, 1, 2, 1)
    assert spe >= 2, spe
    base = dict(tiles=str(tmp_path / "tiles" / "pairs"), teacher="test-vit",
                features=str(tmp_path / "f" / "test-vit" / "pairs"),
                student={"name": "test-vit"}, batch={"micro_batch": 2, "loader_workers": 1},
                scaling={"num_workers": 2, "cpus_per_worker": 2}, mlflow={"enabled": False})
    runs = tmp_path / "runs"
    local = DistillConfig(**base, storage_path=str(runs), run_name="r",
                          ray={"address": multinode.address})
    with pytest.raises(ConfigError, match=r"local folder .* this Ray cluster has 3 nodes.*"
                                          r"storage_path=s3://.*storage_shared=true"):
        run_distill(local, progress=False)
    assert not runs.exists()

    # Epoch-end checkpoints only: rank 1 stops in the middle of epoch 2, which restarts at spe.
    at = spe + spe // 2
    cfg = DistillConfig(**base, storage_path=f"{s3_bucket}/runs", run_name="lost", epochs=2,
                        checkpoint={"every_steps": 1000}, max_failures=1,
                        fault={"at_step": at, "rank": 1, "mode": "hang"},
                        storage={"endpoint_url": moto_server}, export={"enabled": False})
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "fusedist.cli", "distill", "-c",
                             str(tmp_path / "distill.yaml"), "-q"],
                            env=dict(os.environ, RAY_ADDRESS=multinode.address),
                            cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        marker = f"{s3_bucket}/runs/lost/_fault/step-{at}-rank-1"
        deadline = time.monotonic() + 300
        while not storage.exists(marker) and proc.poll() is None:
            assert time.monotonic() < deadline, "rank 1 never reached the fault step"
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        lost = storage.read_text(marker).strip()
        (node,) = [w for w in multinode.gpu_workers if w.node_id == lost]
        multinode.remove(node)  # the pod of rank 1 is gone, with its raylet and processes
        replacement = multinode.add_gpu_worker()  # KubeRay starts a new pod for the group
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert lost not in multinode.alive_node_ids() and replacement.node_id != lost
    state = read_state(find_checkpoint(f"{s3_bucket}/runs/lost"))
    assert state.step == 2 * spe and state.resumes == [spe]
    log = read_sample_log(f"{s3_bucket}/runs/lost")
    assert sorted(log) == [0, 1]
    for epoch, got in log.items():  # committed work only: the lost half-epoch is not in it
        assert len(got) == len(set(got)) == 4 * spe, (epoch, sorted(got))


def test_tile_across_nodes_from_s3_matches_a_single_node_run(ray_cluster, s3_bucket,
                                                             moto_server, tmp_path, request):
    """Slides and shards on S3 (moto), nothing shared between the nodes but the bucket: the
    plan and write tasks of head(CPU 0) + 2 workers give the shards of a one-node run."""
    from fusedist.tiling import run_tile
    from tests.test_tiling import tile_cfg
    from tests.test_tiling_s3 import s3_cfg, same_shards, upload

    src = known_slides(tmp_path / "slides", 2, width=3072, height=2560)
    # The reference: one machine, local files, local processes (no Ray).
    ref = run_tile(tile_cfg(src, tmp_path / "local", mode="grid", samples_per_shard=8,
                            executor="local"), progress=False)
    upload(src, s3_bucket, moto_server)
    multinode = request.getfixturevalue("multinode")  # replaces the session's Ray
    assert len(multinode.alive_node_ids()) == 3
    # storage.cache_dir is scratch each task fills for itself; the bucket is the only store
    # the tasks share.
    res = run_tile(s3_cfg(s3_bucket, moto_server, tmp_path / "node-cache", executor="ray"),
                   progress=False)
    assert not res.failed
    same_shards(res.manifest, ref.manifest)


def test_fusedist_launch_submits_a_stage_to_the_multinode_head(tmp_path):
    """`fusedist launch tile` from outside the cluster, through the Jobs API of a CPU-0 head
    with 2 worker nodes: the job's driver runs on the head, its tasks on the workers, and the
    stage completes."""
    import os
    import subprocess
    import sys

    from tests.cluster import _free_port, start_multinode, stop_multinode
    from tests.test_launch import REPO, VENV_BIN
    from tests.slides import make_known_slide

    slide, _ = make_known_slide(tmp_path / "s.tiff", width=2048, height=2048, mpp=0.5)
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        # The job's entrypoint (`fusedist ...`) runs under the head's environment.
        mp.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("FUSEDIST_DEVICE_OVERRIDE", "cpu")
        mp.delenv("RAY_AUTH_MODE", raising=False)  # a plain head, whatever ran before
        mn = start_multinode(workers=2, cpus=1, dashboard_port=port)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        r = subprocess.run([sys.executable, "-m", "fusedist.launch", "launch", "tile", "-c",
                            "configs/tile/grid.yaml", "--set", f"input={slide}", "--set",
                            f"output={tmp_path / 'tiles'}", "--set", "dataset=g", "--address",
                            f"http://127.0.0.1:{port}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1/1 slides ok" in r.stdout and "SUCCEEDED (exit status 0)" in r.stderr
        assert (tmp_path / "tiles" / "g" / "manifest.json").is_file()
        # The job's driver found the cluster (RAY_ADDRESS, set by Ray for an entrypoint) and
        # ran the tasks on it, not in local processes on the CPU-0 head.
        assert "joining Ray cluster" in r.stdout and "without Ray" not in r.stdout, r.stdout
    finally:
        stop_multinode(mn)
