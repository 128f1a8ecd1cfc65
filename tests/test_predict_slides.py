"""`fusedist predict --slides`: a fused model on a 20x encoder and an exported 5x XMAG student,
trained on bags tiled with non-default tissue settings. Predicting the raw slides (tiled and
embedded as the card records) gives the same predictions.csv as predicting the training bags;
an unreadable slide and one without an mpp fail alone (exit 1); a re-run redoes nothing; a
card that lacks what re-embedding needs is refused naming the fix."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from fusedist.cli import app
from fusedist.config import ConfigError, load_config
from fusedist.predict import PredictConfig, run_predict
from tests.slides import known_slides, make_known_slide

from .test_fuse import TINY

STUDENT = "xmag-predict-slides-test"
# Not the tiler's defaults: predict --slides must replay these from the card, or its tiles
# (and so its predictions) differ from the training bags'.
RECIPES = {"test-vit": {"tile_mpp": 0.5, "min_tissue": 0.7, "tissue.min_area_um2": 2000.0},
           STUDENT: {"tile_mpp": 2.0, "min_tissue": 0.3}}


@pytest.fixture(scope="module")
def fused(tmp_path_factory, ray_cluster):
    from fusedist.distill.export import export_student
    from fusedist.features import EmbedConfig, run_embed
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import load_cohort
    from fusedist.fusion.fold import prepare_methods, select_methods
    from fusedist.fusion.model import refit, write_model
    from fusedist.models.student import XmagStudent
    from fusedist.tiling import TileConfig, run_tile

    d = tmp_path_factory.mktemp("predict-slides")
    slides = known_slides(d / "slides", 6, width=2240, height=1792)
    export = export_student(XmagStudent.from_registry("test-vit", teacher_dim=64),
                            str(d / "export"), {"name": STUDENT})
    for enc, ref in (("test-vit", "test-vit"), (STUDENT, export)):
        sets = [f"{k}={v}" for k, v in RECIPES[enc].items()] + ["mode=grid"]
        tiles = run_tile(load_config(TileConfig, None, sets, input=str(slides),
                                     output=str(d / "tiles"), dataset=enc), progress=False)
        run_embed(load_config(EmbedConfig, None, ["engine.batch_size=32",
                                                  "mlflow.enabled=false"],
                              tiles=tiles.dataset_url, output=str(d / "bags"), encoders=[ref]),
                  progress=False)
    labels = d / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i},{'ab'[i % 2]}\n" for i in range(6)))
    tiny = {**TINY, "inner_folds": 2, "experts": {**TINY["experts"], "epochs": 2},
            "logitprod": {**TINY["logitprod"], "max_epochs": 20}, "fold_cpus": 1}
    cfg = FuseConfig(bags=str(d / "bags"), labels=str(labels), output=str(d / "fuse"), **tiny)
    c = load_cohort(cfg)
    rows = [m for m in select_methods(cfg, c)[0] if m.name == "logitprod"]
    prepared, _ = prepare_methods(rows, c, cfg, progress=False)
    url = write_model(str(d / "model"), c, cfg, refit(c, cfg, rows, prepared), {})
    return d, url


def _predict(model: str, **kw) -> dict:
    kw = {"heatmaps": False, **kw}
    cfg = PredictConfig(model=model, mlflow={"enabled": False}, engine={"batch_size": 32},
                        **kw)
    return run_predict(cfg, progress=False)


def test_predict_slides_equals_predict_bags_and_a_broken_slide_fails_alone(fused, fixtures_dir,
                                                                          caplog):
    d, url = fused
    card = json.loads((d / "model" / "card.json").read_text())
    assert card["encoders"][STUDENT]["ref"] == str(d / "export")  # where to rebuild it
    assert card["encoders"]["test-vit"]["tiling"]["min_tissue"] == 0.7
    assert card["encoders"]["test-vit"]["tiling"]["tissue"]["min_area_um2"] == 2000.0
    want = _predict(url, bags=str(d / "bags"), output=str(d / "pred-bags"))
    assert not want["failed"] and len(want["predicted"]) == 6

    new = d / "new-slides"
    shutil.copytree(d / "slides", new)
    shutil.copy(fixtures_dir / "unopenable.tiff", new / "broken.tiff")
    make_known_slide(new / "nompp.tiff", width=1024, height=1024, mpp=None)
    out = d / "pred-slides"
    with caplog.at_level(logging.INFO, logger="fusedist.models"):
        res = _predict(url, slides=str(new), output=str(out), heatmaps=True)
    # This process builds each of the card's encoders once: the check that it is the card's
    # encoder hands the very object to embed (Ray actors, if any, build their own copies).
    builds = Counter(r.getMessage().split(":")[0] for r in caplog.records
                     if r.name == "fusedist.models" and ": weights from " in r.getMessage())
    assert builds == {f"encoder {e}": 1 for e in card["encoders"]}, builds
    assert ((out / "predictions.csv").read_text()
            == (d / "pred-bags" / "predictions.csv").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["predicted"] == res["predicted"] == [f"s{i}" for i in range(6)]
    reasons = {f["slide_id"]: f["reason"] for f in manifest["failed"]}
    assert sorted(reasons) == ["broken", "nompp"]
    assert "[no_mpp]" in reasons["nompp"] and "mpp_override" in reasons["nompp"]
    assert reasons["broken"].startswith("tiling failed [unopenable]: ")
    assert reasons["broken"].count("tiling failed") == 1  # one slide, said once
    # The training bags again, written under the output; heatmaps over its tiling.
    from fusedist.formats.bags import read_bag

    for enc in ("test-vit", STUDENT):
        a = read_bag(str(out / "bags" / enc / "s3.h5"))
        b = read_bag(str(d / "bags" / enc / "s3.h5"))
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.attrs["tiling"] == b.attrs["tiling"]
    assert len(list((out / "heatmaps").glob("*_s*.png"))) == 6 * 2

    # Resume, through the CLI: nothing is tiled, embedded or predicted again, the table is the
    # same, and the two broken slides fail again (exit 1), named on stderr. A bag in the output
    # of a slide not in the folder (an earlier run's) is not predicted.
    for enc in ("test-vit", STUDENT):
        shutil.copy(out / "bags" / enc / "s0.h5", out / "bags" / enc / "gone.h5")
    mtimes = {f: f.stat().st_mtime_ns for f in [*out.rglob("*.tar"), *out.rglob("*.h5"),
                                                 *(out / "_state").glob("*.json")]}
    before = (out / "predictions.csv").read_text()
    r = CliRunner().invoke(app, ["predict", "-q", "--verbose", "--model", url, "--slides",
                                 str(new), "--output", str(out), "--set", "mlflow.enabled=false",
                                 "--set", "heatmaps=false"])
    assert r.exit_code == 1, r.output
    assert "6 slide(s) predicted, 2 failed" in r.stdout
    assert "failed broken:" in r.stderr and "failed nompp:" in r.stderr
    assert (out / "predictions.csv").read_text() == before
    assert len(mtimes) > 12 and all(f.stat().st_mtime_ns == t for f, t in mtimes.items())


def test_a_card_without_what_re_embedding_needs_is_refused_naming_the_fix(fused, tmp_path):
    d, url = fused
    model = tmp_path / "model"
    shutil.copytree(url, model)
    card = json.loads((model / "card.json").read_text())
    enc = card["encoders"][STUDENT]
    (model / "card.json").write_text(json.dumps({**card, "encoders": {
        **card["encoders"], STUDENT: {k: v for k, v in enc.items() if k != "mpp"}}}))
    with pytest.raises(ConfigError, match=rf"encoder '{STUDENT}' records no mpp.*"
                                          rf"encoders\.{STUDENT}\.mpp=.*--bags"):
        _predict(model=str(model), slides=str(d / "slides"), output=str(tmp_path / "p1"))
    # A moved export folder: the error says how to point at it; the override works.
    (model / "card.json").write_text(json.dumps({**card, "encoders": {
        **card["encoders"], STUDENT: {**enc, "ref": str(tmp_path / "gone")}}}))
    with pytest.raises(ConfigError, match=rf"{STUDENT}.*gone.*encoders\.{STUDENT}\.ref="):
        _predict(model=str(model), slides=str(d / "slides"), output=str(tmp_path / "p2"))
    cfg = PredictConfig(model=str(model), slides=str(d / "slides"),
                        encoders={STUDENT: str(d / "export")})
    from fusedist.predict.slides import plan_encoders

    assert {p.name: p.ref for p in plan_encoders(cfg, card)}[STUDENT] == str(d / "export")
