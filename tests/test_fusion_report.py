"""Fusion benchmark metrics and report: scores against hand-computed values, the comparison
table's order/formatting/CSV, and that every plot writes a PNG showing what it should.

Hand calculations are in the comments next to each expected value.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from PIL import Image

from fusedist.fusion import metrics as M
from fusedist.fusion import report as R

# ------------------------------------------------------------------------ classification

def test_binary_classification_hand_example():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    out = M.classification_metrics(y, np.stack([1 - p1, p1], axis=1))
    # (pos, neg) pairs ranked right: .35>.1, .8>.1, .8>.4 but not .35>.4 -> 3/4.
    assert out["auc"] == pytest.approx(0.75)
    # argmax -> [0, 0, 0, 1]: recall 1 (class 0) and 1/2 (class 1).
    assert out["balanced_accuracy"] == pytest.approx(0.75)
    # F1: class 0 P=2/3 R=1 -> 0.8; class 1 P=1 R=1/2 -> 2/3.
    assert out["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_three_class_hand_example():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.7, .2, .1], [.3, .4, .3], [.2, .6, .2],
                      [.5, .3, .2], [.1, .2, .7], [.2, .5, .3]])
    out = M.classification_metrics(y, probs)
    # One-vs-rest: class 0 -> 7/8, class 1 -> 6/8, class 2 -> 7.5/8 (a tie .3 vs .3 is 1/2).
    assert out["auc"] == pytest.approx((7 + 6 + 7.5) / 24)
    # argmax -> [0, 1, 1, 0, 2, 1]: every class recalled 1/2.
    assert out["balanced_accuracy"] == pytest.approx(0.5)
    # F1 per class: 1/2, 2*(1/3*1/2)/(5/6) = 0.4, 2/3.
    assert out["macro_f1"] == pytest.approx((0.5 + 0.4 + 2 / 3) / 3)


def test_auc_over_present_classes_and_f1_over_all_labels():
    y = np.array([0, 0, 2, 2])  # class 1 absent from this fold
    probs = np.array([[.6, .3, .1], [.2, .5, .3], [.3, .3, .4], [.5, .1, .4]])
    out = M.classification_metrics(y, probs)
    # class 0 OvR: .6 beats both negatives, .2 neither -> 1/2; class 2: 4/4 -> mean 0.75.
    assert out["auc"] == pytest.approx(0.75)
    # argmax -> [0, 1, 2, 0]; F1 over labels 0..2: 1/2, 0 (never right), 2/3.
    assert out["macro_f1"] == pytest.approx((0.5 + 0 + 2 / 3) / 3)


def test_auc_nan_with_one_class_and_nan_rows_dropped():
    out = M.classification_metrics(np.array([1, 1, 1]), np.array([[.2, .8], [.4, .6], [.9, .1]]))
    assert math.isnan(out["auc"])
    assert out["balanced_accuracy"] == pytest.approx(2 / 3)
    # A method that produced nothing for one sample: that row is ignored, not fatal.
    y = np.array([0, 1, 1, 0])
    probs = np.array([[.9, .1], [.2, .8], [np.nan, np.nan], [.6, .4]])
    assert M.classification_metrics(y, probs)["auc"] == pytest.approx(1.0)


# ----------------------------------------------------------------- survival, regression

def test_c_index_hand_example():
    risk = np.array([0.9, 0.1, 0.3, 0.3, np.nan])
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    event = np.array([1, 0, 1, 0, 1])
    # Comparable pairs (event earlier): (0,1) (0,2) (0,3) concordant, (2,3) tied risk -> 1/2.
    # The nan-risk patient is dropped.
    assert M.survival_metrics(risk, time, event)["c_index"] == pytest.approx(3.5 / 4)
    assert M.task_metrics("survival", None, risk, time=time, event=event) == {"c_index": 0.875}


def test_regression_pearson_skips_constant_targets():
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.stack([base, np.full(5, 7.0), base, base], axis=1)
    pred = np.stack([2 * base, base, np.array([1.0, 3.0, 2.0, 5.0, 4.0]), np.full(5, 1.0)],
                    axis=1)
    # r = 1 (target 0); target 1 constant truth, target 3 constant prediction -> skipped;
    # target 2: centred [-2,-1,0,1,2].[-2,0,-1,2,1] = 8 over sqrt(10*10) -> 0.8.
    assert M.regression_metrics(y, pred)["pearson"] == pytest.approx(0.9)
    assert M.regression_metrics(base, base[::-1])["pearson"] == pytest.approx(-1.0)
    assert math.isnan(M.regression_metrics(y[:, 1:2], pred[:, 1:2])["pearson"])


def test_task_metrics_dispatch_and_unknown_task():
    y, p = np.array([0, 1]), np.array([[.8, .2], [.3, .7]])
    assert M.task_metrics("tile_classification", y, p)["auc"] == 1.0
    assert set(M.task_metrics("classification", y, p)) == set(M.METRICS["classification"])
    with pytest.raises(ValueError, match="regression"):
        M.task_metrics("segmentation", y, p)
    with pytest.raises(ValueError, match="time"):
        M.task_metrics("survival", y, p[:, 1])


def test_summarize_is_nan_aware():
    folds = {"a": [{"auc": 0.8, "x": math.nan}, {"auc": math.nan, "x": math.nan},
                   {"auc": 0.6, "x": math.nan}]}
    s = M.summarize(folds)["a"]
    assert s["auc"] == pytest.approx((0.7, 0.1))  # ddof 0 over the two finite folds
    assert all(math.isnan(v) for v in s["x"])


# --------------------------------------------------------------------------- KM, log-rank

def test_kaplan_meier_ties_and_censoring():
    times, surv = M.kaplan_meier(np.array([1, 2, 2, 3, 4]), np.array([1, 1, 0, 1, 0]))
    # t=1: 1 of 5 dies -> .8; t=2: the censored patient still at risk -> .8*3/4 = .6;
    # t=3: 1 of 2 -> .3; t=4: censoring only -> .3.
    np.testing.assert_allclose(times, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(surv, [1, .8, .6, .3, .3])


def test_logrank_separated_identical_and_scipy_agreement():
    early, late = np.arange(1.0, 11.0), np.arange(11.0, 21.0)
    ones = np.ones(10)
    assert M.logrank_p(early, ones, late, ones) < 1e-4
    assert M.logrank_p(early, ones, early, ones) > 0.3  # O = E exactly -> p = 1
    assert math.isnan(M.logrank_p(early, ones, np.array([]), np.array([])))

    from scipy.stats import CensoredData, logrank
    rng = np.random.default_rng(0)
    ta, tb = rng.exponential(1.0, 30).round(1), rng.exponential(1.6, 25).round(1)  # ties
    ea, eb = rng.random(30) < 0.7, rng.random(25) < 0.7
    ref = logrank(CensoredData.right_censored(ta, ~ea), CensoredData.right_censored(tb, ~eb))
    assert M.logrank_p(ta, ea, tb, eb) == pytest.approx(ref.pvalue, rel=1e-6)


# ----------------------------------------------------------------------------- the table

@pytest.fixture
def table_inputs():
    fold_metrics = {
        "a": [{"auc": 0.7, "balanced_accuracy": 0.6, "macro_f1": 0.5},
              {"auc": 0.8, "balanced_accuracy": 0.7, "macro_f1": 0.6}],
        "b": [{"auc": 0.9, "balanced_accuracy": 0.8, "macro_f1": 0.7},
              {"auc": 0.85, "balanced_accuracy": 0.8, "macro_f1": math.nan}],
        "c": [{"auc": math.nan, "balanced_accuracy": math.nan, "macro_f1": math.nan}],
    }
    costs = {"a": {"n": 100, "train_s": 12.345, "params": 1234567}, "b": {"n": 100.0,
                                                                       "train_s": 3}}
    return fold_metrics, costs


def test_comparison_table_markdown(table_inputs):
    md, _ = R.comparison_table("classification", *table_inputs, notes={"b": "x | y"},
                               labels={"b": "Method B"})
    lines = md.strip().splitlines()
    assert lines[0] == ("| method | auc | balanced_accuracy | macro_f1 | folds | n | train s "
                        "| trainable params | notes |")
    rows = lines[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["Method B", "a", "c"]  # by mean auc
    assert "**0.875 ± 0.025**" in rows[0] and "**" not in rows[1] + rows[2]
    assert "0.750 ± 0.050" in rows[1] and "12.35" in rows[1] and "1,234,567" in rows[1]
    assert "x \\| y" in rows[0]  # a pipe in a note must not split the row
    cells = [c.strip() for c in rows[2].split("|")[1:-1]]
    assert cells == ["c", "n/a", "n/a", "n/a", "0", "—", "—", "—", ""]


def test_comparison_table_csv_parses_back(table_inputs):
    _, text = R.comparison_table("classification", *table_inputs, labels={"b": "Method B"})
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == ["method", "label", "auc_mean", "auc_std",
                                 "balanced_accuracy_mean", "balanced_accuracy_std",
                                 "macro_f1_mean", "macro_f1_std", "folds", "n", "train_s",
                                 "params", "notes"]
    rows = {r["method"]: r for r in reader}
    assert list(rows) == ["b", "a", "c"]
    b, a, c = rows["b"], rows["a"], rows["c"]
    assert b["label"] == "Method B" and float(b["auc_mean"]) == pytest.approx(0.875)
    assert float(b["macro_f1_mean"]) == pytest.approx(0.7) and b["folds"] == "2"
    assert (a["n"], float(a["train_s"]), a["params"]) == ("100", 12.345, "1234567")
    assert b["params"] == "" and c["n"] == "" and c["folds"] == "0"
    assert math.isnan(float(c["auc_mean"]))


def test_format_mean_std():
    assert R.format_mean_std(0.8123, 0.0314) == "0.812 ± 0.031"
    assert R.format_mean_std(0.5, 0.25, digits=1) == "0.5 ± 0.2"
    assert R.format_mean_std(math.nan, math.nan) == "n/a"


# ----------------------------------------------------------------------------------- plots

def _png(path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    return img


def test_plot_roc_binary_multiclass_and_many_methods(tmp_path):
    rng = np.random.default_rng(0)
    y2 = rng.integers(0, 2, 60)
    good = np.clip(y2 * 0.6 + rng.random(60) * 0.4, 0, 1)
    probs = {f"method {i}": np.stack([1 - good, good], 1) for i in range(12)}
    probs["method 0"] = probs["method 0"].copy()
    probs["method 0"][:5] = np.nan  # dropped for that method only
    img = _png(R.plot_roc(y2, probs, tmp_path / "sub" / "roc.png"))
    assert img.size == (720, 600)  # 6 x 5 in at 120 dpi

    y3 = rng.integers(0, 3, 60)
    p3 = rng.dirichlet(np.ones(3), 60)
    _png(R.plot_roc(y3, {"random": p3}, tmp_path / "roc3.png", title="3-class"))


def test_colors_are_distinct_for_twelve_methods():
    assert len(set(R._colors(12))) == 12


def test_plot_km(tmp_path):
    rng = np.random.default_rng(1)
    time = rng.exponential(5, 80).round(1)
    event = rng.random(80) < 0.7
    risk = {f"m{i}": -time + rng.normal(0, i + 1, 80) for i in range(8)}
    risk["m1"][:10] = np.nan
    img = _png(R.plot_km(time, event, risk, tmp_path / "km.png", max_panels=6))
    assert img.size[0] > img.size[1]  # 2 x 3 panel grid


def test_plot_fold_bars(tmp_path):
    folds = {"a": [{"auc": .7}, {"auc": .8}, {"auc": math.nan}], "b": [{"auc": .9}]}
    img = _png(R.plot_fold_bars(folds, "auc", tmp_path / "bars.png"))
    assert img.size == (720, 600)


def test_plot_regression(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.normal(size=(40, 20))
    preds = {"good": y + rng.normal(0, .5, y.shape), "noise": rng.normal(size=y.shape)}
    assert _png(R.plot_regression(y, preds, tmp_path / "reg.png")).size == (720, 600)
    _png(R.plot_regression(y[:, 0], {k: v[:, 0] for k, v in preds.items()},
                           tmp_path / "reg1.png"))


# ------------------------------------------------------------------------------ attention

GREY = 128
COORDS = np.array([[0, 0], [1800, 800], [1000, 400]])   # level-0 top-left corners
ATTENTION = np.array([0.1, 5.0, 1.0])                    # tile 1 highest, tile 0 lowest


def _blend(rank: float) -> np.ndarray:
    from matplotlib import colormaps
    rgb = np.array(colormaps[R.HEATMAP_CMAP](rank)[:3]) * 255
    return (1 - R.HEATMAP_ALPHA) * GREY + R.HEATMAP_ALPHA * rgb


def test_percentile_rank():
    np.testing.assert_allclose(R.percentile_rank([5.0, 1.0, 3.0]), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(R.percentile_rank([2.0]), [1.0])


def test_attention_composite_colours_the_right_tiles():
    thumb = Image.new("RGB", (100, 50), (GREY,) * 3)      # covers a 2000 x 1000 slide
    img, size = R.attention_composite(COORDS, ATTENTION, 200, thumb, slide_size=(2000, 1000))
    assert img.shape == (50, 100, 3) and size == (2000, 1000)
    # Scale 1/20: tile 1 covers x 90..99, y 40..49; tile 0 covers x 0..9, y 0..9.
    np.testing.assert_allclose(img[45, 95], _blend(1.0), atol=1)
    np.testing.assert_allclose(img[5, 5], _blend(0.0), atol=1)
    assert (img[5, 50] == GREY).all()                      # no tile there: thumbnail only
    # Without a thumbnail: a white canvas spanning the tiles' extent (2000 x 1000).
    blank, size = R.attention_composite(COORDS, ATTENTION, 200)
    assert size == (2000.0, 1000.0) and blank.shape == (512, 1024, 3)
    assert (blank[256, 300] == 255).all()


def test_plot_attention_heatmap_puts_hot_colour_on_hot_tile(tmp_path):
    thumb = Image.new("RGB", (100, 50), (GREY,) * 3)
    path = R.plot_attention_heatmap(COORDS, ATTENTION, 200, tmp_path / "att.png",
                                    thumbnail=thumb, slide_size=(2000, 1000), title="slide 1")
    img = np.asarray(_png(path).convert("RGB"), dtype=float)
    assert img.shape[:2] == (600, 720)

    def centroid(colour: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(np.abs(img - colour).max(axis=2) <= 3)
        assert xs.size > 20, "tile colour missing from the saved image"
        return np.array([xs.mean(), ys.mean()])

    hot, cold = centroid(_blend(1.0)), centroid(_blend(0.0))
    assert hot[0] > cold[0] + 100 and hot[1] > cold[1] + 50  # bottom-right vs top-left tile
    _png(R.plot_attention_heatmap(COORDS, ATTENTION, 200, tmp_path / "att_blank.png"))


# ------------------------------------------------------------------------------- markdown

def test_write_markdown_report(tmp_path):
    path = R.write_markdown_report(tmp_path / "r" / "report.md", "Fusion",
                                   [("Table", "| a |"), ("ROC", R.image_md("roc.png", "ROC"))])
    assert path.read_text() == "# Fusion\n\n## Table\n\n| a |\n\n## ROC\n\n![ROC](roc.png)\n"


def _figure_texts(monkeypatch) -> list[str]:
    """Texts of every figure a plot function saves (captured before _save clears it)."""
    texts: list[str] = []
    real = R._save

    def capture(fig, path):
        texts.extend(t.get_text() for t in fig.findobj(
            lambda a: hasattr(a, "get_text") and callable(a.get_text)))
        return real(fig, path)

    monkeypatch.setattr(R, "_save", capture)
    return texts


def test_km_has_bands_numbers_at_risk_and_a_time_label(tmp_path, monkeypatch):
    texts = _figure_texts(monkeypatch)
    time = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], float)
    event = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    risk = {"m": -time}
    _png(R.plot_km(time, event, risk, tmp_path / "km.png", time_label="time (months)"))
    assert "time (months)" in texts
    assert any(t.startswith("at risk (low") for t in texts)
    assert any(t.startswith("at risk (high") for t in texts)
    assert "5" in texts  # the low-risk group (the 5 longest times) has 5 at risk at t = 0
    # Greenwood/log-log 95% band: brackets the curve, inside [0, 1]; first step by hand.
    times, surv = R.kaplan_meier(time, event)
    lo, hi = R._km_band(time, event, times, surv)
    assert (lo <= surv + 1e-12).all() and (hi >= surv - 1e-12).all()
    assert lo.min() >= 0 and hi.max() <= 1
    s1, var = 0.9, 1 / (10 * 9)  # one death among 10 at t = 1
    se = math.sqrt(var) / abs(math.log(s1))
    assert lo[1] == pytest.approx(math.exp(-math.exp(math.log(-math.log(s1)) + 1.959964 * se)))


def test_roc_legend_says_pooled_and_table_is_fold_mean(tmp_path, monkeypatch):
    texts = _figure_texts(monkeypatch)
    y = np.array([0, 1] * 10)
    _png(R.plot_roc(y, {"a": np.stack([1 - y * .8, y * .8], 1)}, tmp_path / "roc.png"))
    legend = " ".join(texts)
    assert "pooled out-of-fold" in legend and "mean of per-fold AUCs" in legend


def test_attention_colormap_is_perceptually_ordered():
    """Lightness rises with attention rank (jet's does not: it peaks mid-scale)."""
    from matplotlib import colormaps

    rgb = colormaps[R.HEATMAP_CMAP](np.linspace(0, 1, 64))[:, :3]
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    lum = lin @ np.array([0.2126, 0.7152, 0.0722])  # relative luminance, monotone in L*
    assert (np.diff(lum) > 0).all()


def test_image_links_survive_ids_with_spaces_and_brackets():
    # A LIMS slide id like "S 12 (HE)#2" must still give one working Markdown image link.
    from fusedist.fusion.report import image_md

    md = image_md("plots/attention_enc_S 12 (HE)#2.png", "attention [S 12]")
    assert md == "![attention \\[S 12\\]](plots/attention_enc_S%2012%20%28HE%29%232.png)"
    assert image_md("plots/roc.png", "ROC") == "![ROC](plots/roc.png)"  # plain paths unchanged
