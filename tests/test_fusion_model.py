"""The fused model: refit on every labelled slide, saved (safetensors + card.json), loaded
back; the loaded model predicts exactly what the refitted one does, for every method and
task. In-process (no Ray): the refit is the fold's own code on all samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import load_cohort
from fusedist.fusion.fold import prepare_methods, select_methods
from fusedist.fusion.model import load_model, refit, write_model
from fusedist.synth.cohort import synthetic_cohort

from .test_fuse import TINY


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return synthetic_cohort(str(tmp_path_factory.mktemp("cohort")), num_slides=24,
                            tiles=(12, 24), seed=4)


@pytest.mark.parametrize("task,target", [("classification", "label"), ("survival", "label"),
                                         ("regression", "gene_*"),
                                         ("tile_classification", "label")])
def test_refit_save_load_gives_identical_outputs_for_every_method(cohort, tmp_path, task,
                                                                  target):
    tiny = {**TINY, "experts": {**TINY["experts"], "epochs": 1, "survival_epochs": 1},
            "logitprod": {**TINY["logitprod"], "max_epochs": 10},
            "meta": {**TINY["meta"], "strategies": ["self_attention", "contrastive"],
                     "epochs": 1}, "fold_cpus": 1}
    cfg = FuseConfig(bags=cohort.bags, labels=cohort.labels, task=task, target=target,
                     output=str(tmp_path), **tiny)
    c = load_cohort(cfg)
    rows, _ = select_methods(cfg, c)
    prepared, _ = prepare_methods(rows, c, cfg, progress=False)
    fitted = refit(c, cfg, rows, prepared)
    url = write_model(str(tmp_path / "model"), c, cfg, fitted, {})
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["task"] == task and set(card["components"]) == set(fitted)
    assert set(card["encoders"]) == set(c.encoders)
    assert all((tmp_path / "model" / f"{m}.safetensors").exists() for m in fitted)
    if task == "survival":
        assert len(card["targets"]["time_bins"]) == cfg.survival_bins + 1
    elif task == "regression":
        assert card["targets"]["targets"] == c.target_names
    else:
        assert card["targets"]["classes"] == c.classes

    model = load_model(url)
    from fusedist.fusion.fold import fold_context

    ctx = fold_context(c, cfg, np.arange(c.num_samples), np.arange(0), -1, prepared)
    x = ctx.inputs(np.arange(c.num_samples))
    loaded = model.predict(x)
    expected_methods = {"expert.test-color", "expert.test-nuclei", "expert.test-texture",
                        "best_expert", "mean_ensemble", "concat", "meta.self_attention",
                        "meta.contrastive"}
    if task != "regression":
        expected_methods.add("logitprod")
    if task == "classification":
        expected_methods.add("fusecpath")
    assert set(loaded) == expected_methods
    for name, f in fitted.items():
        a, b = f.predict(x), loaded[name]
        assert np.isfinite(a.pred).any(), name
        np.testing.assert_array_equal(a.pred, b.pred, err_msg=name)
        if a.weights is not None:
            np.testing.assert_array_equal(a.weights, b.weights, err_msg=name)

    # A damaged component file is refused, naming the file and the fix.
    comp = tmp_path / "model" / "mean_ensemble.safetensors"
    comp.write_bytes(comp.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="mean_ensemble.safetensors: sha256 .*re-run"):
        load_model(url)
