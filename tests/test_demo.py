"""`fusedist demo` (small): synthetic slides -> tiles (pairs + grid) -> reader -> report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_small_demo_end_to_end(ray_cluster, tmp_path):
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "fusedist.cli", "demo", "--storage", str(work),
                        "--num-slides", "3", "--size", "4096", "-q"], capture_output=True,
                       text=True, cwd=REPO, timeout=600,
                       env=dict(os.environ, RAY_ADDRESS=ray_cluster))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Report: {work}/report.md" in r.stdout
    labels = (work / "slides" / "labels.csv").read_text().splitlines()
    assert labels[0].startswith("slide_id,") and len(labels) == 4
    for mode, members in (("pairs", {"hi.jpg", "lo.jpg"}), ("grid", {"img.jpg"})):
        m = json.loads((work / "tiles" / mode / "manifest.json").read_text())
        assert m["mode"] == mode and m["totals"]["slides_ok"] == 3 and m["totals"]["tiles"] > 0
        assert len(list((work / "tiles" / mode / "thumbnails").glob("*.png"))) == 3
    report = (work / "report.md").read_text()
    pairs = json.loads((work / "tiles" / "pairs" / "manifest.json").read_text())
    assert f"streamed {pairs['totals']['tiles']} samples" in report
    for teacher in ("test-vit", "test-vit-reg"):
        feats = json.loads((work / "features" / teacher / "pairs" / "manifest.json").read_text())
        assert feats["totals"]["samples"] == pairs["totals"]["tiles"]
    for enc in ("test-vit", "test-convnext"):
        assert len(list((work / "bags" / enc).glob("*.h5"))) == 3
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
    # Two embed runs: the test encoders (2 x 3 bags), then the exported student (3 bags).
    assert sorted(r.data.metrics["bags_written"] for r in by_stage["embed"]) == [3, 6]
    # The XMAG student was trained (2 workers), exported, registered, and embedded the slides.
    card = json.loads((work / "runs" / "xmag-demo" / "export" / "card.json").read_text())
    assert card["mpp"] == 2.0 and card["teacher"] == "test-vit"
    assert len(list((work / "bags" / card["name"]).glob("*.h5"))) == 3
    distill = by_stage["distill"][0].data.metrics
    assert distill["steps_total"] >= 1 and "loss" in distill
    versions = client.search_model_versions("name='xmag-student'")
    assert versions and client.get_model_version_by_alias("xmag-student", "champion")
