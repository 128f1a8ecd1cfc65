"""The models fusedist registers are real MLflow models: ``mlflow.pyfunc.load_model(
"models:/<name>@<alias>")`` works in a fresh process and predicts what fusedist does.

One real ``mlflow server`` (SQLite, proxied artifacts: the deployment path, where clients
download through the server) serves the module. The fused model is a small refit (no fuse
run); the student is a seeded random export (no distill run).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fusedist.config import ConfigError, load_config
from fusedist.tracking import MlflowConfig, serve_local, start_run

from .test_fuse import TINY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-models")
    with serve_local(root / "mlflow.db", root / "artifacts",
                     log_path=root / "server.log") as s:
        yield s.url


def _python(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter (fusedist importable, nothing else shared)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@contextlib.contextmanager
def _scoring_server(model_uri: str, tracking_uri: str, log: Path):
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1 (this venv's mlflow, its
    uvicorn on PATH, no new environment), as a user runs it; yields its URL."""
    from tests.cluster import _free_port

    port = _free_port()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/ping", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        proc.wait(timeout=60)


def _invoke(url: str, payload: dict):
    """POST ``payload`` to ``/invocations``; the answer parsed as strict JSON (NaN and
    Infinity, which Python's json module would accept, are errors)."""
    def strict(const: str):
        raise AssertionError(f"not JSON: the response holds {const}")

    req = urllib.request.Request(url + "/invocations", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read().decode(), parse_constant=strict)["predictions"]


# ----------------------------------------------------------------------- fused model

@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A classification model (LogitProd over the experts, FuseCPath, a Meta-Encoder)."""
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import load_cohort
    from fusedist.fusion.fold import prepare_methods, select_methods
    from fusedist.fusion.model import refit, write_model
    from fusedist.synth.cohort import synthetic_cohort

    tmp = tmp_path_factory.mktemp("fused")
    co = synthetic_cohort(str(tmp / "cohort"), num_slides=12, tiles=(10, 20), seed=8)
    tiny = {**TINY, "experts": {**TINY["experts"], "epochs": 1},
            "logitprod": {**TINY["logitprod"], "max_epochs": 10},
            "meta": {**TINY["meta"], "strategies": ["self_attention"], "epochs": 1},
            "fusecpath": {**TINY["fusecpath"], "epochs": 1}, "fold_cpus": 1}
    cfg = FuseConfig(bags=co.bags, labels=co.labels, output=str(tmp / "fuse"), **tiny)
    c = load_cohort(cfg)
    rows, _ = select_methods(cfg, c)
    rows = [m for m in rows if m.name in ("logitprod", "fusecpath", "meta.self_attention")]
    prepared, _ = prepare_methods(rows, c, cfg, progress=False)
    url = write_model(str(tmp / "model"), c, cfg, refit(c, cfg, rows, prepared), {})
    return co, c, url, tmp


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fused_model_registered_loads_anywhere_and_predicts_as_fusedist(server, fused):
    from mlflow import MlflowClient

    from fusedist.predict import PredictConfig, run_predict
    from fusedist.fusion.pyfunc import bags_frame, log_fused_model

    co, c, url, tmp = fused
    with start_run(MlflowConfig(tracking_uri=server), run_name="fuse") as run:
        info = log_fused_model(run, url, "fused-test", "champion")
        run_id = run.run_id
    assert (info["version"], info["alias"], info["uri"]) == ("1", "champion",
                                                             "models:/fused-test/1")
    mv = MlflowClient(tracking_uri=server).get_model_version_by_alias("fused-test", "champion")
    assert mv.run_id == run_id and mv.source == info["model_uri"]
    assert mv.tags["encoders"] == ",".join(c.encoders)

    # `fusedist predict` through the real CLI, the model named by its alias.
    pred = tmp / "pred"
    p = subprocess.run([sys.executable, "-m", "fusedist.cli", "predict", "-q", "--model",
                        "models:/fused-test@champion", "--bags", co.bags, "--output", str(pred),
                        "--set", f"tracking_uri={server}", "--set", "heatmaps=false"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((pred / "manifest.json").read_text())
    assert manifest["model_version"] == "models:/fused-test/1"
    want = {(r["slide_id"], r["method"]): r for r in _csv_rows(pred / "predictions.csv")}
    assert len(want) == 12 * 3

    # A fresh interpreter: only MLflow's API and the registry URI.
    out = tmp / "pyfunc.csv"
    _python("""
        import sys, mlflow
        from fusedist.fusion.pyfunc import bags_frame
        mlflow.set_tracking_uri(sys.argv[1])
        m = mlflow.pyfunc.load_model("models:/fused-test@champion")
        names = m.metadata.get_input_schema().input_names()
        encoders = [n for n in names if n != "slide_id" and not n.endswith(".coords")]
        m.predict(bags_frame(sys.argv[2], encoders)).to_csv(sys.argv[3], index=False)
    """, server, co.bags, str(out))
    got = _csv_rows(out)
    assert list(got[0]) == list(next(iter(want.values())))  # predictions.csv's columns
    assert len(got) == len(want)
    for r in got:
        w = want[(r["slide_id"], r["method"])]
        assert r["predicted"] == w["predicted"]
        for col in [k for k in r if k.startswith(("prob_", "weight_"))]:
            if w[col] == "":  # weights only on LogitProd's rows
                assert r[col] == "", col
                continue
            np.testing.assert_allclose(float(r[col]), float(w[col]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{r['slide_id']} {r['method']} {col}")

    # Served over HTTP (`mlflow models serve`): a pandas-split request of two slides gets
    # the same rows, as strict JSON (null, not NaN, where LogitProd's weights do not apply).
    frame = bags_frame(co.bags, c.encoders, c.slide_ids[:2])
    split = frame.to_dict(orient="split")
    split["data"] = [[v.tolist() if isinstance(v, np.ndarray) else v for v in row]
                     for row in split["data"]]
    del split["index"]
    with _scoring_server("models:/fused-test@champion", server, tmp / "serve.log") as url:
        served = _invoke(url, {"dataframe_split": split})
    assert len(served) == 2 * 3 and list(served[0]) == list(got[0])
    for r in served:
        w = want[(r["slide_id"], r["method"])]
        assert r["predicted"] == w["predicted"]
        for col in [k for k in r if k.startswith(("prob_", "weight_"))]:
            if w[col] == "":
                assert r[col] is None, (r["method"], col)
            else:
                assert r[col] == pytest.approx(float(w[col]), rel=1e-5, abs=1e-6)

    # A version number resolves too (in-process predict: same table).
    cfg = PredictConfig(model="models:/fused-test/1", bags=co.bags, heatmaps=False,
                        output=str(tmp / "pred-v1"), tracking_uri=server)
    assert run_predict(cfg, progress=False)["model"] == "models:/fused-test/1"
    assert (tmp / "pred-v1" / "predictions.csv").read_text() == \
        (pred / "predictions.csv").read_text()
    # An alias nobody set is refused, naming where it looked and how to register one.
    bad = cfg.model_copy(update={"model": "models:/fused-test@nope"})
    with pytest.raises(ConfigError, match="fused-test@nope.*final.registered_model"):
        run_predict(bad, progress=False)


def test_unchanged_fused_model_reuses_its_version(server, fused):
    """A re-run that changes nothing registers nothing: the version records its files'
    digest, the same files reuse it; changed files make a new version."""
    import shutil

    from mlflow import MlflowClient

    from fusedist import mlmodels
    from fusedist.fusion.pyfunc import log_fused_model

    _, _, url, tmp = fused
    client = MlflowClient(tracking_uri=server)

    def publish(folder: str) -> dict:
        with start_run(MlflowConfig(tracking_uri=server), run_name="fuse") as run:
            return log_fused_model(run, folder, "fused-reuse", "champion")

    def versions() -> list[str]:
        return sorted(str(v.version) for v in client.search_model_versions("name = 'fused-reuse'"))

    first = publish(url)
    mv = client.get_model_version("fused-reuse", first["version"])
    assert mv.tags[mlmodels.FILES_DIGEST_TAG] == mlmodels.files_digest(url)
    again = publish(url)  # a second run, nothing changed
    assert (again["version"], again["reused"], again["alias"]) == (first["version"], True,
                                                                    "champion")
    assert again["model_uri"] == first["model_uri"] and versions() == [first["version"]]

    changed = tmp / "changed-model"
    shutil.copytree(url, changed)
    card = json.loads((changed / "card.json").read_text())
    (changed / "card.json").write_text(json.dumps({**card, "seed": card["seed"] + 1}))
    second = publish(str(changed))
    assert not second["reused"] and len(versions()) == 2
    assert str(client.get_model_version_by_alias("fused-reuse", "champion").version) == \
        second["version"]
    # The first model again: its version is reused, and the alias, moved since (as a
    # retrain's promotion would), stays where it is.
    back = publish(url)
    assert (back["version"], back["reused"], back["alias"]) == (first["version"], True, None)
    assert str(client.get_model_version_by_alias("fused-reuse", "champion").version) == \
        second["version"] and len(versions()) == 2


def test_fused_pyfunc_input_checks_name_the_column(fused):
    import pandas as pd

    from fusedist.fusion.model import load_model
    from fusedist.fusion.pyfunc import bags_frame, predict_rows, signature

    co, c, url, _ = fused
    model = load_model(url)
    frame = bags_frame(co.bags, c.encoders, c.slide_ids[:2])
    names = signature(model.card).inputs.input_names()
    assert names[0] == "slide_id" and set(c.encoders) < set(names)
    full = predict_rows(model, model.card, frame, "cpu")
    # A slide model ignores patient_id (its signature has none): the same table.
    assert predict_rows(model, model.card, frame.assign(patient_id="p"), "cpu").equals(full)
    assert "patient_id" not in names + signature(model.card).outputs.input_names()
    # Without coordinates the group's bags are matched row by row: same tiles, same answer.
    plain = frame[["slide_id", *c.encoders]]
    assert predict_rows(model, model.card, plain, "cpu").equals(full)
    # ...and bags of different lengths cannot be matched that way.
    e = c.encoders[0]
    short = plain.copy()
    short[e] = [np.asarray(f)[:-1] for f in short[e]]
    with pytest.raises(ValueError, match=r"different tile counts.*\.coords"):
        predict_rows(model, model.card, short, "cpu")
    with pytest.raises(ValueError, match=f"column '{e}' must hold"):
        predict_rows(model, model.card, pd.DataFrame([{**plain.iloc[0], e: np.zeros(3)}]),
                     "cpu")


@pytest.fixture(scope="module")
def fused_patients(fused):
    """A ``unit: patient`` model on the same bags: a clinical table (one label per patient)
    and a slide table pairing the first four slides into two patients (the rest: one slide
    each), 10 patients; LogitProd and FuseCPath (which seeds with the unit id) refitted."""
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import load_cohort
    from fusedist.fusion.fold import prepare_methods, select_methods
    from fusedist.fusion.model import refit, write_model

    co, _, _, tmp = fused
    rows = _csv_rows(Path(co.labels))
    pid = {r["slide_id"]: f"P{(i // 2 if i < 4 else i - 2):02d}" for i, r in enumerate(rows)}
    table = tmp / "patients.csv"
    table.write_text("slide_id,path,patient_id\n" + "".join(
        f"{s},{s}.svs,{p}\n" for s, p in pid.items()))
    first = {}
    for r in rows:
        first.setdefault(pid[r["slide_id"]], r["label"])
    clinical = tmp / "clinical.csv"
    clinical.write_text("patient_id,label\n" + "".join(f"{p},{y}\n" for p, y in first.items()))
    tiny = {**TINY, "experts": {**TINY["experts"], "epochs": 1},
            "logitprod": {**TINY["logitprod"], "max_epochs": 10},
            "fusecpath": {**TINY["fusecpath"], "epochs": 1}, "fold_cpus": 1}
    cfg = FuseConfig(bags=co.bags, labels=str(clinical), slides=str(table),
                     output=str(tmp / "fuse-patients"), **tiny)
    c = load_cohort(cfg)
    assert c.unit == "patient" and c.num_samples == 10
    methods, _ = select_methods(cfg, c)
    methods = [m for m in methods if m.name in ("logitprod", "fusecpath")]
    prepared, _ = prepare_methods(methods, c, cfg, progress=False)
    url = write_model(str(tmp / "model-patients"), c, cfg, refit(c, cfg, methods, prepared), {})
    return co, c, url, str(table), [s for s, p in pid.items() if p == "P00"], tmp


def test_patient_model_pools_a_patients_slides_as_predict_does(server, fused_patients):
    """Logged to MLflow and loaded with mlflow.pyfunc.load_model, a patient-unit model
    predicts a patient's slides (rows grouped by patient_id) as one row per method: the
    columns and numbers of `fusedist predict`'s predictions.csv for that patient."""
    import mlflow
    import pandas as pd

    from fusedist import mlmodels
    from fusedist.fusion.pyfunc import bags_frame, log_fused_model, signature
    from fusedist.predict import PredictConfig, run_predict

    co, c, url, table, two, tmp = fused_patients
    with start_run(MlflowConfig(tracking_uri=server), run_name="fuse") as run:
        info = log_fused_model(run, url, None, None)
    with mlmodels.using_tracking_uri(server):
        m = mlflow.pyfunc.load_model(info["model_uri"])
    schema = m.metadata.get_input_schema()
    assert schema.input_names()[:2] == ["slide_id", "patient_id"]
    assert not schema.inputs[1].required  # optional: a slide model ignores it
    assert signature(json.loads((Path(url) / "card.json").read_text())).outputs         .input_names()[:2] == ["patient_id", "slide_id"]

    pred = tmp / "pred-patients"
    run_predict(PredictConfig(model=url, bags=co.bags, patients=table, output=str(pred),
                              heatmaps=False), progress=False)
    csv_rows = _csv_rows(pred / "predictions.csv")
    want = {(r["patient_id"], r["method"]): r for r in csv_rows}
    assert len(want) == 10 * 2

    def same(got) -> None:
        assert list(got.columns) == list(csv_rows[0])  # patient_id first, as predictions.csv
        for r in got.to_dict("records"):
            w = want[(r["patient_id"], r["method"])]
            assert (r["slide_id"], r["predicted"]) == (w["slide_id"], w["predicted"])
            for col in [k for k in w if k.startswith(("prob_", "weight_"))]:
                if w[col] == "":
                    assert pd.isna(r[col]), col
                else:
                    np.testing.assert_allclose(float(r[col]), float(w[col]), rtol=1e-5,
                                               atol=1e-6, err_msg=f"{r['patient_id']} {col}")

    # The two-slide patient, its rows given in reverse order: one row per method, the
    # slides pooled in slide-id order and joined by ';'.
    frame = bags_frame(co.bags, c.encoders, two[::-1], patients=table)
    assert frame["patient_id"].tolist() == ["P00", "P00"]
    got = m.predict(frame)
    assert got["patient_id"].tolist() == ["P00"] * 2
    assert got["slide_id"].tolist() == [";".join(sorted(two))] * 2
    same(got)
    whole = m.predict(bags_frame(co.bags, c.encoders, patients=table))  # every patient
    assert len(whole) == len(want)
    same(whole)
    # Without patient_id the model cannot know who is who: an error that names the fix.
    with pytest.raises(Exception, match=r"unit: patient.*'patient_id' column.*patients="):
        m.predict(frame.drop(columns=["patient_id"]))


# --------------------------------------------------------------------------- student

@pytest.fixture(scope="module")
def student_export(tmp_path_factory):
    from fusedist.distill.export import export_student
    from fusedist.models.student import XmagStudent

    tmp = tmp_path_factory.mktemp("student")
    out = export_student(XmagStudent.from_registry("test-vit", teacher_dim=8),
                         str(tmp / "export"), {"name": "xmag-test-pyfunc"})
    return out, tmp


def test_student_registered_embeds_like_fusedist_embed(server, student_export, ray_cluster,
                                                       monkeypatch):
    import torch
    from mlflow import MlflowClient

    from fusedist.formats.bags import read_bag
    from fusedist.distill.export import register_in_mlflow
    from fusedist.models.refs import resolve_encoder
    from fusedist.features import EmbedConfig, run_embed
    from fusedist.models import build_encoder
    from fusedist.tiling import run_tile
    from tests.slides import known_slides
    from tests.test_cache import uint8_chw
    from tests.test_tiling import read_shard, tile_cfg

    out, tmp = student_export
    card = json.loads((Path(out) / "card.json").read_text())
    for _ in range(2):  # the second registration of the same export reuses version 1
        with start_run(MlflowConfig(tracking_uri=server), run_name="distill") as tracker:
            assert register_in_mlflow(tracker, out, "xmag-test-student", alias="champion") \
                == "1"
    client = MlflowClient(tracking_uri=server)
    mv = client.get_model_version_by_alias("xmag-test-student", "champion")
    assert mv.tags["weights_sha256"] == card["weights_sha256"]  # the tags are kept
    assert len(client.search_model_versions("name = 'xmag-test-student'")) == 1

    # 5x tiles of one slide, embedded with the registered model as the encoder.
    run_tile(tile_cfg(known_slides(tmp / "slides", 1), tmp / "tiles", dataset="g5x",
                      mode="grid", tile_mpp=2.0, tile_size=224, min_tissue=0.3),
             progress=False)
    ref = "models:/xmag-test-student@champion"
    ecfg = load_config(EmbedConfig, None, ["mlflow.enabled=false", "engine.batch_size=16",
                                           f"mlflow.tracking_uri={server}"],
                       tiles=str(tmp / "tiles" / "g5x"), output=str(tmp / "bags"),
                       encoders=[ref])
    res = run_embed(ecfg, progress=False)
    assert res.written == 1 and not res.failed
    bag = read_bag(str(tmp / "bags" / "xmag-test-pyfunc" / "s0.h5"))
    assert bag.attrs["weights_digest"] == card["weights_digest"]
    assert resolve_encoder(ref, server) == "xmag-test-pyfunc"

    manifest = json.loads((tmp / "tiles" / "g5x" / "manifest.json").read_text())
    shard = tmp / "tiles" / "g5x" / manifest["slides"][0]["shards"][0]
    tiles = torch.stack([uint8_chw(s["img.jpg"]) for s in read_shard(shard).values()])
    np.save(tmp / "tiles.npy", tiles.numpy())
    _python("""
        import sys, mlflow, numpy as np
        mlflow.set_tracking_uri(sys.argv[1])
        m = mlflow.pyfunc.load_model("models:/xmag-test-student@champion")
        assert m.metadata.metadata["fusedist_card"]["name"] == "xmag-test-pyfunc"
        np.save(sys.argv[3], m.predict(np.load(sys.argv[2])))
    """, server, str(tmp / "tiles.npy"), str(tmp / "emb.npy"))
    got = np.load(tmp / "emb.npy")
    assert got.shape == (len(tiles), card["dim"]) and got.dtype == np.float32
    enc = build_encoder(resolve_encoder(out))  # the encoder `fusedist embed -e <export>` uses
    np.testing.assert_allclose(got, enc.embed(tiles).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, bag.features[:len(tiles)], rtol=1e-4, atol=1e-4)

    # Served over HTTP: a tensor request of two tiles, the same embeddings.
    with _scoring_server(ref, server, tmp / "serve.log") as url:
        served = np.asarray(_invoke(url, {"inputs": tiles[:2].numpy().tolist()}))
    np.testing.assert_allclose(served, got[:2], rtol=1e-5, atol=1e-5)

    # `fusedist cache -t models:/...` resolves through the stage's own mlflow.tracking_uri
    # (MLFLOW_TRACKING_URI unset) and its actors read the export copied under the output.
    from fusedist.features import CacheConfig, run_cache

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ccfg = load_config(CacheConfig, None, ["engine.batch_size=16",
                                           f"mlflow.tracking_uri={server}"],
                       tiles=str(tmp / "tiles" / "g5x"), output=str(tmp / "features"),
                       teachers=[ref])
    cached = run_cache(ccfg, progress=False)
    assert not cached.failed and list(cached.manifests) == ["xmag-test-pyfunc"]
    assert cached.manifests["xmag-test-pyfunc"]["weights_digest"] == card["weights_digest"]
    copy = tmp / "features" / "_state" / "models" / "xmag-test-pyfunc"
    assert json.loads((copy / "card.json").read_text())["weights_sha256"] == \
        card["weights_sha256"]


def test_registry_uris_are_checked_before_mlflow_is_asked(tmp_path, monkeypatch):
    import mlflow

    from fusedist import mlmodels

    with pytest.raises(ValueError, match=r"no version or alias.*models:/fused@<alias>"):
        mlmodels.resolve("models:/fused", "sqlite:///unused.db")
    missing = tmp_path / "none" / "mlflow.db"
    with pytest.raises(ValueError, match="does not exist.*MLFLOW_TRACKING_URI"):
        mlmodels.resolve("models:/fused@champion", f"sqlite:///{missing}")
    assert not missing.parent.exists()  # no empty store left behind
    # Pointing MLflow at a run's store for a moment leaves the user's own setting intact.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://users-own:5000")
    with mlmodels.using_tracking_uri(f"sqlite:///{tmp_path}/x.db"):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/x.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://users-own:5000"
    assert mlflow.get_tracking_uri() == "http://users-own:5000"
