"""Patient-level fusion (``unit: patient``): a clinical table keyed by patient joined to the
bags through a slide table; each patient's slides pooled into one sample (tiles concatenated
per encoder, slide-id order) for every method; folds, metrics, predictions.csv, the card
and ``predict`` per patient; and the errors when labels, slides and bags do not meet.

The cohort is the synthetic one (real HDF5 bags, 30 slides of 27 patients: three patients
have two slides); folds run on the session's real local Ray.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusedist.formats.bags import Bag, read_bag, write_bag
from fusedist.config import ConfigError
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import load_cohort, make_folds
from fusedist.synth.cohort import synthetic_cohort

from .test_fuse import TINY, read_csv


def _write(path: Path, header: list[str], rows: list[list[object]]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The synthetic cohort plus STAMP-style tables: ``clinical.csv`` (one row per patient,
    and a patient with no slide) and ``slides.csv`` (slide_id, path, patient_id)."""
    tmp = tmp_path_factory.mktemp("patients")
    co = synthetic_cohort(str(tmp / "cohort"), num_slides=30, tiles=(12, 24), seed=3)
    rows = read_csv(Path(co.labels))
    first = {}
    for r in rows:
        first.setdefault(r["patient_id"], r)
    clinical = _write(tmp / "clinical.csv", ["patient_id", "label", "time", "event"],
                      [[p, r["label"], r["time"], r["event"]] for p, r in first.items()]
                      + [["no-such-patient", "1", "10", "1"]])
    slides = _write(tmp / "slides.csv", ["slide_id", "path", "patient_id"],
                    [[r["slide_id"], f"gdc/{r['slide_id']}.svs", r["patient_id"]]
                     for r in rows])
    two = sorted(p for p in first if sum(r["patient_id"] == p for r in rows) == 2)
    assert len(first) == 27 and len(two) == 3
    return co, clinical, slides, two, tmp


def _cfg(co, clinical, slides, **kw) -> FuseConfig:
    return FuseConfig(bags=co.bags, labels=clinical, slides=slides, **{"folds": 3, **kw})


# ------------------------------------------------------------------------------ the cohort

def test_a_patient_is_one_sample_whose_bag_is_its_slides_concatenated(cohort, tmp_path):
    co, clinical, slides, two, _ = cohort
    # One slide of a two-slide patient lacks a tile in one encoder, so aligning the feature
    # group picks rows there: the pooled picks must be offset into the pooled bag.
    bags = tmp_path / "bags"
    shutil.copytree(co.bags, bags)
    c0 = load_cohort(_cfg(co, clinical, slides))
    p = two[0]
    second = c0.members[c0.slide_ids.index(p)][1]
    url = bags / "test-nuclei" / f"{second}.h5"
    b = read_bag(str(url))
    write_bag(str(url), Bag(b.slide_id, b.features[1:], b.coords[1:], b.encoder, b.mpp,
                            b.tile_size, b.attrs))

    c = load_cohort(FuseConfig(bags=str(bags), labels=clinical, slides=slides, folds=3))
    assert c.unit == "patient"  # auto: the labels are keyed by patient
    assert len(c.slide_ids) == c.num_samples == 27 and c.patient_ids == c.slide_ids
    ghost = [x for x in c.exclusions if x["patient_id"] == "no-such-patient"]
    assert ghost and "has no slide in" in ghost[0]["reason"]
    for q in two:
        i = c.slide_ids.index(q)
        members = c.members[i]
        assert len(members) == 2 and members == sorted(members)
        per = [{e: read_bag(str(bags / e / f"{s}.h5")) for e in c.encoders} for s in members]
        for e in c.encoders:
            np.testing.assert_array_equal(
                c.bags[e][i], np.concatenate([x[e].features for x in per]).astype(np.float32))
            np.testing.assert_array_equal(
                c.coords[e][i], np.concatenate([x[e].coords for x in per]))
            assert c.member_sizes[e][i] == [len(x[e].features) for x in per]
        # Aligned: each slide's shared tiles, in order, slide after slide.
        for e in c.feature_group:
            want = []
            for x in per:
                shared = set.intersection(*({tuple(xy) for xy in x[g].coords}
                                            for g in c.feature_group))
                rows = [k for k, xy in enumerate(x[c.feature_group[0]].coords)
                        if tuple(xy) in shared]
                key = {tuple(xy): k for k, xy in enumerate(x[e].coords)}
                first = x[c.feature_group[0]].coords
                want.append(x[e].features[[key[tuple(first[k])] for k in rows]])
            np.testing.assert_array_equal(c.aligned[e][i], np.concatenate(want))
    i = c.slide_ids.index(two[0])  # the trimmed slide's tile is in no aligned row
    assert len(c.aligned["test-nuclei"][i]) == len(c.bags["test-nuclei"][i])
    assert len(c.aligned["test-color"][i]) == len(c.bags["test-color"][i]) - 1

    # One sample per patient in the folds.
    folds = make_folds(c, np.arange(c.num_samples), 3, 0)
    assert len(folds) == 27 and sorted(set(folds.tolist())) == [0, 1, 2]

    # Slide-keyed labels with unit: patient are the same patients, pooled the same way.
    s = load_cohort(FuseConfig(bags=str(bags), labels=co.labels, folds=3, unit="patient"))
    assert s.slide_ids == c.slide_ids and s.members == c.members
    np.testing.assert_array_equal(s.y, c.y)


# ------------------------------------------------------------------------------ bad input

def _fuse_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedist.cli", "fuse", "-q", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_clinical_table_matching_no_slide_stops_before_work(cohort, tmp_path):
    co, _, slides, _, _ = cohort
    other = _write(tmp_path / "clinical.csv", ["patient_id", "label"],
                   [[f"TCGA-XX-{k:04d}", k % 2] for k in range(8)])
    out = tmp_path / "out"
    p = _fuse_cli("--bags", co.bags, "--labels", other, "--slides", slides, "-o", str(out))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "share no patient_id" in p.stderr and "'TCGA-XX-0000'" in p.stderr, p.stderr
    assert "'patient-0000'" in p.stderr  # and the slide table's
    assert "Likely cause: the two tables write patient ids differently" in p.stderr
    assert not out.exists()  # nothing ran
    # A clinical table without a slide table: the fix is named.
    with pytest.raises(ConfigError, match="keyed by patient_id; set `slides:`"):
        load_cohort(FuseConfig(bags=co.bags, labels=other, folds=3))


def test_labels_and_bags_sharing_no_id_show_both_sides_and_the_likely_cause(cohort, tmp_path):
    co, _, _, _, _ = cohort
    # Bags named the way a GDC download was embedded before slide tables: folder prefix.
    bags = tmp_path / "bags"
    for d in Path(co.bags).iterdir():
        (bags / d.name).mkdir(parents=True)
        for f in d.iterdir():
            shutil.copy(f, bags / d.name / f"03e0a813-bdc2-4c6e_{f.name}")
    with pytest.raises(ConfigError) as err:
        load_cohort(FuseConfig(bags=str(bags), labels=co.labels, folds=3))
    msg = str(err.value)
    assert "share no slide_id" in msg and "'synth-0000'" in msg
    assert "'03e0a813-bdc2-4c6e_synth-0000'" in msg
    assert "Likely cause: the bag names contain the label ids" in msg
    assert msg.count("\n") == 0  # one error, not one line per slide
    # The same bags reached through a clinical and a slide table: the slide table's ids.
    co_, clinical, slides, _, _ = cohort
    with pytest.raises(ConfigError, match=r"the slide table .* and the bags under .* share no "
                       r"slide_id.*'synth-0000'.*'03e0a813-bdc2-4c6e_synth-0000'.*Likely "
                       "cause: the bag names contain the label ids"):
        load_cohort(FuseConfig(bags=str(bags), labels=clinical, slides=slides, folds=3))


def test_a_patients_slides_with_different_labels_are_refused(cohort, tmp_path):
    co, _, _, two, _ = cohort
    rows = read_csv(Path(co.labels))
    flip = next(r for r in rows if r["patient_id"] == two[0])
    flip["label"] = str(1 - int(flip["label"]))
    labels = _write(tmp_path / "labels.csv", list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(ConfigError, match=f"patient '{two[0]}' has slides with different"):
        load_cohort(FuseConfig(bags=co.bags, labels=labels, folds=3, unit="patient"))


# ---------------------------------------------------------------------- fuse and predict

def _per_fold(rows: list[dict[str, str]], method: str) -> dict[int, list[dict[str, str]]]:
    out: dict[int, list] = {}
    for r in rows:
        if r["method"] == method:
            out.setdefault(int(r["fold"]), []).append(r)
    return out


@pytest.mark.timeout(600)
def test_fuse_and_predict_per_patient(ray_cluster, cohort, tmp_path):
    """Every method on pooled bags; predictions, folds, AUC and the card per patient; the
    fused model predicts a new patient from its slides pooled the same way."""
    from fusedist.fusion.fold import fold_context, prepare_methods, select_methods
    from fusedist.fusion.metrics import classification_metrics
    from fusedist.fusion.model import load_model
    from fusedist.fusion.run import run_fuse

    co, clinical, slides, two, _ = cohort
    out = tmp_path / "fuse"
    tiny = {**TINY, "experts": {**TINY["experts"], "epochs": 2},
            "logitprod": {**TINY["logitprod"], "max_epochs": 20},
            "meta": {**TINY["meta"], "strategies": ["self_attention"], "epochs": 1},
            "final": {"enabled": True, "methods": ["logitprod", "fusecpath",
                                                   "meta.self_attention"]}}
    cfg = _cfg(co, clinical, slides, **{**tiny, "output": str(out),
                                        "methods": ["logitprod", "meta", "fusecpath"]})
    res = run_fuse(cfg, progress=False)
    assert {"logitprod", "meta.self_attention", "fusecpath"} <= set(res.methods)

    pred = read_csv(out / "predictions.csv")
    by_method = {m: [r for r in pred if r["method"] == m] for m in res.methods}
    assert all(len(v) == 27 for v in by_method.values())  # one row per patient
    lp = {r["patient_id"]: r for r in by_method["logitprod"]}
    c = load_cohort(cfg)
    for p in two:
        assert lp[p]["slide_id"] == ";".join(c.members[c.slide_ids.index(p)])
    folds = read_csv(out / "folds.csv")
    assert len(folds) == 27 and len({r["patient_id"] for r in folds}) == 27
    # AUC per fold is over the fold's patients (recomputed from predictions.csv).
    per_fold = {(r["method"], int(r["fold"])): float(r["value"])
                for r in read_csv(out / "metrics_per_fold.csv") if r["metric"] == "auc"}
    for m in ("expert.test-color", "logitprod", "fusecpath"):
        for f, rows in _per_fold(pred, m).items():
            y = np.array([c.classes.index(r["label"]) for r in rows])
            probs = np.array([[float(r[f"prob_{k}"]) for k in c.classes] for r in rows])
            assert per_fold[(m, f)] == pytest.approx(
                classification_metrics(y, probs)["auc"], abs=1e-4), (m, f)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unit"] == "patient" and len(manifest["patients"]) == 27
    # Heatmaps: each slide of a held-out patient on its own.
    assert list((out / "plots").glob("attention_*.png"))

    card = json.loads((out / "model" / "card.json").read_text())
    assert card["unit"] == "patient" and card["trained_on"]["patients"] == 27
    assert card["trained_on"]["slides"] == 30

    # predict: bags + the slide table -> one row per patient, the model's own predictions.
    rows_, _ = select_methods(cfg, c)
    prepared, _ = prepare_methods([m for m in rows_ if m.name == "fusecpath"], c, cfg,
                                  progress=False)
    ctx = fold_context(c, cfg, np.arange(27), np.arange(0), -1, prepared)
    expected = load_model(str(out / "model")).predict(ctx.inputs(np.arange(27)))
    pout = tmp_path / "pred"
    p = subprocess.run([sys.executable, "-m", "fusedist.cli", "predict", "-q", "--model",
                        str(out / "model"), "--bags", co.bags, "--patients", slides,
                        "--output", str(pout)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = read_csv(pout / "predictions.csv")
    assert len(got) == 27 * 3
    for r in got:
        i = c.slide_ids.index(r["patient_id"])
        assert r["slide_id"] == ";".join(c.members[i])
        want = expected[r["method"]].pred[i]
        np.testing.assert_allclose([float(r[f"prob_{k}"]) for k in c.classes], want,
                                   rtol=2e-5, atol=1e-6, err_msg=r["method"])
    heat = {f.name for f in (pout / "heatmaps").glob("*.png")}
    for s in c.members[c.slide_ids.index(two[0])]:
        assert any(n.endswith(f"_{s}.png") for n in heat), s  # per slide, not per patient
    # Without the slide table, a patient model refuses to guess the patients.
    p = subprocess.run([sys.executable, "-m", "fusedist.cli", "predict", "-q", "--model",
                        str(out / "model"), "--bags", co.bags, "--output",
                        str(tmp_path / "pred2")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "unit: patient" in p.stderr, p.stderr[-2000:]


@pytest.mark.timeout(600)
def test_survival_c_index_is_per_patient(ray_cluster, cohort, tmp_path):
    from fusedist.fusion.metrics import survival_metrics
    from fusedist.fusion.run import run_fuse

    co, clinical, slides, _, _ = cohort
    out = tmp_path / "surv"
    run_fuse(_cfg(co, clinical, slides, **{**TINY, "output": str(out), "task": "survival",
                                           "methods": ["logitprod"]}), progress=False)
    pred = read_csv(out / "predictions.csv")
    per_fold = {(r["method"], int(r["fold"])): float(r["value"])
                for r in read_csv(out / "metrics_per_fold.csv") if r["metric"] == "c_index"}
    for m in ("expert.test-color", "logitprod"):
        folds = _per_fold(pred, m)
        assert sum(len(v) for v in folds.values()) == 27
        for f, rows in folds.items():
            want = survival_metrics(np.array([float(r["risk"]) for r in rows]),
                                    np.array([float(r["time"]) for r in rows]),
                                    np.array([int(r["event"]) for r in rows]))["c_index"]
            assert per_fold[(m, f)] == pytest.approx(want, abs=1e-9), (m, f)
