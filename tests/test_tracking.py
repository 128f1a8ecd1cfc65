"""MLflow tracking: a local SQLite store, a real `mlflow server`, masking, ranks, dead servers.

One real server (``serve_local``) serves the whole module; everything else uses a fresh SQLite
store under ``tmp_path``. Nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from fusedist.config import StorageConfig, StrictModel
from fusedist.tracking import (MASK, RANDOM_WEIGHTS_MODELS_TAG, RANDOM_WEIGHTS_TAG, LocalServer,
                               MlflowConfig, TrackingError, flatten_params, mask_text,
                               serve_local, start_run, warn_random_weights)

ENV_SECRET = "env-secret-Kd93LmQx0Pz"
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
URL_PASSWORD = "url-pass-W7tYq"
FIELD_SECRET = "field-secret-Hn4Rb"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Path]]:
    """One real mlflow server (SQLite backend, proxied local artifacts) for the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = serve_local(root / "mlflow.db", root / "artifacts", log_path=root / "server.log")
    try:
        yield server, root / "artifacts"
    finally:
        server.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_artifact_text(client: MlflowClient, run_id: str, dest: Path) -> str:
    local = Path(client.download_artifacts(run_id, "", str(dest)))
    return "\n".join(p.read_text(errors="replace") for p in local.rglob("*") if p.is_file())


class _StageConfig(StrictModel):
    storage: StorageConfig = StorageConfig()
    secret_key: str = ""
    source_url: str = ""
    note: str = ""
    batch_size: int = 32


def test_local_default_sqlite_store_records_everything(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.txt").write_text("auroc 0.91")
    cfg = _StageConfig(storage=StorageConfig(endpoint_url="http://minio:9000"))
    with start_run(MlflowConfig(tags={"team": "path"}), "tile", params=cfg,
                   tags={"stage": "tile"}) as t:
        t.log_metrics({"loss": 1.0, "lr": 0.1}, step=0)
        t.log_metrics({"loss": 0.5}, step=1)
        t.log_artifact(tmp_path / "report.txt", "reports")
        t.log_dict({"a": 1}, "summary.json")
        with start_run(MlflowConfig(), "child", nested=True) as child:
            child.log_metrics({"x": 2.0})
            child_id = child.run_id
        run_id = t.run_id
    assert t.run_id is None  # ended

    db = tmp_path / "mlruns" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tile"
    assert run.data.params["storage.endpoint_url"] == "http://minio:9000"
    assert run.data.params["batch_size"] == "32"
    assert run.data.tags["stage"] == "tile" and run.data.tags["team"] == "path"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (0, 1.0), (1, 0.5)]
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    report = client.download_artifacts(run_id, "reports/report.txt", str(tmp_path / "dl"))
    assert Path(report).read_text() == "auroc 0.91"
    full = json.loads(Path(client.download_artifacts(run_id, "fusedist/params.json",
                                                     str(tmp_path / "dl"))).read_text())
    assert full["storage"]["endpoint_url"] == "http://minio:9000"
    # Artifacts live under ./mlruns/artifacts, not in experiment folders strewn about the cwd.
    assert list((tmp_path / "mlruns" / "artifacts").rglob("report.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "mlruns", "report.txt"]
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == run_id


def _samplers() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_system_metrics_sampled_into_the_run_while_it_is_open(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """MLflow's own SystemMetricsMonitor on our MlflowClient run: system/* metrics arrive
    while the run is open and the sampler stops with it; ``system_metrics: false`` starts none."""
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    before = len(_samplers())
    with start_run(MlflowConfig(tracking_uri=uri, system_metrics_interval=0.2), "cache") as t:
        assert len(_samplers()) == before + 1
        deadline = time.monotonic() + 60  # a poll, not a timing assertion
        while ("system/cpu_utilization_percentage" not in client.get_run(t.run_id).data.metrics
               and time.monotonic() < deadline):
            time.sleep(0.1)
        run_id = t.run_id
    assert len(_samplers()) == before  # ended with the run
    metrics = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= set(metrics), sorted(metrics)
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    with start_run(MlflowConfig(tracking_uri=uri, system_metrics=False), "off"):
        assert len(_samplers()) == before
    with start_run(MlflowConfig(tracking_uri=uri), "driver", system_metrics=False):
        assert len(_samplers()) == before  # distill's driver: its workers sample instead


def test_uri_precedence_config_then_env_then_default(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env_uri = f"sqlite:///{tmp_path / 'env' / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    with start_run(MlflowConfig(), "a") as t:
        assert t.tracking_uri == env_uri
    cfg_uri = f"sqlite:///{tmp_path / 'cfg' / 'cfg.db'}"
    with start_run(MlflowConfig(tracking_uri=cfg_uri), "b") as t:
        assert t.tracking_uri == cfg_uri
        run_id = t.run_id
    # A user SQLite URI keeps its artifacts beside the database too.
    run = MlflowClient(cfg_uri).get_run(run_id)
    assert run.info.artifact_uri.startswith((tmp_path / "cfg" / "artifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()


def test_params_flattened_truncated_and_batched(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # 250 params: one log_batch call over MLflow's 100-param limit would be rejected.
    params = {"grid": {f"p{i:03d}": i for i in range(250)}, "long": "x" * 10_000,
              "layers": [1, 2], "bad key!": True}
    with start_run(MlflowConfig(), "p", params=params) as t:
        run_id = t.run_id
    logged = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_run(run_id).data.params
    assert len([k for k in logged if k.startswith("grid.")]) == 250
    assert logged["grid.p249"] == "249" and logged["layers"] == "[1, 2]"
    assert len(logged["long"]) == 6000 and logged["long"].endswith("[truncated]")
    assert logged["bad key_"] == "true"


@pytest.mark.parametrize("kwargs", [{"rank": 1}, {"env_rank": "2"}, {"enabled": False}],
                         ids=["rank1", "env-RANK", "disabled"])
def test_noop_tracker_touches_nothing(kwargs: dict, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if "env_rank" in kwargs:
        monkeypatch.setenv("RANK", kwargs["env_rank"])
    # A dead server: a no-op tracker must not even try to reach it.
    cfg = MlflowConfig(tracking_uri=f"http://127.0.0.1:{_closed_port()}",
                       enabled=kwargs.get("enabled", True))
    (tmp_path / "f.txt").write_text("x")
    with start_run(cfg, "r", params={"a": 1}, rank=kwargs.get("rank")) as t:
        assert t.run_id is None and not t.active
        t.log_params({"b": 2})
        t.log_metrics({"m": 1.0}, step=3)
        t.log_artifact(tmp_path / "f.txt")
        t.log_text("t", "t.txt")
        t.log_dict({"d": 1}, "d.json")
        t.set_tags({"k": "v"})
        warn_random_weights(t, ["uni"])
    cfg_default = MlflowConfig(enabled=kwargs.get("enabled", True))
    with start_run(cfg_default, "r", rank=kwargs.get("rank")) as t:
        t.log_metrics({"m": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no ./mlruns


def test_secrets_never_reach_params_tags_or_artifacts(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    cfg = _StageConfig(secret_key=FIELD_SECRET,
                       source_url=f"https://alice:{URL_PASSWORD}@minio:9000/slides",
                       note=f"copied {ENV_SECRET} and {AWS_KEY_ID} by mistake",
                       storage=StorageConfig(region="eu-west-1"))
    with start_run(MlflowConfig(), "s", params=cfg,
                   tags={"api_token": FIELD_SECRET, "src": cfg.source_url}) as t:
        t.log_params({"hf": {"token": "hf_" + "a" * 34}})
        t.set_tags({"note": f"key={ENV_SECRET}"})
        t.log_text(f"endpoint {cfg.source_url} secret {ENV_SECRET}", "notes/log.txt")
        t.log_dict({"password": FIELD_SECRET, "cfg": cfg}, "notes/cfg.yaml")
        run_id = t.run_id
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = client.get_run(run_id)
    logged = "\n".join([*run.data.params.values(), *run.data.params,
                        *run.data.tags.values(), *run.data.tags,
                        _all_artifact_text(client, run_id, tmp_path / "dl")])
    for secret in (ENV_SECRET, AWS_KEY_ID, URL_PASSWORD, FIELD_SECRET, "hf_aaaa"):
        assert secret not in logged
    # Masked, not dropped: the rest of each value survives.
    params = run.data.params
    assert params["secret_key"] == MASK and params["hf.token"] == MASK
    assert params["source_url"] == f"https://alice:{MASK}@minio:9000/slides"
    assert params["note"] == f"copied {MASK} and {MASK} by mistake"
    assert params["storage.region"] == "eu-west-1" and params["batch_size"] == "32"
    assert run.data.tags["api_token"] == MASK
    assert f"endpoint https://alice:{MASK}@minio:9000/slides" in logged
    # Environment variables are never logged.
    assert "AWS_SECRET_ACCESS_KEY" not in logged and os.environ["PATH"] not in logged


def test_mask_text_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf-env-value-123")
    monkeypatch.setenv("SOME_FLAG", "not-a-secret-value")
    assert mask_text("postgresql://u:p4ss@db/x") == f"postgresql://u:{MASK}@db/x"
    assert (mask_text("http://h/x?a=1&access_token=abc&b=2")
            == f"http://h/x?a=1&access_token={MASK}&b=2")
    assert mask_text(f"id={AWS_KEY_ID}.") == f"id={MASK}."
    assert mask_text("tok hf-env-value-123 end") == f"tok {MASK} end"
    assert mask_text("not-a-secret-value s3://bucket/key") == "not-a-secret-value s3://bucket/key"
    assert flatten_params({"a": {"b": {"c": None}}, "e": {}}) == {"a.b.c": "null", "e": "{}"}


def test_random_weights_warning_and_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fusedist.tracking"):
        with start_run(MlflowConfig(), "rw") as t:
            warn_random_weights(t, ["virchow2", "uni"])
            run_id = t.run_id
        assert "RANDOM WEIGHTS for uni, virchow2" in caplog.text
        caplog.clear()
        with start_run(MlflowConfig(), "pretrained") as t:
            warn_random_weights(t, [])  # every model pretrained: no warning, no tag
            pretrained_id = t.run_id
        assert "RANDOM WEIGHTS" not in caplog.text
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    tags = client.get_run(run_id).data.tags
    assert tags[RANDOM_WEIGHTS_TAG] == "true" and tags[RANDOM_WEIGHTS_MODELS_TAG] == "uni,virchow2"
    assert RANDOM_WEIGHTS_TAG not in client.get_run(pretrained_id).data.tags


def test_remote_server_metrics_and_proxied_artifacts(mlflow_server: tuple[LocalServer, Path],
                                                     tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    server, artifacts_dir = mlflow_server
    # Credentials in the URI are sent (the server ignores them) but never logged anywhere.
    uri = server.url.replace("http://", f"http://alice:{URL_PASSWORD}@")
    (tmp_path / "model.txt").write_text("weights")
    with caplog.at_level(logging.INFO, logger="fusedist.tracking"):
        with start_run(MlflowConfig(tracking_uri=uri, experiment="remote"), "fit",
                       params={"lr": 0.1}) as t:
            for step in range(3):
                t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            t.log_artifact(tmp_path / "model.txt", "model")
            run_id = t.run_id
    assert URL_PASSWORD not in caplog.text and f"alice:{MASK}@" in caplog.text

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
    # Proxied: the client only saw an mlflow-artifacts: URI; the server wrote the file.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/model.txt"]
    assert [p.read_text() for p in artifacts_dir.rglob("model.txt")] == ["weights"]
    assert URL_PASSWORD not in json.dumps(run.to_dictionary())


def test_unreachable_server_fails_fast_with_fix() -> None:
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        start_run(MlflowConfig(tracking_uri=f"http://bob:{URL_PASSWORD}@127.0.0.1:{port}"), "x")
    assert time.monotonic() - start < 20
    msg = str(err.value)
    assert f"bob:{MASK}@127.0.0.1:{port}" in msg and URL_PASSWORD not in msg
    assert "mlflow server" in msg and "mlflow.tracking_uri" in msg and "mlflow.enabled=false" in msg


def test_hung_server_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # Listens but never answers: the TCP handshake succeeds, the request hangs.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{s.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(TrackingError, match=r"no answer within .* env MLFLOW_TRACKING_URI"):
            start_run(MlflowConfig(), "x")
        assert time.monotonic() - start < 20


def _run_datasets(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str, str]]:
    """name -> (digest, source URI, role) of a run's MLflow datasets."""
    out = {}
    for d in client.get_run(run_id).inputs.dataset_inputs:
        role = {t.key: t.value for t in d.tags}["mlflow.data.context"]
        out[d.dataset.name] = (d.dataset.digest, json.loads(d.dataset.source)["uri"], role)
    return out


def test_lineage_datasets_on_a_real_server(mlflow_server: tuple[LocalServer, Path],
                                           tmp_path: Path) -> None:
    """A run lists what it read and wrote as MLflow datasets: the manifest's digest, its URL
    (no credentials) and its role; a bag folder's digest follows what made its bags."""
    import hashlib

    import numpy as np

    from fusedist.formats.bags import Bag, write_bag
    from fusedist.lineage import (OUTPUT, bags_ref, features_ref, labels_ref, source_url,
                                  tiles_ref)
    from fusedist.state import StageState

    server, _ = mlflow_server
    tiles = tmp_path / "tiles" / "grid"
    tiles.mkdir(parents=True)
    (tiles / "manifest.json").write_text(json.dumps({"dataset": "grid", "shards": []}))
    feats = tmp_path / "feats" / "test-vit" / "grid"
    feats.mkdir(parents=True)
    (feats / "manifest.json").write_text(json.dumps({"teacher": "test-vit", "dataset": "grid"}))
    (tmp_path / "labels.csv").write_text("slide_id,label\ns0,a\n")
    for sid in ("s0", "s1"):
        write_bag(str(tmp_path / "bags" / "enc" / f"{sid}.h5"),
                  Bag(slide_id=sid, features=np.ones((3, 4), np.float32),
                      coords=np.zeros((3, 2), np.int64), encoder="enc"))
    state = StageState(str(tmp_path / "bags"), "bags", "enc")
    state.write("s0", {"weights_digest": "w1", "source_digest": "x"})
    bags = bags_ref(str(tmp_path / "bags" / "enc"), "enc", OUTPUT)

    with start_run(MlflowConfig(tracking_uri=server.url), "cache") as t:
        t.log_datasets([tiles_ref(str(tiles)), features_ref(str(feats), OUTPUT),
                        labels_ref(str(tmp_path / "labels.csv")), bags])
        run_id = t.run_id
    got = _run_datasets(MlflowClient(server.url), run_id)
    sha = hashlib.sha256((tiles / "manifest.json").read_bytes()).hexdigest()[:32]
    assert got["tiles/grid"] == (sha, str(tiles / "manifest.json"), "input")
    assert got["features/test-vit/grid"][1:] == (str(feats / "manifest.json"), "output")
    assert got["labels/labels.csv"][0] == hashlib.sha256(b"slide_id,label\ns0,a\n").hexdigest()[:32]
    assert got["bags/enc"] == (bags.digest, str(tmp_path / "bags" / "enc"), "output")
    # Same bags, other weights recorded: another digest (the bytes' sizes alone are alike).
    state.write("s0", {"weights_digest": "w2", "source_digest": "x"})
    assert bags_ref(str(tmp_path / "bags" / "enc"), "enc").digest != bags.digest
    # A source never carries credentials.
    assert source_url("s3://AKIAABCDEFGHIJKLMNOP:s3cr3t-value@bucket/tiles") == "s3://bucket/tiles"


def test_server_stop_leaves_no_processes(mlflow_server: tuple[LocalServer, Path]) -> None:
    """Runs last in this module (it stops the shared server; the fixture's stop is idempotent)."""
    server, _ = mlflow_server
    pgid = server.process.pid
    os.killpg(pgid, 0)  # the group exists while the server runs
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # no orphaned uvicorn worker keeps the SQLite file or the port
    with pytest.raises(TrackingError):
        start_run(MlflowConfig(tracking_uri=server.url), "after-stop")
