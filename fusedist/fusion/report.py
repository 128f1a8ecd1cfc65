"""Benchmark report: comparison tables, plots (ROC, Kaplan-Meier, fold bars, regression,
attention heatmaps), a small Markdown writer, and ``write_outputs``: the files of a fuse
output folder (results, predictions, manifest, plots, report.md) and their MLflow logging.

Plots draw on a bare ``matplotlib.figure.Figure`` with an Agg canvas rather than pyplot:
no global backend switch, no figure registry to leak, safe in Ray workers without a display.
Every plot function writes a PNG (creating parent folders) and returns its ``Path``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np

from fusedist import storage
from fusedist.formats.slide_ids import encode_id
from fusedist.fusion.metrics import (METRICS, PRIMARY_METRIC, kaplan_meier, logrank_p,
                                     per_target_pearson, summarize)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.Image import Image

DPI = 120
FIGSIZE = (6.0, 5.0)
HEATMAP_CMAP = "viridis"  # perceptually uniform: equal rank steps look equally different
HEATMAP_ALPHA = 0.45
CANVAS_MAX_SIDE = 1024  # px of the blank canvas drawn when there is no thumbnail
_MISSING = "—"
log = logging.getLogger("fusedist")


# ------------------------------------------------------------------------------- tables

def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.812 ± 0.031"``; ``"n/a"`` when the mean is nan (no fold produced a score)."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    std_s = f"{std:.{digits}f}" if std is not None and math.isfinite(std) else "n/a"
    return f"{mean:.{digits}f} ± {std_s}"


def _rank_key(mean: float) -> tuple[int, float]:
    # Sort key for descending primary mean with nan last (sorted() is stable for ties).
    return (1, 0.0) if not math.isfinite(mean) else (0, -mean)


def _finite_folds(folds: Sequence[Mapping[str, float]], metric: str) -> int:
    return sum(1 for f in folds if math.isfinite(float(f.get(metric, math.nan))))


def _md_cell(text: str) -> str:
    # A "|" inside a cell would split the Markdown row.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cost_cells(cost: Mapping[str, float]) -> tuple[str, str, str]:
    """(n, train s, trainable params) as display strings; "—" where missing."""
    n = cost.get("n")
    train_s = cost.get("train_s")
    params = cost.get("params")
    return (str(int(n)) if n is not None else _MISSING,
            f"{float(train_s):.2f}" if train_s is not None else _MISSING,
            f"{int(params):,}" if params is not None else _MISSING)


def comparison_table(task: str, fold_metrics: dict[str, list[dict[str, float]]],
                     costs: dict[str, dict[str, float]], notes: dict[str, str] | None = None,
                     labels: dict[str, str] | None = None) -> tuple[str, str]:
    """(Markdown, CSV) comparison of methods for ``task``: one row per method, best primary
    metric first (nan last, ties keep insertion order), the best primary cell in bold."""
    notes, labels = notes or {}, labels or {}
    metrics, primary = METRICS[task], PRIMARY_METRIC[task]
    summary = summarize(fold_metrics)
    stats = {m: {k: summary[m].get(k, (math.nan, math.nan)) for k in metrics}
             for m in fold_metrics}
    order = sorted(fold_metrics, key=lambda m: _rank_key(stats[m][primary][0]))
    best = order[0] if order and math.isfinite(stats[order[0]][primary][0]) else None

    header = ["method", *metrics, "folds", "n", "train s", "trainable params", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "label", *(f"{k}_{s}" for k in metrics for s in ("mean", "std")),
                     "folds", "n", "train_s", "params", "notes"])
    for m in order:
        cost = costs.get(m, {})
        folds = _finite_folds(fold_metrics[m], primary)
        cells = [format_mean_std(*stats[m][k]) for k in metrics]
        if m == best:
            cells[metrics.index(primary)] = f"**{cells[metrics.index(primary)]}**"
        row = [labels.get(m, m), *cells, str(folds), *_cost_cells(cost), notes.get(m, "")]
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
        writer.writerow([m, labels.get(m, m),
                         *(repr(float(v)) for k in metrics for v in stats[m][k]), folds,
                         *(_csv_number(cost.get(c), c != "train_s")
                           for c in ("n", "train_s", "params")),
                         notes.get(m, "")])
    return "\n".join(lines) + "\n", buf.getvalue()


def _csv_number(value: float | None, as_int: bool) -> str:
    if value is None:
        return ""
    return str(int(value)) if as_int else repr(float(value))


# ------------------------------------------------------------------------- plot plumbing

def _new_figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    import matplotlib as mpl
    from matplotlib.layout_engine import PlaceHolderLayoutEngine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ``tight_layout()`` leaves a placeholder layout engine behind, and ``savefig`` draws a
    # figure with any engine once without rendering before it renders it: for a placeholder
    # that draw lays nothing out (~25-50 ms a plot; issue 27). Without the engine the PNG is
    # the same, byte for byte. Left alone when the rc settings ask for a layout engine.
    if isinstance(fig.get_layout_engine(), PlaceHolderLayoutEngine) and not (
            mpl.rcParams["figure.autolayout"] or mpl.rcParams["figure.constrained_layout.use"]):
        fig.set_layout_engine(None)
    fig.savefig(path, format="png", dpi=DPI)
    fig.clear()  # no pyplot registry to close from; drop the artists now
    return path


def _colors(n: int) -> list:
    """n distinct colours: tab10 up to 10, tab20 up to 20, then a sampled continuous map."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0, 1, n)]


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, max(n, 1))
    return math.ceil(max(n, 1) / cols), cols


# ------------------------------------------------------------------------------- ROC

ROC_LEGEND_TITLE = "AUC of pooled out-of-fold predictions\n(the table: mean of per-fold AUCs)"

def _roc_inputs(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (truth, score) for one ROC curve: binary -> class-1 score; multi-class ->
    micro-average, every (sample, class) pair as one binary decision. Drops nan rows."""
    from sklearn.preprocessing import label_binarize

    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(probs, dtype=float)
    p = p.reshape(-1, 1) if p.ndim == 1 else p
    keep = np.isfinite(p).all(axis=1)
    y, p = y[keep], p[keep]
    if p.shape[1] == 1:  # a bare positive-class score
        return (y == 1).astype(int), p[:, 0]
    if p.shape[1] == 2:
        return (y == 1).astype(int), p[:, 1]
    return label_binarize(y, classes=list(range(p.shape[1]))).ravel(), p.ravel()


def plot_roc(y: np.ndarray, probs_by_method: dict[str, np.ndarray], path,
             title: str = "ROC (out-of-fold)") -> Path:
    """Pooled out-of-fold ROC, one curve per method, its AUC in the legend. That AUC is of
    the pooled predictions, which differs from the table's mean of per-fold AUCs; the legend
    says so."""
    from sklearn.metrics import auc, roc_curve

    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for (name, probs), color in zip(probs_by_method.items(), _colors(len(probs_by_method))):
        truth, score = _roc_inputs(y, probs)
        if truth.size == 0 or truth.min() == truth.max():  # ROC needs both classes
            ax.plot([], [], color=color, label=f"{name} (AUC n/a)")
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, color=color, lw=1.6, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize="small" if len(probs_by_method) <= 6 else "x-small",
              title=ROC_LEGEND_TITLE, title_fontsize="x-small")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------- Kaplan-Meier

KM_CI_Z = 1.959964  # 95% pointwise confidence bands


def _km_band(t: np.ndarray, e: np.ndarray, times: np.ndarray, surv: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """95% pointwise bands for a KM curve (Greenwood variance, log(-log) transform, so the
    band stays inside [0, 1]); at S = 0 or 1 the band collapses to the curve."""
    var_terms = np.zeros(times.size)
    acc = 0.0
    for i, u in enumerate(times[1:], start=1):
        n = np.count_nonzero(t >= u)
        d = np.count_nonzero((t == u) & e)
        if n > d:
            acc += d / (n * (n - d))
        var_terms[i] = acc
    lo, hi = surv.copy(), surv.copy()
    ok = (surv > 0) & (surv < 1)
    log_s = np.log(surv[ok])
    se = np.sqrt(var_terms[ok]) / np.abs(log_s)
    ll = np.log(-log_s)
    lo[ok] = np.exp(-np.exp(ll + KM_CI_Z * se))
    hi[ok] = np.exp(-np.exp(ll - KM_CI_Z * se))
    return lo, hi


def _at_risk(t: np.ndarray, ticks: np.ndarray) -> list[int]:
    return [int(np.count_nonzero(t >= x)) for x in ticks]


def _km_panel(ax, name: str, t: np.ndarray, e: np.ndarray, risk: np.ndarray,
              time_label: str = "time") -> None:
    """High- vs low-risk KM curves (split at the median risk) with 95% bands, censor marks
    and the numbers at risk under the time axis."""
    high = risk > np.median(risk)
    groups = []
    for mask, label, color in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
        if not mask.any():
            continue
        times, surv = kaplan_meier(t[mask], e[mask])
        lo, hi = _km_band(t[mask], e[mask], times, surv)
        ax.step(times, surv, where="post", color=color, lw=1.5, label=f"{label} (n={mask.sum()})")
        ax.fill_between(times, lo, hi, step="post", color=color, alpha=0.15, lw=0)
        cens = np.unique(t[mask][~e[mask]])
        ax.plot(cens, surv[np.searchsorted(times, cens, side="right") - 1], "+",
                color=color, ms=7)
        groups.append((label, color, t[mask]))
    p = logrank_p(t[high], e[high], t[~high], e[~high])
    ax.set_title(f"{name}\nlog-rank p = {p:.2g}" if math.isfinite(p)
                 else f"{name}\nlog-rank p = n/a", fontsize="medium")
    ax.set(ylim=(0, 1.05), xlim=(0, float(t.max()) * 1.02 if t.size else 1.0),
           ylabel="survival probability (95% CI)")
    ax.set_xlabel(time_label)
    ax.legend(loc="best", fontsize="x-small")
    # Numbers at risk at the tick positions, one row per group, below the axis label.
    ticks = [x for x in ax.get_xticks() if 0 <= x <= ax.get_xlim()[1]]
    for row, (label, color, tg) in enumerate(groups):
        y = -0.28 - 0.09 * row
        ax.annotate(f"at risk ({label.split()[0]})", xy=(0, y), xycoords="axes fraction",
                    ha="right", fontsize="xx-small", color=color, xytext=(-6, 0),
                    textcoords="offset points")
        for x, n in zip(ticks, _at_risk(tg, np.asarray(ticks))):
            ax.annotate(str(n), xy=(x, y), xycoords=("data", "axes fraction"), ha="center",
                        fontsize="xx-small", color=color)


def plot_km(time, event, risk_by_method: dict[str, np.ndarray], path,
            max_panels: int = 6, time_label: str = "time (unit of the labels' time column)"
            ) -> Path:
    """One Kaplan-Meier panel per method (the first ``max_panels``), patients split at the
    median predicted risk: 95% bands, numbers at risk under the labelled time axis, log-rank
    p in each panel's title. nan-risk rows are dropped."""
    t_all = np.asarray(time, dtype=float).ravel()
    e_all = np.asarray(event, dtype=float).ravel() > 0
    methods = list(risk_by_method)[:max_panels]
    rows, cols = _grid(len(methods))
    fig = _new_figure(FIGSIZE if len(methods) <= 1 else (4.2 * cols, 4.4 * rows))
    for i, name in enumerate(methods):
        ax = fig.add_subplot(rows, cols, i + 1)
        risk = np.asarray(risk_by_method[name], dtype=float).ravel()
        ok = np.isfinite(risk) & np.isfinite(t_all)
        if not ok.any():
            ax.set_title(f"{name}\nno predictions", fontsize="medium")
            continue
        _km_panel(ax, name, t_all[ok], e_all[ok], risk[ok], time_label)
    if len(risk_by_method) > len(methods):
        fig.suptitle(f"Kaplan-Meier by predicted risk (first {len(methods)} of "
                     f"{len(risk_by_method)} methods)")
    else:
        fig.suptitle("Kaplan-Meier by predicted risk (median split)")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------- fold bars

def plot_fold_bars(fold_metrics: dict[str, list[dict[str, float]]], metric: str, path) -> Path:
    """Grouped bars: one group per method, one bar per fold, a black marker at the mean."""
    methods = list(fold_metrics)
    n_folds = max((len(f) for f in fold_metrics.values()), default=0)
    width = 0.8 / max(n_folds, 1)
    fig = _new_figure((max(6.0, 0.9 * len(methods) + 2.0), 5.0))
    ax = fig.add_subplot()
    x = np.arange(len(methods))
    for k, color in zip(range(n_folds), _colors(n_folds)):
        vals = np.array([float(fold_metrics[m][k].get(metric, np.nan))
                         if k < len(fold_metrics[m]) else np.nan for m in methods])
        ok = np.isfinite(vals)  # a failed fold gets no bar rather than a zero bar
        ax.bar(x[ok] - 0.4 + (k + 0.5) * width, vals[ok], width, color=color,
               label=f"fold {k}")
    summary = summarize(fold_metrics)
    means = np.array([summary[m].get(metric, (np.nan,))[0] for m in methods])
    ok = np.isfinite(means)
    ax.scatter(x[ok], means[ok], marker="D", color="black", zorder=3, label="mean")
    ax.set_xticks(x, methods, rotation=30 if len(methods) > 4 else 0, ha="right"
                  if len(methods) > 4 else "center")
    ax.set(xlabel="method", ylabel=metric, title=f"{metric} per fold")
    ax.legend(fontsize="x-small", ncols=2 if n_folds > 5 else 1)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- regression

def plot_regression(y: np.ndarray, pred_by_method: dict[str, np.ndarray], path,
                    max_panels: int = 6) -> Path:
    """Per-target Pearson r per method. Several targets: one box per method (points are the
    targets). A single target gives one r per method, so a box says nothing: instead draw a
    predicted-vs-true scatter panel for each of the first ``max_panels`` methods."""
    y2 = np.asarray(y, dtype=float)
    y2 = y2.reshape(-1, 1) if y2.ndim == 1 else y2
    if y2.shape[1] == 1:
        return _regression_scatter(y2[:, 0], pred_by_method, path, max_panels)
    names = list(pred_by_method)
    rs = [per_target_pearson(y2, pred_by_method[m]) for m in names]
    fig = _new_figure((max(6.0, 0.6 * len(names) + 2), 5.0))
    ax = fig.add_subplot()
    data = [r[np.isfinite(r)] for r in rs]
    box = ax.boxplot(data, patch_artist=True, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: identical plots on reruns
    for i, (r, color) in enumerate(zip(data, _colors(len(names)))):
        box["boxes"][i].set(facecolor=color, alpha=0.5)
        ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, r.size), r, s=6, color=color, zorder=3)
    ax.set_xticks(np.arange(1, len(names) + 1), names,
                  rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="method", ylabel="Pearson r per target",
           title=f"Per-target Pearson r ({y2.shape[1]} targets)")
    fig.tight_layout()
    return _save(fig, path)


def _regression_scatter(y: np.ndarray, pred_by_method: dict[str, np.ndarray], path,
                        max_panels: int) -> Path:
    names = list(pred_by_method)[:max_panels]
    rows, cols = _grid(len(names))
    fig = _new_figure((4.0 * cols, 3.6 * rows))
    for i, (name, color) in enumerate(zip(names, _colors(len(names)))):
        ax = fig.add_subplot(rows, cols, i + 1)
        p = np.asarray(pred_by_method[name], dtype=float).ravel()
        ok = np.isfinite(p) & np.isfinite(y)
        ax.scatter(y[ok], p[ok], s=8, color=color, alpha=0.7)
        r = per_target_pearson(y[ok], p[ok])[0] if ok.any() else math.nan
        ax.set_title(f"{name}\nr = {r:.3f}" if math.isfinite(r) else f"{name}\nr = n/a",
                     fontsize="medium")
        ax.set(xlabel="true", ylabel="predicted")
    fig.suptitle("Predicted vs true (single target)")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------- attention heatmap

def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their mean rank): raw attention is often peaked on
    a few tiles, so a linear colour scale would show one hot tile and a uniform background."""
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=float).ravel()
    if v.size <= 1:
        return np.ones_like(v)
    return (rankdata(v) - 1.0) / (v.size - 1.0)


def attention_composite(coords: np.ndarray, attention: np.ndarray, tile_extent: float,
                        thumbnail: Image | None = None,
                        slide_size: tuple[int, int] | None = None
                        ) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB uint8 image of the slide (thumbnail, or white) with the attention overlay
    alpha-blended over the tiles, and the level-0 (width, height) it covers.

    Tiles are painted in increasing attention, so where tiles overlap the higher one shows.
    """
    from matplotlib import colormaps

    xy = np.asarray(coords, dtype=float).reshape(-1, 2)
    att = np.asarray(attention, dtype=float).ravel()
    ok = np.isfinite(att) & np.isfinite(xy).all(axis=1)
    xy, rank = xy[ok], percentile_rank(att[ok])
    if slide_size is None:
        ext = xy.max(axis=0) + tile_extent if xy.size else np.array([tile_extent] * 2)
        slide_size = (float(ext[0]), float(ext[1]))
    sw, sh = float(slide_size[0]), float(slide_size[1])
    if thumbnail is not None:
        base = np.asarray(thumbnail.convert("RGB"), dtype=float)
    else:  # blank canvas at the slide's aspect ratio, longest side CANVAS_MAX_SIDE px
        scale = CANVAS_MAX_SIDE / max(sw, sh)
        base = np.full((max(1, round(sh * scale)), max(1, round(sw * scale)), 3), 255.0)
    h, w = base.shape[:2]
    sx, sy = w / sw, h / sh
    colors = colormaps[HEATMAP_CMAP](rank)[:, :3] * 255.0
    out = base.copy()
    for i in np.argsort(rank, kind="stable"):
        x0, y0 = int(math.floor(xy[i, 0] * sx)), int(math.floor(xy[i, 1] * sy))
        x1 = max(x0 + 1, int(math.ceil((xy[i, 0] + tile_extent) * sx)))
        y1 = max(y0 + 1, int(math.ceil((xy[i, 1] + tile_extent) * sy)))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        out[y0:y1, x0:x1] = (1 - HEATMAP_ALPHA) * base[y0:y1, x0:x1] + HEATMAP_ALPHA * colors[i]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), (sw, sh)


def plot_attention_heatmap(coords: np.ndarray, attention: np.ndarray, tile_extent: float, path,
                           thumbnail=None, slide_size: tuple[int, int] | None = None,
                           title: str = "") -> Path:
    """Attention (as percentile rank) over the slide: tiles at level-0 ``coords`` (top-left
    x, y) of side ``tile_extent``, blended over ``thumbnail`` (covering ``slide_size``; by
    default the tiles' extent) or a white canvas; axes in level-0 pixels."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    image, (sw, sh) = attention_composite(coords, attention, tile_extent, thumbnail, slide_size)
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.imshow(image, extent=(0, sw, sh, 0), interpolation="nearest")
    mappable = ScalarMappable(norm=Normalize(0, 1), cmap=colormaps[HEATMAP_CMAP])
    # A colorbar axis appended to the image axis matches the image's height at any aspect.
    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.1)
    fig.colorbar(mappable, cax=cax, label="attention (percentile)")
    ax.set(xlabel="x (level-0 px)", ylabel="y (level-0 px)",
           title=title or f"Attention ({len(np.ravel(attention))} tiles)")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- markdown

def write_markdown_report(path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write ``# title`` then ``## heading`` + body for each section; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"]
    parts += [f"## {heading}\n\n{body.rstrip()}\n" for heading, body in sections]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def image_md(rel_path: str, alt: str) -> str:
    """Markdown image link ``![alt](rel_path)``. The path is percent-encoded (a slide id may
    hold spaces, parentheses or ``#``, which end or break a Markdown link) and brackets in the
    alt text are escaped."""
    alt = alt.replace("[", "\\[").replace("]", "\\]")
    return f"![{alt}]({quote(rel_path, safe='/')})"


# ------------------------------------------------------------------- the fuse output folder

def _csv(rows: list[list[object]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _predictions_csv(c, task, fold_ids: np.ndarray, oof: dict[str, np.ndarray]) -> str:
    header = ["method", "sample", "slide_id", "patient_id", "fold"] + task.columns(c)
    rows: list[list[object]] = [header]
    slide_of = (np.arange(c.num_samples) if c.sample_slide is None else c.sample_slide)
    for m, p in oof.items():
        for i in range(c.num_samples):
            s = int(slide_of[i])
            rows.append([m, i, c.unit_label(s), c.patient_ids[s], int(fold_ids[i])]
                        + task.cells(c, i, p[i]))
    return _csv(rows)


def slide_thumbnail(cfg, slide_id: str):
    """(PIL image, level-0 size) from a tile dataset folder, or (None, None)."""
    if not cfg.thumbnails:
        return None, None
    from PIL import Image

    for base in (storage.join(cfg.thumbnails, "thumbnails"), cfg.thumbnails):
        url = storage.join(base, f"{encode_id(slide_id)}.png")  # as tile writes it
        if storage.exists(url):
            img = Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB")
            size = None
            man = storage.join(base.rsplit("/thumbnails", 1)[0], "manifest.json")
            if storage.exists(man):
                slides = json.loads(storage.read_text(man)).get("slides", [])
                slides = slides.values() if isinstance(slides, dict) else slides
                size = next((tuple(s["level0_size"]) for s in slides
                             if s.get("slide_id") == slide_id and s.get("level0_size")), None)
            return img, size
    log.warning("fuse: no thumbnail for %s under %s; heatmap drawn on a blank canvas",
                slide_id, cfg.thumbnails)
    return None, None


def _plots(c, cfg, s, results, out: Path, fold_ids: np.ndarray) -> list[tuple[str, str]]:
    """Draw every plot; returns (relative path, caption) pairs for the report."""
    pdir = out / "plots"
    named = {s.labels[m]: p for m, p in s.oof.items()}
    plots = [s.task.plot(c, named, fold_ids, pdir)]
    metric = s.task.primary_metric
    plot_fold_bars({s.labels[m]: v for m, v in s.fold_metrics.items()}, metric,
                   pdir / f"folds_{metric}.png")
    plots.append((f"plots/folds_{metric}.png", f"{metric} per fold"))
    for r in results:
        for m, per_slide in sorted(r.attention.items()):
            e = m[len("expert."):]
            for i, attn in sorted(per_slide.items()):
                for sid, xy, a, of in _per_slide(c, e, i, attn):
                    thumb, size = slide_thumbnail(cfg, sid)
                    rel = f"plots/attention_{e}_{encode_id(sid)}.png"
                    plot_attention_heatmap(xy, a, c.tile_extent[e], out / rel,
                                           thumbnail=thumb, slide_size=size,
                                           title=f"{e} attention, {sid}{of} (held out, "
                                                 f"fold {r.fold})")
                    plots.append((rel, f"ABMIL attention of expert {e} on {sid}{of}"))
    return plots


def _per_slide(c, e: str, i: int, attn: np.ndarray):
    """(slide, coords, attention, caption suffix) of each slide of unit ``i``: a patient's
    pooled attention is split back per slide (coordinates repeat across slides; each slide
    is drawn on its own thumbnail, with the attention the pooled bag gave its tiles)."""
    coords = np.asarray(c.coords[e][i])
    if c.members is None:
        yield c.slide_ids[i], coords, attn, ""
        return
    edges = np.cumsum([0] + list(c.member_sizes[e][i]))
    for k, sid in enumerate(c.members[i]):
        lo, hi = edges[k], edges[k + 1]
        yield sid, coords[lo:hi], np.asarray(attn)[lo:hi], f" (patient {c.slide_ids[i]})"


def write_outputs(c, cfg, fold_ids: np.ndarray, results, s, extra_notes: dict[str, str],
                  run) -> None:
    """Write results, predictions, per-fold metrics, folds, the manifest, plots and
    report.md to ``cfg.output`` (built in a temporary folder, then uploaded), and log them
    to MLflow. ``s`` is ``evaluate.Scores``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fusedist-fuse-") as tmp:
        out = Path(tmp)
        plots = _plots(c, cfg, s, results, out, fold_ids)
        (out / "results.md").write_text(s.table_md + "\n")
        (out / "results.csv").write_text(s.table_csv)
        (out / "predictions.csv").write_text(_predictions_csv(c, s.task, fold_ids, s.oof))
        (out / "metrics_per_fold.csv").write_text(_csv(
            [["method", "fold", "metric", "value"]]
            + [[m, f, k, v] for m, fm in s.fold_metrics.items() for f, d in enumerate(fm)
               for k, v in d.items()]))
        (out / "folds.csv").write_text(_csv(
            [["sample", "slide_id", "patient_id", "fold"]]
            + [[i, c.unit_label(s), c.patient_ids[s], int(fold_ids[i])] for i, s in enumerate(
                range(c.num_samples) if c.sample_slide is None else c.sample_slide)]))
        manifest = {
            "task": c.task, "encoders": c.encoders, "feature_group": c.feature_group,
            "classes": c.classes, "targets": c.target_names,
            **_units_manifest(c),
            "samples": c.num_samples, "folds": cfg.folds, "inner_folds": cfg.inner_folds,
            "methods": s.methods, "exclusions": c.exclusions, "notes": c.notes + [
                f"{k}: {v}" for k, v in extra_notes.items()],
            "objectives": s.objectives, "ratios": s.ratios,
            "summary": {m: {k: list(v) for k, v in d.items()} for m, d in s.summary.items()},
            "costs": s.costs}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
        best, metric = s.best, s.task.primary_metric
        sections = [
            ("Results", f"Task **{c.task}**, {_units_text(c)} ({c.num_samples} "
                        f"samples), {cfg.folds}-fold cross-validation stratified and grouped "
                        f"by patient (seed {cfg.seed}). Mean ± std over folds; train s is "
                        "the mean per fold of each method's own training.\n\n" + s.table_md
                        + f"\n\nBest on {metric}: **{s.labels.get(best, best)}**."),
            ("Plots", "\n\n".join(image_md(p, cap) + f"\n\n*{cap}*" for p, cap in plots)),
            ("Cost", _cost_text(s.costs, s.ratios, s.objectives, c)),
            ("Exclusions and notes", _exclusion_text(c, extra_notes)),
        ]
        write_markdown_report(out / "report.md", "fusedist fuse report", sections)
        for p in sorted(out.rglob("*")):
            if p.is_file():
                storage.upload_file(p, storage.join(cfg.output, p.relative_to(out).as_posix()))
        _log_mlflow(run, s.fold_metrics, s.summary, s.costs, s.objectives, s.ratios, out)


def _cost_text(costs, ratios, objectives, c) -> str:
    lines = []
    if "feature_fusion_per_logitprod" in ratios:
        lines.append(f"Measured: LogitProd's gate trains in {costs['logitprod']['train_s']:.2f} "
                     "s per fold; feature fusion (concat and Meta-Encoder, mean) takes "
                     f"**{ratios['feature_fusion_per_logitprod']:.1f}x** as long. Both reuse "
                     "nothing else: the experts that LogitProd combines are trained anyway "
                     "(their cost is in the expert rows).")
    if "logitprod" in objectives:
        best = min((v, k) for k, v in objectives.items() if k.startswith("expert."))
        lines.append(f"Training objective on the gate's data (lower is better): LogitProd "
                     f"{objectives['logitprod']:.4f}, best single expert {best[1]} "
                     f"{best[0]:.4f}.")
    return "\n\n".join(lines) or "No logit-level method ran."


def _exclusion_text(c, extra: dict[str, str]) -> str:
    lines = [f"- {_excluded(x)}: {x['reason']}" for x in c.exclusions[:50]]
    if len(c.exclusions) > 50:
        lines.append(f"- ... {len(c.exclusions) - 50} more in manifest.json")
    lines += [f"- {n}" for n in c.notes] + [f"- {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) or "None: every labelled slide with bags was used."


def _excluded(x: dict[str, str]) -> str:
    """Who an exclusion is about: the slide, with its patient when samples are patients."""
    if not x.get("patient_id"):
        return x["slide_id"]
    return f"{x['slide_id']} (patient {x['patient_id']})" if x["slide_id"] else \
        f"patient {x['patient_id']}"


def _units_manifest(c) -> dict:
    """The manifest's ``slides`` (the slides used), and with ``unit: patient`` the
    patients with their slides (``slides`` then lists every pooled slide)."""
    if c.members is None:
        return {"slides": c.slide_ids}
    return {"unit": "patient", "slides": [s for m in c.members for s in m],
            "patients": dict(zip(c.slide_ids, c.members))}


def _units_text(c) -> str:
    if c.members is None:
        return f"{len(c.slide_ids)} slides"
    return (f"{len(c.slide_ids)} patients ({sum(map(len, c.members))} slides, each "
            "patient's bags pooled: one sample per patient)")


def _log_mlflow(run, fold_metrics, summary, costs, objectives, ratios, out: Path) -> None:
    if not run.active:
        return
    for m, folds in fold_metrics.items():
        for f, d in enumerate(folds):
            run.log_metrics({f"{m}/{k}": v for k, v in d.items() if np.isfinite(v)}, step=f)
    flat = {}
    for m, s in summary.items():
        for k, (mu, sd) in s.items():
            if np.isfinite(mu):
                flat[f"{m}/{k}_mean"], flat[f"{m}/{k}_std"] = mu, sd
        for k in ("train_s", "params"):
            if k in costs[m]:
                flat[f"{m}/{k}"] = costs[m][k]
    flat.update({f"objective/{k}": v for k, v in objectives.items()})
    flat.update({f"ratio/{k}": v for k, v in ratios.items()})
    run.log_metrics(flat)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            run.log_artifact(p, "fuse/" + p.parent.relative_to(out).as_posix()
                             if p.parent != out else "fuse")
