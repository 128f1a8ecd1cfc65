"""`fusedist demo` (small): synthetic slides -> tiles (pairs + grid) -> reader -> cache ->
embed -> distill -> embed with the student -> fuse -> predict -> report, on local files and on
S3 (moto), on a GDC-shaped cohort (UUID folders, TCGA ids with dots) with nothing renamed by
hand: read from its slide table, labelled per patient by its clinical table."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.s3util import moto_server, s3_bucket  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_small_demo_end_to_end(ray_cluster, tmp_path):
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "fusedist.cli", "demo", "--storage", str(work),
                        "--num-slides", "12", "--size", "3072",
                        # Each of the demo's tiny epochs is one step (and a checkpoint): a
                        # few are enough to check the run; the default demo trains 200.
                        "--set", "distill_steps=6", "-q"],
                       capture_output=True, text=True, cwd=REPO, timeout=900,
                       env=dict(os.environ, RAY_ADDRESS=ray_cluster,
                                FUSEDIST_LOG_DIR=str(tmp_path / "logs")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Report: {work}/report.md" in r.stdout
    # Ray's own chatter (Train's State-API warnings, Data's progress dumps, worker output)
    # is in the run's log file, not on the terminal.
    for noise in ("State API", "Failed to query Ray Train Controller", "Running Dataset",
                  "(RayTrainWorker pid=", "(PlacementGroupCleaner"):
        assert noise not in r.stdout and noise not in r.stderr, noise
    labels = (work / "slides" / "labels.csv").read_text().splitlines()
    assert labels[0].startswith("slide_id,patient_id,") and len(labels) == 13
    # A GDC-shaped cohort (the demo's default layout): one UUID folder per slide, TCGA ids
    # with dots, patient = the first 12 characters, two slides for some patients; labels
    # written from the file names; nothing renamed anywhere below.
    ids = [ln.split(",")[0] for ln in labels[1:]]
    assert all(i.startswith("TCGA-") and "-01Z-00-DX" in i and "." in i for i in ids)
    assert all(ln.split(",")[1] == ln[:12] for ln in labels[1:])
    assert len({i[:12] for i in ids}) < len(ids)
    files = sorted((work / "slides").glob("*/*.svs"))
    assert sorted(f.stem for f in files) == sorted(ids) and len({f.parent for f in files}) == 12
    # The tables a TCGA user has: a slide table (paths relative to it) and a clinical table,
    # one row per patient, that the patient's slides' labels agree with.
    table = _csv(work / "slides" / "slides.csv")
    assert [r["slide_id"] for r in table] == ids
    assert all(r["patient_id"] == r["slide_id"][:12] for r in table)
    assert sorted(work / "slides" / r["path"] for r in table) == files
    clinical = {r["patient_id"]: r for r in _csv(work / "slides" / "clinical.csv")}
    assert len(clinical) == len({i[:12] for i in ids}) == 11  # seed 0: one patient has two
    slide_labels = {r["slide_id"]: r for r in _csv(work / "slides" / "labels.csv")}
    assert all(clinical[s[:12]]["label"] == r["label"] and clinical[s[:12]]["time"] == r["time"]
               for s, r in slide_labels.items())
    # synth.yaml is the recipe of these slides: synthesizing it again redraws nothing.
    import yaml

    from fusedist.synth import SynthConfig, synthesize

    recipe = SynthConfig.model_validate(yaml.safe_load((work / "synth.yaml").read_text()))
    assert (recipe.output, recipe.layout, recipe.num_slides) == (str(work / "slides"), "gdc", 12)
    assert all(r["skipped"] for r in synthesize(recipe, progress=False))
    for mode in ("pairs", "grid"):
        m = json.loads((work / "tiles" / mode / "manifest.json").read_text())
        assert m["mode"] == mode and m["totals"]["slides_ok"] >= 6 and m["totals"]["tiles"] > 0
        # Tiled from the slide table: ids verbatim, and its patients (a folder has none).
        assert {r["slide_id"] for r in m["slides"]} <= set(ids)
        used = _csv(work / "tiles" / mode / "slides.csv")
        assert sorted((r["slide_id"], r["patient_id"]) for r in used) == \
            sorted((i, i[:12]) for i in ids)
    grid = json.loads((work / "tiles" / "grid" / "manifest.json").read_text())
    assert grid["totals"]["slides_ok"] == 12
    assert len(list((work / "tiles" / "grid" / "thumbnails").glob("*.png"))) == 12
    report = (work / "report.md").read_text()
    assert "**RANDOM WEIGHTS: test-" in report  # the demo's models are seeded random
    pairs = json.loads((work / "tiles" / "pairs" / "manifest.json").read_text())
    assert f"streamed {pairs['totals']['tiles']} samples" in report
    for teacher in ("test-vit", "test-vit-reg"):
        feats = json.loads((work / "features" / teacher / "pairs" / "manifest.json").read_text())
        assert feats["totals"]["samples"] == pairs["totals"]["tiles"]
    for enc in ("test-vit", "test-convnext"):
        assert sorted(p.stem for p in (work / "bags" / enc).glob("*.h5")) == sorted(ids)
    # MLflow runs with metrics, in the demo's own store.
    from mlflow.tracking import MlflowClient

    assert "mlflow ui --backend-store-uri sqlite:///" in r.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fusedist")
    runs = client.search_runs([exp.experiment_id])
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("fusedist.stage"), []).append(run)
    (cache,) = by_stage["cache"]
    assert cache.data.metrics["tiles"] == pairs["totals"]["tiles"]
    assert cache.data.tags["fusedist.random_weights"] == "true"
    # Two embed runs: the test encoders (2 x 12 bags), then the exported student (the slides
    # large enough for a 5x tile); two more for the held-out slides (predict, below).
    embeds = [r for r in by_stage["embed"] if r.info.run_name != "embed (predict --slides)"]
    written = sorted(r.data.metrics["bags_written"] for r in embeds)
    assert len(embeds) == 2 and written[1] == 24 and 6 <= written[0] <= 12
    # The XMAG student was trained (2 workers), exported, registered, and embedded the slides.
    card = json.loads((work / "runs" / "xmag-demo" / "export" / "card.json").read_text())
    assert card["mpp"] == 2.0 and card["teacher"] == "test-vit"
    n_student = len(list((work / "bags" / card["name"]).glob("*.h5")))
    assert n_student == written[0]
    distill = by_stage["distill"][0].data.metrics
    assert distill["steps_total"] == 6 and "loss" in distill
    versions = client.search_model_versions("name='xmag-student'")
    assert versions and client.get_model_version_by_alias("xmag-student", "champion")
    # Fuse: both tasks per patient (clinical.csv through slides.csv), every method family,
    # the student as an expert, tables and plots in the report, metrics in MLflow; slides
    # without a student bag are left out of their patient's pool with a reason.
    for task, metric, plot in (("classification", "auc", "roc.png"),
                               ("survival", "c_index", "km.png")):
        assert f"## Fusion: {task}" in report
        assert f"(fuse/{task}/plots/{plot})" in report
        assert (work / "fuse" / task / "plots" / plot).stat().st_size > 1000
        rows = (work / "fuse" / task / "results.csv").read_text()
        for m in ("logitprod", "best_expert", "mean_ensemble", "concat", "meta.token_attention",
                  f"expert.{card['name']}"):
            assert f"\n{m}," in rows, (task, m)
        assert ("\nfusecpath," in rows) == (task == "classification")
        manifest = json.loads((work / "fuse" / task / "manifest.json").read_text())
        # The bags came from random-weight test encoders: the fuse report says so.
        assert "RANDOM WEIGHTS: " in (work / "fuse" / task / "report.md").read_text()
        assert any(n.startswith("RANDOM WEIGHTS: ") for n in manifest["notes"])
        assert len(manifest["slides"]) == n_student and set(manifest["slides"]) <= set(ids)
        assert manifest["unit"] == "patient" and set(manifest["patients"]) <= set(clinical)
        assert all(s[:12] == p for p, ss in manifest["patients"].items() for s in ss)
        assert manifest["exclusions"] and all("bag for every encoder" in x["reason"]
                                              for x in manifest["exclusions"])
        assert manifest["feature_group"] == ["test-convnext", "test-vit"]
        # Folds per patient: one row each, a pooled patient's slides joined by ";".
        folds = _csv(work / "fuse" / task / "folds.csv")
        assert [f["patient_id"] for f in folds] == list(manifest["patients"])
        assert [f["slide_id"] for f in folds] == [";".join(v)
                                                  for v in manifest["patients"].values()]
        (fuse,) = [x for x in by_stage["fuse"] if x.data.tags["fusedist.task"] == task]
        assert f"logitprod/{metric}_mean" in fuse.data.metrics
    # Attention heatmaps of one sample (heatmaps: 1), a patient: each expert over each of its
    # slides (``attention_<expert>_<slide_id>.png``).
    shown = [p.stem.split("_", 2)[1:] for p in
             (work / "fuse" / "classification" / "plots").glob("attention_*")]
    slides_shown = {s for _, s in shown}
    assert len({s[:12] for s in slides_shown}) == 1 and slides_shown <= set(ids)
    assert len(shown) == 3 * len(slides_shown)
    # predict --slides: the classification model (per patient) on 4 held-out slides of 3
    # patients (another seed, not in the labels), tiled and embedded as its card records from
    # heldout/slides.csv, which also groups them: one prediction per patient.
    held = _csv(work / "heldout" / "labels.csv")
    assert len(held) == 4 and all(h["slide_id"].startswith("TCGA-") for h in held)
    truth = {r["patient_id"]: r["label"] for r in _csv(work / "heldout" / "clinical.csv")}
    assert sorted(truth) == sorted({h["patient_id"] for h in held}) and len(truth) == 3
    pred = json.loads((work / "predict" / "manifest.json").read_text())
    assert pred["predicted"] == sorted(truth) and not pred["failed"]
    assert pred["slides"] == str(work / "heldout" / "slides.csv")
    for enc in ("test-vit", "test-convnext", card["name"]):
        assert len(list((work / "predict" / "bags" / enc).glob("TCGA-*.h5"))) == 4
    body = _csv(work / "predict" / "predictions.csv")
    primary = pred["methods"][0]
    mine = {r["patient_id"]: r for r in body if r["method"] == primary}
    assert sorted(mine) == sorted(truth)
    for p, r in mine.items():  # a patient's slides pooled into one row, ids joined by ";"
        assert r["slide_id"] == ";".join(sorted(h["slide_id"] for h in held
                                                if h["patient_id"] == p))
    assert max(r["slide_id"].count(";") for r in mine.values()) == 1
    assert "## Held-out slides: `fusedist predict --slides`" in report
    assert "(predict/heatmaps/)" in report and (work / "predict" / "heatmaps").is_dir()
    table = [ln for ln in report.splitlines() if ln.startswith("| TCGA-")]
    assert len(table) == 3
    for p, line in zip(sorted(truth), table):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [p, str(mine[p]["slide_id"].count(";") + 1), truth[p],
                             mine[p]["predicted"]]
        probs = [float(c) for c in cells[4:4 + 2]]
        assert abs(sum(probs) - 1) < 2e-3
        weights = [float(c) for c in cells[4 + 2:]]
        assert len(weights) == 3 and abs(sum(weights) - 1) < 3e-3
    # Heatmaps per slide, a pooled patient's attention split back onto each of its slides.
    assert len(list((work / "predict" / "heatmaps").glob("*TCGA-*.png"))) >= 4
    # The held-out patients' scores beside the CV estimate of the same method; the refit's
    # flat-check in the card, and in the report when it fired.
    right = sum(ln.strip("|").split("|")[2].strip() == ln.strip("|").split("|")[3].strip()
                for ln in table)
    (held_row,) = [ln for ln in report.splitlines()
                   if ln.startswith("| held-out patients (the refit model) |")]
    assert f"| {right / 3:.3f} | 3 (" in held_row
    assert f"| `{primary}` | AUC |" in report
    assert "| cross-validation (mean ± std over folds) |" in report
    mcard = json.loads((work / "fuse" / "classification" / "model" / "card.json").read_text())
    assert mcard["unit"] == "patient" and set(mcard["refit"]["checks"]) == set(mcard["methods"])
    assert ("**FLAT REFIT" in report) == bool(mcard["refit"]["flat"])


def test_demo_on_s3(ray_cluster, s3_bucket, moto_server, tmp_path):
    """`--storage s3://...`: every stage reads and writes the bucket (moto), the report too;
    the slide tables' relative paths resolve to the bucket."""
    from fusedist import storage

    url = f"{s3_bucket}/run1"
    r = subprocess.run([sys.executable, "-m", "fusedist.cli", "demo", "--storage", url,
                        "--num-slides", "12", "--size", "3072", "--set", "distill_steps=2",
                        # The local demo covers the stages' breadth; here each stage only has
                        # to read and write the bucket, so the cheapest shape of each: 3
                        # held-out slides still make one patient of two slides.
                        "--set", "fuse_tasks=[classification]", "--set", "fuse_folds=2",
                        "--set", "teachers=[test-vit]", "--set", "distill_workers=1",
                        "--set", "heldout_slides=3",
                        "--set", f"storage.endpoint_url={moto_server}",
                        "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                        "-q"], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env=dict(os.environ, RAY_ADDRESS=ray_cluster))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Report: {url}/report.md" in r.stdout
    report = storage.read_text(f"{url}/report.md")

    def table(key: str) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(storage.read_text(f"{url}/{key}"))))

    assert "## Fusion: classification" in report and "| LogitProd |" in report
    assert len(storage.listdir(f"{url}/bags/test-vit", ".h5")) == 12
    # Tiled from slides/slides.csv in the bucket: its relative paths became the bucket's
    # URLs, its patients came along.
    used = table("tiles/grid/slides.csv")
    assert len(used) == 12 and all(u["path"].startswith(f"{url}/slides/") and
                                   u["patient_id"] == u["slide_id"][:12] for u in used)
    assert storage.exists(f"{url}/runs/xmag-demo/export/card.json")
    assert "fusecpath" in storage.read_text(f"{url}/fuse/classification/results.csv")
    assert storage.exists(f"{url}/fuse/classification/plots/roc.png")
    assert storage.read_json(f"{url}/fuse/classification/manifest.json")["unit"] == "patient"
    # predict --slides read the held-out slide table from the bucket and wrote its table
    # there: one row per patient, the two-slide patient's ids joined by ";".
    rows = [x for x in table("predict/predictions.csv")
            if x["method"] == storage.read_json(f"{url}/predict/manifest.json")["methods"][0]]
    held = table("heldout/labels.csv")
    assert len(held) == 3 and all(h["slide_id"].startswith("TCGA-") for h in held)
    assert sorted(x["patient_id"] for x in rows) == sorted({h["patient_id"] for h in held})
    assert sorted(x["slide_id"].count(";") for x in rows) == [0, 1]
    assert {s for x in rows for s in x["slide_id"].split(";")} == {h["slide_id"] for h in held}
    assert not (tmp_path / "run1").exists() and not any(tmp_path.glob("demo-output*"))
