"""`fusedist distill`: XMAG on a real Ray Train + DeepSpeed run (2 CPU workers, gloo).

One small pairs dataset (3 synthetic slides, 24 pairs, 9 shards) with features cached by ONE
test teacher (test-vit, 64-d) serves the module; the student is test-vit from the registry.
Runs: a trained run (+ a re-run that resumes it), a worker killed mid-epoch, S3 storage with a
real MLflow server. The first DeepSpeed start JIT-builds a small C++ op (~40 s, cached).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusedist.config import ConfigError, load_config
from fusedist.distill.checkpoint import (COMMITTED, SampleLog, find_checkpoint,
                                         load_ema_student, read_sample_log, read_state)
from fusedist.distill.config import DistillConfig, ExportConfig
from fusedist.distill.data import steps_per_epoch
from fusedist.distill.train import ds_config, param_groups, run_distill, run_export
from tests.s3util import moto_server, s3_bucket  # noqa: F401
from tests.slides import known_slides
from tests.test_tiling import tile_cfg

TEACHER = "test-vit"


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_cluster):
    """Slides, their pairs tiles and test-vit features: 24 pairs in 9 shards."""
    from fusedist.features import CacheConfig, run_cache
    from fusedist.tiling import run_tile

    d = tmp_path_factory.mktemp("distill")
    src = known_slides(d / "slides", 3)
    run_tile(tile_cfg(src, d / "tiles", dataset="pairs", mode="pairs", min_tissue=0.1,
                      samples_per_shard=3), progress=False)
    run_cache(load_config(CacheConfig, None, ["engine.batch_size=48", "mlflow.enabled=false"],
                          tiles=str(d / "tiles" / "pairs"), output=str(d / "feats"),
                          teachers=[TEACHER]), progress=False)
    keys = [k for s in json.loads((d / "tiles" / "pairs" / "manifest.json").read_text())["shards"]
            for k in _shard_keys(d / "tiles" / "pairs" / s["name"])]
    assert len(keys) == 24 and len(set(keys)) == 24
    return {"root": d, "tiles": d / "tiles" / "pairs", "features": d / "feats" / TEACHER / "pairs",
            "keys": keys}


def _shard_keys(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def distill_cfg(data, storage_path, run_name: str, *sets: str) -> DistillConfig:
    base = ["student.name=test-vit", f"teacher={TEACHER}", "scaling.num_workers=2",
            "batch.loader_workers=1", "batch.shuffle_buffer=16", "batch.micro_batch=4",
            "optim.lr=2e-3", "optim.warmup_epochs=0.3", "checkpoint.every_steps=2",
            "checkpoint.num_to_keep=2", "max_failures=0"]
    return load_config(DistillConfig, None, [*base, *sets], tiles=str(data["tiles"]),
                       features=str(data["features"]), storage_path=str(storage_path),
                       run_name=run_name)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 2-worker run: 4 epochs x 3 steps (global batch 8), local storage, SQLite MLflow."""
    root = tmp_path_factory.mktemp("trained")
    cfg = distill_cfg(data, root / "runs", "xmag", "epochs=4",
                      f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db")
    return cfg, run_distill(cfg, progress=False)


# ----------------------------------------------------------------------------- unit pieces

def test_config_scales_and_validates():
    cfg = load_config(DistillConfig, Path(__file__).parents[1] / "configs/distill/xmag_paper.yaml")
    assert cfg.global_batch == 1152 and cfg.scaling.num_workers == 24 and cfg.zero_stage == 2
    ds = ds_config(cfg, cuda=True)
    assert ds["train_batch_size"] == 1152 and ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 1.0 and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert not ds_config(cfg, cuda=False)["bf16"]["enabled"]  # CPU workers: fp32
    with pytest.raises(ConfigError, match="fault.rank"):
        load_config(DistillConfig, None, ["fault.at_step=3", "fault.rank=1"], tiles="t",
                    features="f")
    # 3.49M pairs / 1152 per step = 3029.5, less each loader slot's tail that does not fill a
    # micro-batch (24 x 8 slots of 18,177 pairs -> 378 micro-batches each).
    assert steps_per_epoch(3_490_000, 24, 8, 48, 1) == 8 * 378 == 3024


def test_weight_decay_skips_biases_norms_and_tokens():
    from fusedist.models.student import XmagStudent

    s = XmagStudent.from_registry("test-vit", teacher_dim=32)
    decay, free = param_groups(s, 0.05)
    names = {id(p): n for n, p in s.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    free_names = {names[id(p)] for p in free["params"]}
    assert "backbone.cls_token" in free_names and "backbone.pos_embed" in free_names
    assert any(n.endswith("bn.weight") for n in free_names) and free["weight_decay"] == 0.0
    assert len(decay["params"]) + len(free["params"]) == len(list(s.parameters()))


def test_sample_log_counts_only_committed_work(tmp_path):
    run = str(tmp_path)
    log0, log1 = SampleLog(run, 0), SampleLog(run, 1)
    for step, keys in ((2, ["a", "b"]), (4, ["c", "d"])):
        log0.add(0, step, keys[:1])
        log1.add(0, step, keys[1:])
        log0.flush(step)
        log1.flush(step)
        log0.commit(step, "ckpt")
    log1.commit(4, "ckpt")  # only rank 0 commits
    assert sorted(read_sample_log(run)[0]) == ["a", "b", "c", "d"]
    log0.rollback(after=2)  # resumed from step 2: step 4 was rolled back
    assert sorted(read_sample_log(run)[0]) == ["a", "b"]
    assert not (tmp_path / "sample_log" / "step-000000004" / COMMITTED).exists()


# ----------------------------------------------------------------------------- real runs

def _metric(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_worker_run_learns_and_checkpoints_restore_exactly(trained, data, capfd):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from mlflow import MlflowClient

    cfg, res = trained
    assert res.steps == 12 and res.epochs == 4
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    loss = _metric(client, res.mlflow_run_id, "loss")
    assert len(loss) == 12  # one point per optimiser step, from rank 0
    assert np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.2, loss
    assert len(_metric(client, res.mlflow_run_id, "img_per_s")) == 12
    # Old checkpoints pruned; the newest holds every rank's ZeRO partition.
    run_dir = Path(res.run_url)
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2
    ckpt = Path(res.checkpoint)
    parts = sorted(p.name for p in (ckpt / "ds").iterdir())
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(parts)
    state = read_state(str(ckpt))
    assert state.step == 12 and state.epoch == 4 and state.cursor["epoch"] == 4
    # The fp32 master weights gathered from both ranks' partitions load into a fresh student
    # and equal the module DeepSpeed saved.
    master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    module = torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    from fusedist.models.student import XmagStudent

    fresh = XmagStudent.from_registry("test-vit", teacher_dim=64)
    fresh.load_state_dict(master, strict=True)  # weights and BatchNorm statistics
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, module[name]), name
    assert not torch.equal(fresh.state_dict()["global_head.fc1.weight"],
                           XmagStudent.from_registry("test-vit", 64).state_dict()[
                               "global_head.fc1.weight"])
    # Each epoch trained every sample exactly once.
    log = read_sample_log(res.run_url)
    assert sorted(log) == [0, 1, 2, 3]
    assert all(sorted(keys) == sorted(data["keys"]) for keys in log.values())

    # Running the same command again, with more epochs, resumes from the last checkpoint: a
    # fresh engine on fresh workers restores it (the restore checks the weights digest).
    cfg5 = cfg.model_copy(update={"epochs": 5, "export": cfg.export.model_copy(
        update={"enabled": False})})
    capfd.readouterr()
    again = run_distill(cfg5, progress=True)
    state = read_state(again.checkpoint)
    assert again.steps == 15 and state.resumes == [12]
    # The driver's bar: step of total, loss, img/s (ETA is tqdm's); the summary's warning.
    bar = capfd.readouterr().err
    assert "distill" in bar and "15/15" in bar and "loss " in bar and "img/s" in bar, bar[-2000:]
    assert "RANDOM WEIGHTS: test-vit" in again.summary()
    log = read_sample_log(res.run_url)
    assert sorted(log) == [0, 1, 2, 3, 4]
    assert all(sorted(keys) == sorted(data["keys"]) for keys in log.values())


def test_worker_killed_mid_epoch_resumes_without_repeating_or_skipping(data, tmp_path):
    # micro_batch 2: 6 steps per epoch. Checkpoints at steps 4, 6, 8, 12; rank 1 exits before
    # step 11 (3 steps into epoch 1; steps 9-10 are lost), the group restarts from step 8.
    cfg = distill_cfg(data, tmp_path / "runs", "fault", "epochs=2", "batch.micro_batch=2",
                      "checkpoint.every_steps=4", "fault.at_step=10", "fault.rank=1",
                      "max_failures=1", "mlflow.enabled=false", "export.enabled=false")
    res = run_distill(cfg, progress=False)
    assert (tmp_path / "runs" / "fault" / "_fault" / "step-10-rank-1").is_file()
    state = read_state(res.checkpoint)
    assert res.steps == 12 and state.resumes == [8]
    log = read_sample_log(res.run_url)
    assert sorted(log) == [0, 1]
    for epoch, keys in log.items():
        assert len(keys) == len(set(keys)) == 24, (epoch, sorted(keys))
        assert set(keys) == set(data["keys"])


def test_s3_checkpoints_and_metrics_on_a_real_mlflow_server(data, tmp_path, s3_bucket,
                                                           moto_server):
    import boto3
    from mlflow import MlflowClient

    from fusedist.tracking import RANDOM_WEIGHTS_TAG, serve_local

    with serve_local(tmp_path / "mlflow.db", tmp_path / "artifacts",
                     log_path=tmp_path / "server.log") as server:
        cfg = distill_cfg(data, f"{s3_bucket}/runs", "s3run", "epochs=1",
                          f"storage.endpoint_url={moto_server}",
                          f"mlflow.tracking_uri={server.url}", "export.alias=champion")
        res = run_distill(cfg, progress=False)
        assert res.checkpoint.startswith(f"{s3_bucket}/runs/s3run/checkpoint_")
        bucket = s3_bucket.removeprefix("s3://")
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=moto_server)
                .list_objects_v2(Bucket=bucket, Prefix="runs/s3run/")["Contents"]]
        ckpt_key = res.checkpoint.removeprefix(f"{s3_bucket}/")
        for name in ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                     "ds/mp_rank_00_model_states.pt", "ema.pt", "fusedist_state.json"):
            assert f"{ckpt_key}/{name}" in keys, name
        assert "runs/s3run/export/card.json" in keys
        assert read_sample_log(res.run_url)[0]  # the sample log lives on S3 too

        client = MlflowClient(tracking_uri=server.url)
        run = client.get_run(res.mlflow_run_id)
        assert run.data.params["student.name"] == "test-vit"
        assert run.data.tags[RANDOM_WEIGHTS_TAG] == "true"
        assert len(_metric(client, run.info.run_id, "loss")) == 3
        assert {"loss", "global_cos", "local_cos", "lr", "img_per_s"} <= set(run.data.metrics)
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config" in arts
        mv = client.get_model_version_by_alias("xmag-student", "champion")
        assert mv.run_id == run.info.run_id
        # An MLflow (pyfunc) model of the run, its files proxied by the server.
        logged = client.get_logged_model(mv.source.removeprefix("models:/"))
        assert logged.source_run_id == run.info.run_id
        assert {a.path for a in client.list_logged_model_artifacts(logged.model_id)} >= {
            "MLmodel", "artifacts"}


def test_exported_student_embeds_a_slide_at_5x(trained, data, tmp_path):
    from fusedist.bags import read_bag
    from fusedist.distill.export import register_exported
    from fusedist.features import EmbedConfig, run_embed
    from fusedist.models import build_encoder
    from fusedist.tiling import run_tile

    cfg, res = trained
    # The end-of-run export is there; `fusedist export` re-exports the run's newest checkpoint.
    assert (Path(res.export_dir) / "model.safetensors").is_file()
    ckpt = find_checkpoint(res.run_url)
    folder, name, version = run_export(load_config(
        ExportConfig, None, ["mlflow.enabled=false"], checkpoint=res.run_url,
        output=str(tmp_path / "export")))
    card = json.loads((Path(folder) / "card.json").read_text())
    assert version is None and card["step"] == read_state(ckpt).step
    assert card["mpp"] == 2.0 and card["teacher"] == TEACHER and card["output"] == "cls"
    student, _ = load_ema_student(ckpt)

    run_tile(tile_cfg(data["root"] / "slides", tmp_path / "tiles", dataset="g5x", mode="grid",
                      tile_mpp=2.0, tile_size=224, min_tissue=0.3), progress=False)
    ecfg = load_config(EmbedConfig, None, ["mlflow.enabled=false", "engine.batch_size=16"],
                       tiles=str(tmp_path / "tiles" / "g5x"), output=str(tmp_path / "bags"),
                       encoders=[folder])
    out = run_embed(ecfg, progress=False)
    assert out.written == 3 and not out.failed
    bag = read_bag(str(tmp_path / "bags" / name / "s0.h5"))
    assert bag.features.shape[1] == 64 and bag.mpp == 2.0 and bag.tile_size == 224
    # The bag holds the EMA student's CLS embedding of the tile.
    enc = build_encoder(register_exported(folder))
    from tests.test_tiling import read_shard

    shard = json.loads((tmp_path / "tiles" / "g5x" / "manifest.json").read_text())["slides"]
    first = next(s for s in shard if s["slide_id"] == "s0")["shards"][0]
    jpeg = next(iter(read_shard(tmp_path / "tiles" / "g5x" / first).values()))["img.jpg"]
    from tests.test_cache import uint8_chw

    img = uint8_chw(jpeg)[None]
    np.testing.assert_allclose(bag.features[0], enc.embed(img)[0].numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        want = student(student.normalize(img))["cls"][0].numpy()
    np.testing.assert_allclose(bag.features[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(1200)  # alone it also builds the module's fixtures (two runs + data)
def test_sigterm_stops_cleanly_and_the_rerun_exports_what_an_uninterrupted_run_does(
        trained, data, tmp_path, ray_cluster):
    """SIGTERM to the `fusedist distill` driver: the trainer stops, the last committed
    checkpoint stays, exit 143 with how to resume; the re-run resumes, leaves
    checkpoint.num_to_keep checkpoints, and exports the same weights as the run that was never
    stopped (the `trained` fixture, same config)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from fusedist.distill.stop import SNAPSHOT

    cfg, res = trained
    cfg = cfg.model_copy(update={"storage_path": str(tmp_path / "runs"), "run_name": "stopped",
                                 "mlflow": cfg.mlflow.model_copy(update={"enabled": False})})
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = tmp_path / "runs" / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "fusedist.cli", "distill", "-c",
                             str(tmp_path / "distill.yaml"), "-q"],
                            env=dict(os.environ, RAY_ADDRESS=ray_cluster),
                            cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / SNAPSHOT).exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the first committed checkpoint"
    proc.send_signal(signal.SIGTERM)  # the driver only, as `kill` or Kubernetes would
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    # One line says it (Ray's worker log lines may interleave around it).
    (last,) = [ln for ln in err.splitlines() if "stopped by SIGTERM" in ln]
    assert "kept the last committed checkpoint" in last and str(run) in last, err[-3000:]
    assert "running the same command again" in last
    # No traceback from the driver (Ray's own actors may log theirs as they are torn down).
    assert not [ln for ln in err.splitlines() if "Traceback" in ln and "pid=" not in ln]
    assert not (run / "export").exists()
    registered = {r["checkpoint_dir_name"]
                  for r in json.loads((run / SNAPSHOT).read_text())["checkpoint_results"]}
    def folders() -> set[str]:
        return {p.name for p in run.glob("checkpoint_*") if p.is_dir()}

    assert folders() == registered  # no orphans
    stopped_at = read_state(find_checkpoint(str(run))).step
    assert 0 < stopped_at < 12

    again = run_distill(cfg, progress=False)
    assert again.steps == 12 and stopped_at in read_state(again.checkpoint).resumes
    assert len(folders()) == cfg.checkpoint.num_to_keep
    card = json.loads((Path(again.export_dir) / "card.json").read_text())
    ref = json.loads((Path(res.export_dir) / "card.json").read_text())
    assert card["weights_sha256"] == ref["weights_sha256"]
