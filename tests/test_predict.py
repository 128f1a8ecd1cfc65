"""`fusedist predict`: a fused model applied to bags through the real CLI. Its predictions
equal the loaded model's on the same slides (so also the refitted one's: see
test_fusion_model), a re-run resumes per slide with the same output, a damaged bag fails
only its slide (exit 1), and bags of other encoder weights are refused naming the encoder."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import load_cohort
from fusedist.fusion.fold import fold_context, prepare_methods, select_methods
from fusedist.fusion.model import load_model, refit, write_model
from fusedist.synth.cohort import synthetic_cohort

from .test_fuse import TINY


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedist.cli", "predict", "-q", *args],
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A classification model (LogitProd + FuseCPath + a Meta-Encoder) on 18 slides."""
    tmp = tmp_path_factory.mktemp("predict")
    co = synthetic_cohort(str(tmp / "cohort"), num_slides=18, tiles=(10, 20), seed=6)
    tiny = {**TINY, "experts": {**TINY["experts"], "epochs": 2},
            "logitprod": {**TINY["logitprod"], "max_epochs": 20},
            "meta": {**TINY["meta"], "strategies": ["self_attention"], "epochs": 1},
            "fold_cpus": 1}
    cfg = FuseConfig(bags=co.bags, labels=co.labels, output=str(tmp / "fuse"), **tiny)
    c = load_cohort(cfg)
    rows, _ = select_methods(cfg, c)
    rows = [m for m in rows if m.name in ("logitprod", "fusecpath", "meta.self_attention")]
    prepared, _ = prepare_methods(rows, c, cfg, progress=False)
    url = write_model(str(tmp / "model"), c, cfg, refit(c, cfg, rows, prepared), {})
    ctx = fold_context(c, cfg, np.arange(18), np.arange(0), -1, prepared)
    expected = load_model(url).predict(ctx.inputs(np.arange(18)))
    return co, c, url, expected, tmp


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_on_bags_matches_the_model_and_resumes(fused):
    co, c, url, expected, tmp = fused
    out = tmp / "pred"
    p = _cli("--model", url, "--bags", co.bags, "--output", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 18 * 3
    for r in rows:
        i = c.slide_ids.index(r["slide_id"])
        want = expected[r["method"]].pred[i]
        got = np.array([float(r[f"prob_{k}"]) for k in c.classes])
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=r["method"])
        assert r["predicted"] == c.classes[int(np.argmax(want))]
        if r["method"] == "logitprod":
            w = np.array([float(r[f"weight_{e}"]) for e in c.encoders])
            np.testing.assert_allclose(w.sum(), 1.0, atol=1e-4)
    assert len(list((out / "heatmaps").glob("*.png"))) == 18 * 3
    assert "18 slide(s) predicted, 0 failed" in (out / "summary.md").read_text()

    # Resume: lose one slide's state and the table; the re-run redoes that slide only.
    before = (out / "predictions.csv").read_text()
    (out / "_state" / f"{c.slide_ids[4]}.json").unlink()
    (out / "predictions.csv").unlink()
    mtimes = {f.name: f.stat().st_mtime_ns for f in (out / "_state").iterdir()}
    p = _cli("--model", url, "--bags", co.bags, "--output", str(out), "--set", "heatmaps=false")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "predictions.csv").read_text() == before
    assert all((out / "_state" / n).stat().st_mtime_ns == t for n, t in mtimes.items())


def test_a_bad_bag_fails_its_slide_and_other_weights_are_refused(fused):
    co, c, url, _, tmp = fused
    bags = tmp / "bags-bad"
    shutil.copytree(co.bags, bags)
    bad = c.slide_ids[2]
    (bags / "test-color" / f"{bad}.h5").write_bytes(b"not an h5 file")
    p = _cli("--model", url, "--bags", str(bags), "--output", str(tmp / "pred-bad"),
             "--set", "heatmaps=false")
    assert p.returncode == 1, p.stderr[-3000:]
    manifest = json.loads((tmp / "pred-bad" / "manifest.json").read_text())
    assert [f["slide_id"] for f in manifest["failed"]] == [bad]
    assert "test-color" in manifest["failed"][0]["reason"]
    assert len(manifest["predicted"]) == 17
    assert bad in p.stderr

    # Bags embedded with other weights: refused, naming the encoder and the fix (exit 2).
    other = tmp / "bags-other"
    shutil.copytree(co.bags, other)
    for f in (other / "test-nuclei").iterdir():
        with h5py.File(f, "r+") as h:
            h.attrs["weights_digest"] = "0" * 64
    p = _cli("--model", url, "--bags", str(other), "--output", str(tmp / "pred-other"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "'test-nuclei' weights digest" in p.stderr and "re-embed" in p.stderr
