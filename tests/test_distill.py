"""`fusedist distill`: XMAG on a real Ray Train + DeepSpeed run (2 CPU workers, gloo).

One small pairs dataset (3 synthetic slides, 24 pairs, 9 shards) with features cached by ONE
test teacher (test-vit, 64-d) serves the module; the student is test-vit from the registry.
The default validation split holds one slide out (8 pairs), so 16 pairs train.
Runs: a trained run, the same run stopped by SIGTERM and resumed, and a worker killed mid-epoch
on S3 storage with a real MLflow server. The first DeepSpeed start JIT-builds a small C++ op (~50 s, cached)
unless `make venv` prebuilt it (fusedist/distill/prebuild.py).
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
from fusedist.distill.split import held_out_count, split_by_slide
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
    manifest = json.loads((d / "tiles" / "pairs" / "manifest.json").read_text())
    # The default split (validation.fraction 0.1, seed 0): one of the three slides.
    split = split_by_slide(manifest, 0.1, 0)
    assert len(split.val_slides) == 1 and split.val_tiles == 8 and split.train_tiles == 16
    val_keys = [k for k in keys if k.split("/")[0] in split.val_slides]
    return {"root": d, "tiles": d / "tiles" / "pairs", "features": d / "feats" / TEACHER / "pairs",
            "keys": keys, "split": split, "val_keys": val_keys,
            "train_keys": [k for k in keys if k not in val_keys]}


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
    """A 2-worker run: 6 epochs x 2 steps (global batch 8; 16 training pairs), validated every
    4 steps on the held-out slide, local storage, SQLite MLflow, system metrics every 1 s."""
    root = tmp_path_factory.mktemp("trained")
    cfg = distill_cfg(data, root / "runs", "xmag", "epochs=6", "validation.every_steps=4",
                      "ema_decay=0.8",  # an EMA that moves within 12 steps, so validation shows it
                      f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
                      "mlflow.system_metrics_interval=1")
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


def test_validation_split_is_by_slide_deterministic_and_order_free():
    # 20 slides, 1-3 shards each; one older-format entry without slide_id (name parses back).
    shards = [{"name": f"sl{i:02d}-{p:06d}.tar", "slide_id": f"sl{i:02d}", "samples": 5 + p}
              for i in range(20) for p in range(1 + i % 3)]
    del shards[0]["slide_id"]
    manifest = {"shards": shards}
    split = split_by_slide(manifest, 0.1, seed=0)
    assert len(split.val_slides) == 2 and split.train_slides == 18
    slide = {s["name"]: s["name"].rsplit("-", 1)[0] for s in shards}
    # Every shard of a validation slide validates, none trains; together they are all shards.
    assert {slide[n] for n in split.val_shards} == set(split.val_slides)
    assert not {slide[n] for n in split.train_shards} & set(split.val_slides)
    assert sorted(split.val_shards + split.train_shards) == sorted(slide)
    assert split.val_tiles + split.train_tiles == sum(s["samples"] for s in shards)
    assert split.val_tiles == sum(s["samples"] for s in shards if slide[s["name"]]
                                  in split.val_slides)
    # Deterministic, and independent of the manifest's order; the seed moves it.
    assert split_by_slide(manifest, 0.1, seed=0) == split
    assert split_by_slide({"shards": shards[::-1]}, 0.1, 0).val_slides == split.val_slides
    assert split_by_slide(manifest, 0.1, seed=1).val_slides != split.val_slides
    # A bigger fraction holds out a superset (the same ranking, cut later).
    assert set(split.val_slides) < set(split_by_slide(manifest, 0.25, 0).val_slides)
    assert split_by_slide(manifest, 0.0, 0).val_shards == ()
    # Rounding: half up, at least one slide when > 0, never every slide.
    assert [held_out_count(n, f) for n, f in ((3, 0.1), (10, 0.1), (10, 0.25), (10, 0.24),
                                              (2, 0.9), (1, 0.5), (5, 0.0))] == \
        [1, 1, 3, 2, 1, 0, 0]


def test_system_metrics_sampled_once_per_node_and_off_node_0_only_on_a_server():
    """Which workers sample (the sampling itself: the trained run's system/* metrics)."""
    from fusedist.distill.metrics import system_monitor

    mlflow = {"run_id": "r", "tracking_uri": "sqlite:////nowhere/mlflow.db",
              "system_metrics": {"interval": 5}}
    assert system_monitor(None, 0, 0, 0) is None  # tracking off
    assert system_monitor({**mlflow, "system_metrics": None}, 0, 0, 0) is None  # config off
    assert system_monitor(mlflow, 1, 1, 0) is None  # not its node's local rank 0
    assert system_monitor(mlflow, 2, 0, 1) is None  # node 1 cannot reach node 0's SQLite file


# ----------------------------------------------------------------------------- real runs

def _metric(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_worker_run_learns_and_checkpoints_restore_exactly(trained, data):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from mlflow import MlflowClient

    cfg, res = trained
    assert res.steps == 12 and res.epochs == 6
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    loss = _metric(client, res.mlflow_run_id, "loss")
    assert len(loss) == 12  # one point per optimiser step, from rank 0
    assert np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.2, loss
    assert len(_metric(client, res.mlflow_run_id, "img_per_s")) == 12
    # MLflow system metrics, sampled on the training node while the run trained.
    run_metrics = client.get_run(res.mlflow_run_id).data.metrics
    assert {"system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes"} <= set(run_metrics), sorted(run_metrics)
    assert 0 <= run_metrics["system/cpu_utilization_percentage"] <= 100
    # Old checkpoints pruned; the newest holds every rank's ZeRO partition.
    run_dir = Path(res.run_url)
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2
    ckpt = Path(res.checkpoint)
    parts = sorted(p.name for p in (ckpt / "ds").iterdir())
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(parts)
    state = read_state(str(ckpt))
    assert state.step == 12 and state.epoch == 6 and state.cursor["epoch"] == 6
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
    # Each epoch trained every training sample exactly once, and no validation sample.
    log = read_sample_log(res.run_url)
    assert sorted(log) == [0, 1, 2, 3, 4, 5]
    assert all(sorted(keys) == sorted(data["train_keys"]) for keys in log.values())

    # Another split is not this run: a re-run that would validate on other slides is refused
    # before any work. (Re-running resumes from the newest checkpoint: the SIGTERM test below
    # resumes a stopped run to the same weights as this one, the fault test a crashed one.)
    manifest = json.loads((data["tiles"] / "manifest.json").read_text())
    seed = next(s for s in range(1, 100)
                if split_by_slide(manifest, 0.1, s).val_slides != data["split"].val_slides)
    with pytest.raises(ConfigError, match="validation slides"):
        run_distill(cfg.model_copy(update={"validation": cfg.validation.model_copy(
            update={"seed": seed})}), progress=False)


def _direct_validation(student, data) -> tuple[float, float]:
    """The XMAG cosines of ``student`` on the validation tiles, read straight from the shards:
    global = cos(global_head(CLS), mean_j t_j) per tile, local = cos(local_head(block_j), t_j)
    per (tile, j), each averaged (methods.md section 1)."""
    import io

    import torch.nn.functional as F

    from tests.test_cache import uint8_chw
    from tests.test_tiling import read_shard

    g, loc = [], []
    for shard in data["split"].val_shards:
        tiles, feats = read_shard(data["tiles"] / shard), read_shard(data["features"] / shard)
        for key, members in tiles.items():
            img = uint8_chw(members["lo.jpg"])[None].float() / 255
            t = torch.from_numpy(np.load(io.BytesIO(feats[key][f"{TEACHER}.npy"])).astype(
                np.float32))[None]
            with torch.no_grad():
                out = student(student.normalize(img))
            g.append(F.cosine_similarity(out["global"], t.mean(1), dim=-1))
            loc.append(F.cosine_similarity(out["local"], t, dim=-1).reshape(-1))
    return torch.cat(g).mean().item(), torch.cat(loc).mean().item()


def test_ema_student_is_validated_on_the_held_out_slide(trained, data):
    """The split is recorded; every 4 steps and at the end rank 0 logs val/global_cos and
    val/local_cos of the EMA student, computed over both ranks' shares of the validation
    tiles; the final ones are the export card's and the registered version's tags, and
    equal the cosines computed here directly from the exported checkpoint's EMA weights."""
    from mlflow import MlflowClient

    cfg, res = trained
    split = data["split"].to_dict()
    assert json.loads((Path(res.run_url) / "validation.json").read_text()) == split
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run_id = res.mlflow_run_id
    assert client.get_run(run_id).data.metrics["val/tiles"] == 8
    assert "validation/split.json" in {a.path for a in client.list_artifacts(run_id,
                                                                            "validation")}
    hist = {k: sorted(client.get_metric_history(run_id, f"val/{k}"), key=lambda m: m.step)
            for k in ("global_cos", "local_cos")}
    assert [m.step for m in hist["global_cos"]] == [4, 8, 12]
    assert [m.step for m in hist["local_cos"]] == [4, 8, 12]

    card = json.loads((Path(res.export_dir) / "card.json").read_text())
    v = card["validation"]
    assert v["step"] == 12 == card["step"] and v["tiles"] == 8
    assert v["slides"] == split["slides"] and v["fraction"] == 0.1 and v["seed"] == 0
    assert v["global_cos"] == hist["global_cos"][-1].value
    assert v["local_cos"] == hist["local_cos"][-1].value
    assert read_state(res.checkpoint).validation == {k: v[k] for k in
                                                    ("global_cos", "local_cos", "tiles", "step")}
    student, _ = load_ema_student(res.checkpoint)  # the EMA weights, as exported
    g, loc = _direct_validation(student, data)
    assert v["global_cos"] == pytest.approx(g, abs=1e-5)
    assert v["local_cos"] == pytest.approx(loc, abs=1e-5)
    # The student learned on the training slides and it shows on the held-out one.
    assert hist["global_cos"][-1].value > hist["global_cos"][0].value
    tags = client.get_model_version_by_alias("xmag-student", "champion").tags
    assert float(tags["validation.global_cos"]) == v["global_cos"]
    assert float(tags["validation.local_cos"]) == v["local_cos"]
    assert tags["validation.slides"] == "1" and tags["validation.step"] == "12"


def test_worker_killed_mid_epoch_resumes_from_s3_and_logs_to_a_real_mlflow_server(
        data, tmp_path, s3_bucket, moto_server):
    """One run on S3 storage (moto) with a real MLflow server: rank 1 dies mid-epoch, the
    group restarts from the newest S3 checkpoint and sees each remaining sample once; the
    checkpoints, sample log and export are on S3, the metrics and registered model on the
    server. (One run covers both: each distill run costs ~40 s of Ray Train start-up.)"""
    import boto3
    from mlflow import MlflowClient

    from fusedist import storage
    from fusedist.tracking import RANDOM_WEIGHTS_TAG, serve_local

    # micro_batch 2: 4 steps per epoch (16 training pairs). Checkpoints at steps 4, 8, 12;
    # validations at 5, 10 and 12; rank 1 exits before step 11 (3 steps into epoch 2; steps
    # 9-10, and the validation at 10, are lost), the group restarts from step 8.
    with serve_local(tmp_path / "mlflow.db", tmp_path / "artifacts",
                     log_path=tmp_path / "server.log") as server:
        cfg = distill_cfg(data, f"{s3_bucket}/runs", "fault", "epochs=3", "batch.micro_batch=2",
                          "checkpoint.every_steps=4", "fault.at_step=10", "fault.rank=1",
                          "validation.every_steps=5", "max_failures=1",
                          f"storage.endpoint_url={moto_server}",
                          f"mlflow.tracking_uri={server.url}", "export.alias=champion")
        res = run_distill(cfg, progress=False)
        assert storage.exists(f"{s3_bucket}/runs/fault/_fault/step-10-rank-1")
        state = read_state(res.checkpoint)
        assert res.steps == 12 and state.resumes == [8]
        assert state.validation["step"] == 12 and state.validation["tiles"] == 8
        log = read_sample_log(res.run_url)  # the sample log lives on S3 too
        assert sorted(log) == [0, 1, 2]
        for epoch, keys in log.items():  # the training slides' samples, each once; no other
            assert len(keys) == len(set(keys)) == 16, (epoch, sorted(keys))
            assert set(keys) == set(data["train_keys"])

        assert res.checkpoint.startswith(f"{s3_bucket}/runs/fault/checkpoint_")
        bucket = s3_bucket.removeprefix("s3://")
        pages = boto3.client("s3", endpoint_url=moto_server).get_paginator("list_objects_v2")
        keys = [o["Key"] for page in pages.paginate(Bucket=bucket, Prefix="runs/fault/")
                for o in page.get("Contents", [])]
        ckpt_key = res.checkpoint.removeprefix(f"{s3_bucket}/")
        for name in ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                     "ds/mp_rank_00_model_states.pt", "ema.pt", "fusedist_state.json"):
            assert f"{ckpt_key}/{name}" in keys, name
        assert "runs/fault/export/card.json" in keys

        client = MlflowClient(tracking_uri=server.url)
        run = client.get_run(res.mlflow_run_id)
        assert run.data.params["student.name"] == "test-vit"
        assert run.data.tags[RANDOM_WEIGHTS_TAG] == "true"
        # Rank 0 logged every step; the restarted group logged 9 and 10 again.
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert set(steps) == set(range(1, 13)), steps
        assert {"loss", "global_cos", "local_cos", "lr", "img_per_s", "val/global_cos",
                "val/local_cos"} <= set(run.data.metrics)
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config" in arts
        mv = client.get_model_version_by_alias("xmag-student", "champion")
        assert mv.run_id == run.info.run_id
        # An MLflow (pyfunc) model of the run, its files proxied by the server.
        logged = client.get_logged_model(mv.source.removeprefix("models:/"))
        assert logged.source_run_id == run.info.run_id
        assert {a.path for a in client.list_logged_model_artifacts(logged.model_id)} >= {
            "MLmodel", "artifacts"}
        # The card on S3 carries the final validation, and the version its tags.
        card = storage.read_json(f"{s3_bucket}/runs/fault/export/card.json")
        assert card["validation"]["step"] == 12 == res.steps
        assert float(mv.tags["validation.local_cos"]) == card["validation"]["local_cos"]
        assert storage.read_json(f"{s3_bucket}/runs/fault/validation.json") == \
            data["split"].to_dict()


def test_exported_student_embeds_a_slide_at_5x(trained, data, tmp_path):
    from fusedist.formats.bags import read_bag
    from fusedist.models.refs import register_exported
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
    # Again into the run's own export, with the run's MLflow: the export of this checkpoint
    # is kept as it is and its registered version reused (nothing new registered).
    from mlflow import MlflowClient

    mtime = (Path(res.export_dir) / "card.json").stat().st_mtime_ns
    again = run_export(load_config(
        ExportConfig, None, [f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"],
        checkpoint=res.run_url, output=res.export_dir))
    assert again == (res.export_dir, res.encoder, res.model_version) and res.model_version
    assert (Path(res.export_dir) / "card.json").stat().st_mtime_ns == mtime
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'xmag-student'")] == [
        res.model_version]
    # Lineage: the distill run lists the tiles and the teacher's features it read.
    from tests.test_tracking import _run_datasets

    got = _run_datasets(client, res.mlflow_run_id)
    assert got["tiles/pairs"][1:] == (str(data["tiles"] / "manifest.json"), "input")
    assert got[f"features/{TEACHER}/pairs"][1:] == (str(data["features"] / "manifest.json"),
                                                    "input")
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
        trained, data, tmp_path, ray_cluster, capfd):
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

    capfd.readouterr()
    again = run_distill(cfg, progress=True)
    assert again.steps == 12 and stopped_at in read_state(again.checkpoint).resumes
    # The driver's bar: step of total, loss, img/s (ETA is tqdm's); the summary's warning.
    bar = capfd.readouterr().err
    assert "distill" in bar and "12/12" in bar and "loss " in bar and "img/s" in bar, bar[-2000:]
    assert "RANDOM WEIGHTS: test-vit" in again.summary()
    assert "8 held-out validation tiles at step 12" in again.summary()
    log = read_sample_log(again.run_url)  # the stopped attempt's epochs and the re-run's
    assert sorted(log) == [0, 1, 2, 3, 4, 5]
    assert all(sorted(keys) == sorted(data["train_keys"]) for keys in log.values())
    assert len(folders()) == cfg.checkpoint.num_to_keep
    card = json.loads((Path(again.export_dir) / "card.json").read_text())
    ref = json.loads((Path(res.export_dir) / "card.json").read_text())
    assert card["weights_sha256"] == ref["weights_sha256"]
    # ... and validates it to the same numbers (validation draws nothing the training uses).
    assert card["validation"] == ref["validation"]
