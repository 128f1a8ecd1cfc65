"""`fusedist retrain`: ingest only the new slides (earlier shards, features and bags stay
byte-identical), score the challenger against the champion on the same folds, promote only a
better one (real MLflow registry, SQLite), do nothing when nothing is new; bags and run
outputs on S3 (moto) in the promotion test; the student's warm start and validation score."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.retrain.config import PromotionConfig, RetrainConfig
from fusedist.retrain.evaluate import Score, decide
from tests.s3util import moto_server, s3_bucket  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _client(db: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(db: Path, name: str) -> list[str]:
    found = _client(db).search_model_versions(f"name = '{name}'")
    return sorted((str(v.version) for v in found), key=int)


def _alias(db: Path, name: str, alias: str = "champion") -> str:
    return str(_client(db).get_model_version_by_alias(name, alias).version)


def _snapshot(root: Path, skip=("manifest.json", "slides.csv")) -> dict[str, tuple[str, int]]:
    """path -> (sha256, mtime_ns) of every file under ``root`` (but ``skip`` names: a tile
    dataset's indexes, which list the new slides too)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                             p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


# ------------------------------------------------------------------------------ rules

def test_the_promotion_rule():
    rule = PromotionConfig(min_delta=0.02)
    chal = Score("logitprod", "auc", [0.80, 0.84])
    assert decide(rule, chal, None).promote  # the first model: nothing to compare with
    assert decide(rule, chal, Score("logitprod", "auc", [0.79, 0.81])).promote  # +0.02
    kept = decide(rule, chal, Score("logitprod", "auc", [0.80, 0.83]))  # +0.005
    assert not kept.promote and "min_delta 0.02" in kept.reason and kept.delta == pytest.approx(
        0.005)
    tie = decide(PromotionConfig(), chal, Score("logitprod", "auc", [0.80, 0.84]))
    assert not tie.promote  # a tie keeps the champion
    forced = decide(rule, chal, Score("logitprod", "auc", [0.9, 0.9]), force=True)
    assert forced.promote and forced.reason.startswith("--force-promote")
    nan = decide(PromotionConfig(), Score("logitprod", "auc", [0.9, float("nan")]),
                 Score("logitprod", "auc", [0.5, 0.5]))
    assert not nan.promote and "missing" in nan.reason
    # A student gate: the fused score is better, the student's validation CKA fell too far.
    gate = decide(PromotionConfig(student_min_delta=-0.01), chal,
                  Score("logitprod", "auc", [0.5, 0.5]), student={"delta": -0.05})
    assert not gate.promote and "student_min_delta" in gate.reason
    # A flat refit is never promoted: not as the first model, not when it beats the champion.
    why = "logitprod: it predicts class 0 for all 18 of its training samples (2 classes)"
    for champ in (None, Score("logitprod", "auc", [0.5, 0.5])):
        flat = decide(rule, chal, champ, flat=why)
        assert not flat.promote and "refit is flat" in flat.reason and why in flat.reason
    assert decide(rule, chal, None, force=True, flat=why).promote  # unless forced


def test_train_slides_restricts_only_the_training_side():
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import Cohort, restrict_training

    c = Cohort(task="classification", slide_ids=["a", "b", "c", "d"], patient_ids=list("abcd"),
               encoders=[], dims={}, bags={}, coords={}, feature_group=[], aligned={},
               aligned_coords=[])
    cfg = FuseConfig(bags="x", labels="y", train_slides=["a", "c", "zz"])
    assert restrict_training(c, cfg, np.array([0, 1, 2])).tolist() == [0, 2]
    assert restrict_training(c, FuseConfig(bags="x", labels="y"), np.array([1, 3])).tolist() \
        == [1, 3]
    with pytest.raises(ConfigError, match="none of its 3 slide"):
        restrict_training(c, cfg, np.array([1, 3]))


def test_recipes_and_their_errors(tmp_path):
    demo = yaml.safe_load((REPO / "configs/retrain/demo.yaml").read_text())
    cfg = RetrainConfig.model_validate(demo)
    # One statement of slides, labels, Ray, S3 and MLflow reaches every stage.
    assert {t.input for t in cfg.tile.values()} == {"demo-output/slides/slides.csv"}
    assert cfg.fuse.labels == "demo-output/slides/clinical.csv"
    assert cfg.cache["pairs"].mlflow.tracking_uri == cfg.mlflow.tracking_uri
    with pytest.raises(ValueError, match="tile stages need `slides`"):
        RetrainConfig.model_validate({**demo, "slides": None})
    with pytest.raises(ValueError, match="student.retrain needs student.distill"):
        RetrainConfig.model_validate({**demo, "student": {**demo["student"], "retrain": True,
                                                          "distill": None}})
    with pytest.raises(ValueError, match="reserved"):
        RetrainConfig.model_validate({**demo, "registry": {"fused_model": "m",
                                                           "alias": "latest"}})
    r = subprocess.run([sys.executable, "-m", "fusedist.cli", "retrain", "-c",
                        "configs/retrain/demo.yaml", "--set", "fuse.train_slides=[a]"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "leave it unset" in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------- promotion (bags, S3)

def _bags_only(root: str, db: Path, epochs: int) -> RetrainConfig:
    """A recipe on bags that appear by other means (no tile/cache/embed stages)."""
    return RetrainConfig.model_validate({
        "labels": f"{root}/labels.csv", "output": f"{root}/retrain",
        "fuse": {"bags": f"{root}/bags", "task": "classification", "folds": 3,
                 "inner_folds": 2, "methods": ["logitprod"],
                 "experts": {"epochs": epochs, "hidden": 64},
                 "logitprod": {"lr": 1e-3, "max_epochs": 60, "patience": 15}, "heatmaps": 0,
                 "final": {"methods": ["logitprod"]}},
        "registry": {"fused_model": "fused-test"},
        "mlflow": {"tracking_uri": f"sqlite:///{db}"}})


def test_a_worse_challenger_is_kept_out_a_better_one_promoted(ray_cluster, s3_bucket,
                                                               tmp_path):
    from fusedist.synth.cohort import synthetic_cohort
    from fusedist.retrain.job import NOTHING, run_retrain

    co = synthetic_cohort(str(tmp_path / "cohort"), num_slides=36, tiles=(10, 20), seed=6)
    rows = list(csv.DictReader(open(co.labels, newline="")))
    root, db, first = f"{s3_bucket}/work", tmp_path / "mlflow.db", 18

    def publish(n: int, swap: bool = False) -> None:
        """The first ``n`` slides' bags (the rest "arrive" later); labels of the slides after
        the first 18 swapped with ``swap`` (a challenger made worse on purpose)."""
        for enc in Path(co.bags).iterdir():
            for r in rows[:n]:
                url = f"{root}/bags/{enc.name}/{r['slide_id']}.h5"
                if not storage.exists(url):
                    storage.upload_file(enc / f"{r['slide_id']}.h5", url)
        text = [",".join(rows[0])]
        for i, r in enumerate(rows[:n]):
            lab = r["label"]
            if swap and i >= first:
                lab = {"0": "1", "1": "0"}[lab]
            text.append(",".join(lab if k == "label" else v for k, v in r.items()))
        storage.write_text(f"{root}/labels.csv", "\n".join(text) + "\n")

    # 0. No champion, but a recipe too short to fit (1 epoch): its refit calls one class for
    # every training slide. Registered and flagged, never promoted, not even as the first.
    publish(first)
    r0 = run_retrain(_bags_only(root, db, epochs=1), progress=False)
    assert r0.status == "kept" and "refit is flat" in r0.message, r0.message
    assert "for all 18 of its training samples" in r0.promotion["challenger"]["flat_refit"]
    assert _versions(db, "fused-test") == ["1"]
    v1 = _client(db).get_model_version("fused-test", "1")
    assert v1.tags["fusedist.flat_refit"] == "true" and not v1.aliases
    assert "logitprod: it predicts class" in v1.tags["fusedist.flat_refit.reason"]

    # 1. Still no champion: the first challenger that fits (a weak recipe, 5 epochs, 18
    # slides) is promoted. Its experts trained the folds' median best epoch, on every slide.
    r1 = run_retrain(_bags_only(root, db, epochs=5), progress=False)
    assert r1.status == "promoted" and "first model" in r1.message
    assert _versions(db, "fused-test") == ["1", "2"] and _alias(db, "fused-test") == "2"
    assert _client(db).get_model_version("fused-test", "2").tags["fusedist.flat_refit"] == \
        "false"
    card = json.loads(storage.read_text(f"{r1.promotion['challenger']['model']}/card.json"))
    assert card["trained_slides"] == [r["slide_id"] for r in rows[:first]]
    assert card["recipe"]["experts"]["epochs"] == 5
    assert card["refit"]["flat"] == [] and card["refit"]["checks"]["logitprod"]["spread"] > 0.02
    fold = json.loads(storage.read_text(
        f"{r1.run_url}/challenger/_state/fold-00.json"))["best_epochs"]
    assert set(card["refit"]["epochs"]) == set(fold) and 1 <= fold["expert.test-color"] <= 5

    # 2. 18 new slides whose labels are swapped: the same recipe learns worse; kept out.
    publish(36, swap=True)
    r2 = run_retrain(_bags_only(root, db, epochs=5), progress=False)
    p = r2.promotion
    assert r2.status == "kept" and not p["promoted"], p["reason"]
    assert p["delta"] < 0 and "does not beat the champion" in p["reason"]
    assert _versions(db, "fused-test") == ["1", "2", "3"] and _alias(db, "fused-test") == "2"
    assert len(p["challenger"]["folds"]) == len(p["champion"]["folds"]) == 3
    assert p["challenger"]["trained_slides"] == 36 and p["champion"]["trained_slides"] == first
    assert p["champion"]["version"] == "2" and p["challenger"]["version"] == "3"
    assert json.loads(storage.read_text(f"{r2.run_url}/promotion.json")) == json.loads(
        json.dumps(p, default=float))
    assert "KEPT" in storage.read_text(f"{r2.run_url}/summary.md")
    # Same cohort, same folds: every slide (new ones too) is tested once by both models,
    # and the champion's recipe trained on its own 18 slides only.
    folds = {run: storage.read_text(f"{r2.run_url}/{run}/folds.csv")
             for run in ("challenger", "champion")}
    assert folds["challenger"] == folds["champion"] and folds["champion"].count("\n") == 37
    # The decision, both metrics and the reason in MLflow: tags, metrics, promotion.json.
    client = _client(db)
    run = client.get_run(p["mlflow_run_id"])
    assert run.data.tags["fusedist.retrain.decision"] == "kept"
    assert run.data.tags["fusedist.retrain.reason"] == p["reason"]
    assert run.data.metrics["champion_auc"] == pytest.approx(p["champion"]["mean"])
    assert run.data.metrics["challenger_auc"] == pytest.approx(p["challenger"]["mean"])
    logged = client.download_artifacts(run.info.run_id, "promotion.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["reason"] == p["reason"]
    assert "champion" not in client.get_model_version("fused-test", "3").aliases

    # 3. The labels fixed and a stronger recipe on all 36 slides: better, promoted. The first
    # attempt dies when it registers the challenger; the next run resumes it (same run id,
    # the folds of both fuse runs kept) and finishes.
    publish(36)
    from fusedist.retrain.registry import Registry

    real = Registry.register_fused

    def dies(*a, **kw):
        raise RuntimeError("killed")

    Registry.register_fused = dies
    try:
        with pytest.raises(RuntimeError, match="killed"):
            run_retrain(_bags_only(root, db, epochs=10), progress=False)
    finally:
        Registry.register_fused = real
    pending = json.loads(storage.read_text(f"{root}/retrain/_state/pending.json"))
    folds = f"{root}/retrain/runs/{pending['run_id']}/challenger/_state/fold-00.json"
    done = storage.read_text(folds)
    card = f"{root}/retrain/runs/{pending['run_id']}/challenger/model/card.json"
    refit_at = storage._head(card)["LastModified"]
    r3 = run_retrain(_bags_only(root, db, epochs=10), progress=False)
    assert r3.run_id == pending["run_id"] and storage.read_text(folds) == done
    assert storage._head(card)["LastModified"] == refit_at  # the finished refit is kept too
    assert not storage.exists(f"{root}/retrain/_state/pending.json")
    assert r3.status == "promoted", r3.promotion["reason"]
    assert r3.promotion["delta"] > 0 and _alias(db, "fused-test") == "4"
    runs_before = len(client.search_runs([run.info.experiment_id]))
    listing = storage.walk_files(root)

    # 4. Nothing new: no run, no version, not one object written.
    r4 = run_retrain(_bags_only(root, db, epochs=10), progress=False)
    assert (r4.status, r4.message) == ("nothing", NOTHING)
    assert _versions(db, "fused-test") == ["1", "2", "3", "4"] and \
        _alias(db, "fused-test") == "4"
    assert len(client.search_runs([run.info.experiment_id])) == runs_before
    assert storage.walk_files(root) == listing


# ----------------------------------------------------------- ingest (pixels, local)

def _pipeline(work: Path, db: Path) -> dict:
    return {
        "slides": str(work / "slides"), "labels": str(work / "slides" / "labels.csv"),
        "output": str(work / "retrain"),
        "tile": {"pairs": {"output": str(work / "tiles"), "dataset": "pairs", "mode": "pairs",
                           "samples_per_shard": 64, "min_tissue": 0.1},
                 "grid": {"output": str(work / "tiles"), "dataset": "grid", "mode": "grid",
                          "samples_per_shard": 64}},
        "cache": {"pairs": {"tiles": str(work / "tiles/pairs"),
                            "output": str(work / "features"), "teachers": ["test-vit"],
                            "engine": {"batch_size": 32}}},
        "embed": {"grid": {"tiles": str(work / "tiles/grid"), "output": str(work / "bags"),
                           "encoders": ["test-vit", "test-convnext"],
                           "engine": {"batch_size": 32}}},
        "fuse": {"bags": str(work / "bags"), "folds": 2, "inner_folds": 2, "methods": [],
                 "experts": {"epochs": 2, "hidden": 32}, "heatmaps": 0,
                 # This recipe (2 epochs on 8 slides) exercises ingestion, not a model that
                 # fits: the flat-refit check is off.
                 "final": {"methods": ["expert.test-vit"], "min_spread": 0}},
        "registry": {"fused_model": "fused-ingest"},
        "mlflow": {"tracking_uri": f"sqlite:///{db}"}}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_cluster):
    """8 synthetic slides through a first retrain (tile, cache, embed, fuse: promoted), then
    4 more slides and a second retrain; the files of before and after."""
    from fusedist.retrain.job import run_retrain
    from fusedist.synth import SynthConfig, synthesize

    tmp = tmp_path_factory.mktemp("ingest")
    work, db = tmp / "work", tmp / "mlflow.db"
    recipe = tmp / "retrain.yaml"
    recipe.write_text(yaml.safe_dump(_pipeline(work, db)))
    cfg = RetrainConfig.model_validate(_pipeline(work, db))
    synth = {"output": str(work / "slides"), "size": 3072, "seed": 0}
    synthesize(SynthConfig(num_slides=8, **synth), progress=False)
    first = run_retrain(cfg, progress=False)
    before = {d: _snapshot(work / d) for d in ("tiles", "features", "bags")}
    synthesize(SynthConfig(num_slides=12, **synth), progress=False)  # 4 new slides
    second = run_retrain(cfg, progress=False)
    after = {d: _snapshot(work / d) for d in ("tiles", "features", "bags")}
    return {"work": work, "db": db, "recipe": recipe, "first": first, "second": second,
            "before": before, "after": after}


NEW = [f"synth-{i:04d}" for i in range(8, 12)]


def test_new_slides_are_ingested_and_nothing_else_is_touched(ingested):
    first, second = ingested["first"], ingested["second"]
    assert first.status == "promoted" and len(first.ingest["new_slides"]) == 8
    assert second.ingest["new_slides"] == NEW
    assert second.ingest["failed"] == []
    # Tiles (pairs and grid), teacher features and bags of those 4 slides only...
    assert second.ingest["shards_written"]["grid"] >= 4
    assert second.ingest["features_written"]["pairs"] == second.ingest["shards_written"]["pairs"]
    assert second.ingest["bags_written"]["grid"] == 4 * 2  # 2 encoders
    for d in ("tiles", "features", "bags"):
        before, after = ingested["before"][d], ingested["after"][d]
        # ...every earlier file has the same bytes and was not even rewritten...
        changed = [p for p, v in before.items() if after.get(p) != v]
        assert changed == [], (d, changed[:5])
        # ...and every file added belongs to a new slide.
        added = sorted(set(after) - set(before))
        assert added and all(any(s in p for s in NEW) for p in added), (d, added[:10])
    for enc in ("test-vit", "test-convnext"):
        assert sorted(p.stem for p in (ingested["work"] / "bags" / enc).glob("*.h5")) == [
            f"synth-{i:04d}" for i in range(12)]
    # The challenger fused model was trained on all 12 slides, the champion scored on them.
    p = second.promotion
    assert p["challenger"]["trained_slides"] == 12 and p["champion"]["trained_slides"] == 8
    assert _versions(ingested["db"], "fused-ingest") == ["1", "2"]


def test_a_second_run_with_no_new_slides_changes_nothing(ingested):
    work, db = ingested["work"], ingested["db"]
    whole = _snapshot(work, skip=())
    env = dict(os.environ, FUSEDIST_LOG_DIR=str(work.parent / "logs"))
    r = subprocess.run([sys.executable, "-m", "fusedist.cli", "retrain", "-q", "-c",
                        str(ingested["recipe"])], capture_output=True, text=True, cwd=REPO,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no new slides; champion kept" in r.stdout
    assert _snapshot(work, skip=()) == whole
    assert _versions(db, "fused-ingest") == ["1", "2"]


def test_lineage_leads_from_the_registered_model_to_its_tiles(ingested):
    """MLflow datasets link the runs: the registered challenger's run lists the labels and
    bags it was fitted on; the embed run that wrote those bags (same name and digest) lists
    the tile dataset it read, the cache run the tiles and the features it wrote."""
    from tests.test_tracking import _run_datasets

    work, client = ingested["work"], _client(ingested["db"])
    mv = client.get_model_version("fused-ingest", "2")
    fitted = _run_datasets(client, mv.run_id)
    labels = work / "slides" / "labels.csv"
    assert fitted["labels/labels.csv"] == (
        hashlib.sha256(labels.read_bytes()).hexdigest()[:32], str(labels), "input")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`fusedist.retrain.run_id` = '{ingested['second'].run_id}'")
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("fusedist.stage"), []).append(
            _run_datasets(client, r.info.run_id))
    (embed,) = by_stage["embed"]
    for enc in ("test-vit", "test-convnext"):
        name = f"bags/{enc}"
        assert fitted[name][2] == "input" and embed[name][2] == "output"
        assert fitted[name][:2] == embed[name][:2] == (embed[name][0], str(work / "bags" / enc))
        # The challenger's own fuse run read the same bags.
        assert any(d.get(name, ())[:2] == fitted[name][:2] for d in by_stage["fuse"])
    def manifest_sha(folder: Path) -> str:
        return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:32]

    assert embed["tiles/grid"] == (manifest_sha(work / "tiles" / "grid"),
                                   str(work / "tiles" / "grid" / "manifest.json"), "input")
    (cache,) = by_stage["cache"]
    assert cache["tiles/pairs"][0] == manifest_sha(work / "tiles" / "pairs")
    feats = work / "features" / "test-vit" / "pairs"
    assert cache["features/test-vit/pairs"] == (manifest_sha(feats),
                                                str(feats / "manifest.json"), "output")


def test_patient_keyed_labels_are_retrained_on_patient_folds(ingested, tmp_path):
    """A clinical table keyed by patient_id with ``fuse.slides`` a slide table: the cohort is
    the labelled patients' slides with bags, one sample per patient; the champion and the
    challenger are scored on the same patient folds; a grown slide table is a new input.
    Reuses the ingested bags (12 slides, 2 encoders): first 8 patients of one slide each,
    then the 4 newer slides join patients 0-3."""
    from fusedist.retrain.job import NOTHING, run_retrain

    work = ingested["work"]
    rows = list(csv.DictReader(open(work / "slides" / "labels.csv", newline="")))
    ids = [r["slide_id"] for r in rows]
    assert len(ids) == 12
    clinical, table = tmp_path / "clinical.csv", tmp_path / "slides.csv"
    clinical.write_text("patient_id,label\n" + "".join(
        f"case-{i:02d},{rows[i]['label']}\n" for i in range(8)))

    def slide_table(n: int) -> None:
        table.write_text("slide_id,path,patient_id\n" + "".join(
            f"{ids[i]},{ids[i]}.svs,case-{i % 8:02d}\n" for i in range(n)))

    recipe = _pipeline(work, tmp_path / "mlflow.db")
    recipe = {"labels": str(clinical), "output": str(tmp_path / "retrain"),
              "fuse": {**recipe["fuse"], "slides": str(table)},
              "registry": {"fused_model": "fused-patients"}, "mlflow": recipe["mlflow"]}
    cfg = RetrainConfig.model_validate(recipe)
    no_table = RetrainConfig.model_validate({**recipe, "fuse": {**recipe["fuse"],
                                                                "slides": None}})
    with pytest.raises(ConfigError, match="keyed by patient_id; set fuse.slides"):
        run_retrain(no_table, progress=False)
    assert not (tmp_path / "retrain").exists()  # refused before any work

    slide_table(8)
    first = run_retrain(cfg, progress=False)
    assert first.status == "promoted", first.message
    assert first.promotion["challenger"]["trained_patients"] == 8

    slide_table(12)  # only the slide table changed: a run is due
    second = run_retrain(cfg, progress=False)
    p = second.promotion
    assert second.status in ("promoted", "kept") and p["decision"] == second.status, p
    assert (p["challenger"]["trained_slides"], p["challenger"]["trained_patients"]) == (12, 8)
    assert (p["champion"]["trained_slides"], p["champion"]["trained_patients"]) == (8, 8)
    assert len(p["challenger"]["folds"]) == len(p["champion"]["folds"]) == 2
    folds = {run: list(csv.DictReader(open(Path(second.run_url) / run / "folds.csv")))
             for run in ("challenger", "champion")}
    assert folds["challenger"] == folds["champion"] and len(folds["champion"]) == 8
    pooled = {r["patient_id"]: r["slide_id"] for r in folds["champion"]}
    assert pooled["case-00"] == ";".join(sorted([ids[0], ids[8]]))
    assert "(8 patients)" in (Path(second.run_url) / "summary.md").read_text()
    third = run_retrain(cfg, progress=False)  # nothing changed since
    assert (third.status, third.message) == ("nothing", NOTHING)

    # Slide-keyed labels against the patient champion: its folds are per patient, the
    # challenger's per slide, so no score compares them; --force-promote replaces it.
    per_slide = RetrainConfig.model_validate({**recipe, "labels": str(work / "slides" /
                                                                      "labels.csv")})
    with pytest.raises(ConfigError, match="predicts patients, the challenger slides.*"
                                          "--force-promote"):
        run_retrain(per_slide, progress=False)
    forced = run_retrain(per_slide, progress=False, force_promote=True)
    assert forced.status == "promoted", forced.message


# ------------------------------------------------------------------------- student

def test_student_warm_start_and_validation_score(ingested, tmp_path):
    """Unit level (a full distillation is left out of the suite for time): the warm start
    loads the champion's exported backbone exactly; the students are scored on the validation
    slides both distillations held out, by linear CKA to the teacher (the same student scores
    the same, within [0, 1])."""
    import torch

    from fusedist.distill.config import DistillConfig
    from fusedist.distill.export import export_student
    from fusedist.models.student import XmagStudent
    from fusedist.retrain.student import (MIN_PAIRS, evaluation_slides, linear_cka,
                                          score_students, validation_shards, warm_start)

    work = ingested["work"]
    pairs = json.loads((work / "tiles/pairs/manifest.json").read_text())
    with_pairs = sorted({s["slide_id"] for s in pairs["shards"]})
    assert len(with_pairs) >= 8
    a, b, c, d = with_pairs[:4]
    torch.manual_seed(5)
    champion = XmagStudent.from_registry("test-vit", teacher_dim=64)
    with torch.no_grad():  # not the registry's seeded init: the test must see these weights
        for p in champion.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = export_student(champion, str(tmp_path / "champion"), {
        "teacher": "test-vit", "validation": {"slides": with_pairs, "global_cos": 0.5}})
    distill = DistillConfig(tiles=str(work / "tiles/pairs"),
                            features=str(work / "features/test-vit/pairs"),
                            student={"name": "test-vit"})
    warm = warm_start(distill, "champion", folder)
    assert warm.student.weights == str(Path(folder).resolve() / "model.safetensors")
    assert warm_start(distill, "base", folder).student.weights is None
    loaded = XmagStudent.from_registry("test-vit", teacher_dim=64, weights=warm.student.weights)
    for (k, x), (_, y) in zip(champion.backbone.state_dict().items(),
                              loaded.backbone.state_dict().items()):
        assert torch.equal(x, y), k
    other = distill.model_copy(update={"student": distill.student.model_copy(
        update={"name": "test-vit-reg"})})
    with pytest.raises(ConfigError, match="backbone"):
        warm_start(other, "champion", folder)

    # Evaluation slides: held out of both; else the challenger's, said so; else none.
    champ_card = {"validation": {"slides": [a, b, c]}}
    assert evaluation_slides(champ_card, {"validation": {"slides": [b, c, d]}})[0] == [b, c]
    only, note = evaluation_slides(champ_card, {"validation": {"slides": [d]}})
    assert only == [d] and "may have trained on them" in note
    assert evaluation_slides(champ_card, {})[0] == []
    assert validation_shards(distill.tiles, [b]) == [
        s["name"] for s in pairs["shards"] if s["slide_id"] == b]
    x = np.random.default_rng(0).normal(size=(20, 8))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ np.random.default_rng(1).normal(size=(8, 8))) < 1.0
    same = score_students(distill, {"champion": folder, "challenger": folder}, 64)
    assert same["slides"] == with_pairs and same["delta"] == pytest.approx(0.0)
    assert 0.0 <= same["champion"]["cka"] <= 1.0 and same["champion"]["pairs"] >= MIN_PAIRS
    assert same["champion"]["card_validation"]["global_cos"] == 0.5
    # Too few held-out pairs for a CKA: no score, and the note says why.
    few = export_student(champion, str(tmp_path / "few"), {
        "teacher": "test-vit", "validation": {"slides": [a]}})
    none = score_students(distill, {"champion": folder, "challenger": few}, 64)
    assert none["delta"] is None and "no student score" in none["note"]
