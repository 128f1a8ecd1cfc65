"""Score the folds' held-out predictions, write tables, plots, predictions and the report,
and log them to MLflow."""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusedist import storage
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import Cohort
from fusedist.fusion.fold import FoldResult
from fusedist.fusion.metrics import METRICS, PRIMARY_METRIC, summarize, task_metrics

log = logging.getLogger("fusedist")

_ORDER = ("expert.", "best_expert", "mean_ensemble", "logitprod", "concat", "meta.",
          "fusecpath")


def method_label(m: str, task: str) -> str:
    if m.startswith("expert."):
        return f"expert {m[len('expert.'):]}"
    if m.startswith("meta."):
        return f"Meta-Encoder {m[len('meta.'):]}"
    head = "MLP" if task == "tile_classification" else "ABMIL"
    return {"best_expert": "best single expert", "mean_ensemble": "mean-prob ensemble",
            "logitprod": "LogitProd", "concat": f"concat-feature {head}",
            "fusecpath": "FuseCPath"}.get(m, m)


def _ordered(methods: set[str]) -> list[str]:
    return sorted(methods, key=lambda m: (next(i for i, p in enumerate(_ORDER)
                                               if m.startswith(p)), m))


def _oof(c: Cohort, results: list[FoldResult], m: str) -> np.ndarray:
    first = next(r.preds[m] for r in results if m in r.preds)
    out = np.full((c.num_samples, *first.shape[1:]), np.nan, np.float32)
    for r in results:
        if m in r.preds:
            out[r.test_idx] = r.preds[m]
    return out


def _fold_metrics(c: Cohort, r: FoldResult, pred: np.ndarray) -> dict[str, float]:
    t = r.test_idx
    return task_metrics(c.task, None if c.y is None else c.y[t], pred,
                        time=None if c.time is None else c.time[t],
                        event=None if c.event is None else c.event[t])


def _costs(results: list[FoldResult], m: str, oof: np.ndarray) -> dict[str, float]:
    rows = [r.costs[m] for r in results if m in r.costs]
    valid = np.isfinite(oof.reshape(len(oof), -1)).all(axis=1)
    out = {"n": int(valid.sum())}
    if rows:
        out["train_s"] = float(np.mean([x["train_s"] for x in rows]))
        out["params"] = int(max(x["params"] for x in rows))
    return out


def _notes(results: list[FoldResult], methods: list[str], c: Cohort) -> dict[str, str]:
    notes: dict[str, str] = {}
    chosen = Counter(r.chosen["best_expert"] for r in results if "best_expert" in r.chosen)
    if chosen:
        notes["best_expert"] = "chosen per fold on inner out-of-fold scores: " + ", ".join(
            f"{e} x{n}" for e, n in chosen.most_common())
    weights = [r.gate_weights for r in results if r.gate_weights]
    if weights:
        w = np.mean(weights, axis=0)
        notes["logitprod"] = "mean gate weights " + ", ".join(
            f"{e} {x:.2f}" for e, x in zip(c.encoders, w)) + "; reuses the experts"
        fell = [r.chosen["logitprod_fallback"] for r in results
                if "logitprod_fallback" in r.chosen]
        if fell:
            notes["logitprod"] += (f"; in {len(fell)} fold(s) one expert alone had the lower "
                                   f"training objective and was used ({', '.join(fell)})")
    for m in methods:
        extra = {r.notes[m] for r in results if m in r.notes and m not in notes}
        if extra:
            notes[m] = "; ".join(sorted(extra))[:300]
    return notes


@dataclass
class FuseResult:
    """What ``run_fuse`` measured; everything here is also in the output folder."""

    output: str
    task: str
    primary_metric: str
    methods: list[str]
    fold_metrics: dict[str, list[dict[str, float]]]
    summary: dict[str, dict[str, tuple[float, float]]]
    costs: dict[str, dict[str, float]]
    objectives: dict[str, float]
    notes: dict[str, str]
    exclusions: list[dict[str, str]]
    table_md: str
    table_csv: str
    report: str
    folds_run: int = 0
    folds_resumed: int = 0
    elapsed: float = 0.0
    ratios: dict[str, float] = field(default_factory=dict)
    random_weights: str = ""
    """The RANDOM WEIGHTS line when some bags came from random-weight encoders."""

    def best(self) -> str:
        ok = {m: s[self.primary_metric][0] for m, s in self.summary.items()
              if np.isfinite(s[self.primary_metric][0])}
        return max(ok, key=ok.get) if ok else ""

    def summary_text(self) -> str:
        lines = [self.table_md, "",
                 f"{len(self.methods)} methods x {len(next(iter(self.fold_metrics.values())))} "
                 f"folds in {self.elapsed:.1f} s ({self.folds_run} folds run, "
                 f"{self.folds_resumed} resumed); best: {self.best()}",
                 f"{len(self.exclusions)} slide(s) excluded (see manifest.json)",
                 f"report: {self.report}"]
        if "feature_fusion_per_logitprod" in self.ratios:
            lines.append("LogitProd's gate trains "
                         f"{self.ratios['feature_fusion_per_logitprod']:.1f}x faster than "
                         "feature fusion (mean of concat and Meta-Encoder), measured")
        if self.random_weights:
            lines.append(self.random_weights)
        return "\n".join(lines)


# ------------------------------------------------------------------------------ files

def _csv(rows: list[list[object]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _predictions_csv(c: Cohort, fold_ids: np.ndarray, oof: dict[str, np.ndarray]) -> str:
    header = ["method", "sample", "slide_id", "patient_id", "fold"]
    if c.task == "survival":
        header += ["time", "event", "risk"]
    elif c.task == "regression":
        header += [f"true_{n}" for n in c.target_names] + [f"pred_{n}" for n in c.target_names]
    else:
        header += ["label"] + [f"prob_{k}" for k in c.classes]
    rows: list[list[object]] = [header]
    slide_of = (np.arange(c.num_samples) if c.sample_slide is None else c.sample_slide)
    for m, p in oof.items():
        for i in range(c.num_samples):
            s = int(slide_of[i])
            row: list[object] = [m, i, c.slide_ids[s], c.patient_ids[s], int(fold_ids[i])]
            if c.task == "survival":
                row += [c.time[i], int(c.event[i]), float(p[i])]
            elif c.task == "regression":
                row += [f"{v:.6g}" for v in c.y[i]] + [f"{v:.6g}" for v in p[i]]
            else:
                row += [c.classes[int(c.y[i])]] + [f"{v:.6g}" for v in p[i]]
            rows.append(row)
    return _csv(rows)


def _thumbnail(cfg: FuseConfig, slide_id: str):
    """(PIL image, level-0 size) from a tile dataset folder, or (None, None)."""
    if not cfg.thumbnails:
        return None, None
    from PIL import Image

    for base in (storage.join(cfg.thumbnails, "thumbnails"), cfg.thumbnails):
        url = storage.join(base, f"{slide_id}.png")
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


def _rank_within_folds(risk: np.ndarray, fold_ids: np.ndarray) -> np.ndarray:
    """Each fold's model has its own risk scale (and its own time bins), so pooled
    out-of-fold risks are split at the median only after ranking them within their fold."""
    out = np.full(len(risk), np.nan)
    for f in np.unique(fold_ids):
        m = (fold_ids == f) & np.isfinite(risk)
        if m.any():
            out[m] = (np.argsort(np.argsort(risk[m])) + 0.5) / m.sum()
    return out


def _plots(c: Cohort, cfg: FuseConfig, oof: dict[str, np.ndarray],
           fold_metrics: dict[str, list[dict[str, float]]], results: list[FoldResult],
           out: Path, fold_ids: np.ndarray) -> list[tuple[str, str]]:
    """Draw every plot; returns (relative path, caption) pairs for the report."""
    from fusedist.fusion import report as rp

    plots, pdir = [], out / "plots"
    labels = {m: method_label(m, c.task) for m in oof}
    named = {labels[m]: p for m, p in oof.items()}
    if c.task in ("classification", "tile_classification"):
        rp.plot_roc(c.y, named, pdir / "roc.png")
        plots.append(("plots/roc.png", "ROC curves of the pooled out-of-fold predictions "
                                       "(their AUC; the table's is the mean over folds)"))
    elif c.task == "survival":
        ranked = {k: _rank_within_folds(v, fold_ids) for k, v in named.items()}
        rp.plot_km(c.time, c.event, ranked, pdir / "km.png", max_panels=12,
                   time_label=f"time (labels column '{cfg.time_column}')")
        plots.append(("plots/km.png", "Kaplan-Meier curves, patients split at the median "
                                      "out-of-fold risk (ranked within each fold)"))
    else:
        rp.plot_regression(c.y, named, pdir / "regression.png")
        plots.append(("plots/regression.png", "Pearson r per target (out-of-fold)"))
    metric = PRIMARY_METRIC[c.task]
    rp.plot_fold_bars({labels[m]: v for m, v in fold_metrics.items()}, metric,
                      pdir / f"folds_{metric}.png")
    plots.append((f"plots/folds_{metric}.png", f"{metric} per fold"))
    for r in results:
        for m, per_slide in sorted(r.attention.items()):
            e = m[len("expert."):]
            for i, attn in sorted(per_slide.items()):
                sid = c.slide_ids[i]
                thumb, size = _thumbnail(cfg, sid)
                rel = f"plots/attention_{e}_{sid}.png"
                rp.plot_attention_heatmap(c.coords[e][i], attn, c.tile_extent[e], out / rel,
                                          thumbnail=thumb, slide_size=size,
                                          title=f"{e} attention, {sid} (held out, fold "
                                                f"{r.fold})")
                plots.append((rel, f"ABMIL attention of expert {e} on {sid}"))
    return plots


def evaluate(c: Cohort, cfg: FuseConfig, fold_ids: np.ndarray, results: list[FoldResult],
             extra_notes: dict[str, str], run) -> "FuseResult":
    """Metrics per fold, the table, plots, files in ``cfg.output``, and MLflow logging."""
    from fusedist.fusion import report as rp

    methods = _ordered({m for r in results for m in r.preds})
    oof = {m: _oof(c, results, m) for m in methods}
    fold_metrics = {m: [_fold_metrics(c, r, r.preds[m]) if m in r.preds else
                        {k: float("nan") for k in METRICS[c.task]} for r in results]
                    for m in methods}
    costs = {m: _costs(results, m, oof[m]) for m in methods}
    notes = _notes(results, methods, c)
    objectives = {k: float(np.mean([r.objectives[k] for r in results if k in r.objectives]))
                  for k in {k for r in results for k in r.objectives}}
    ratios = {}
    ff = [costs[m]["train_s"] for m in methods if m == "concat" or m.startswith("meta.")]
    if ff and costs.get("logitprod", {}).get("train_s"):
        ratios["feature_fusion_per_logitprod"] = float(np.mean(ff)) / costs["logitprod"]["train_s"]
    labels = {m: method_label(m, c.task) for m in methods}
    table_md, table_csv = rp.comparison_table(c.task, fold_metrics, costs, notes, labels)
    summary = summarize(fold_metrics)
    metric = PRIMARY_METRIC[c.task]

    with tempfile.TemporaryDirectory(prefix="fusedist-fuse-") as tmp:
        out = Path(tmp)
        plots = _plots(c, cfg, oof, fold_metrics, results, out, fold_ids)
        (out / "results.md").write_text(table_md + "\n")
        (out / "results.csv").write_text(table_csv)
        (out / "predictions.csv").write_text(_predictions_csv(c, fold_ids, oof))
        (out / "metrics_per_fold.csv").write_text(_csv(
            [["method", "fold", "metric", "value"]]
            + [[m, f, k, v] for m, fm in fold_metrics.items() for f, d in enumerate(fm)
               for k, v in d.items()]))
        (out / "folds.csv").write_text(_csv(
            [["sample", "slide_id", "patient_id", "fold"]]
            + [[i, c.slide_ids[s], c.patient_ids[s], int(fold_ids[i])] for i, s in enumerate(
                range(c.num_samples) if c.sample_slide is None else c.sample_slide)]))
        manifest = {
            "task": c.task, "encoders": c.encoders, "feature_group": c.feature_group,
            "classes": c.classes, "targets": c.target_names, "slides": c.slide_ids,
            "samples": c.num_samples, "folds": cfg.folds, "inner_folds": cfg.inner_folds,
            "methods": methods, "exclusions": c.exclusions, "notes": c.notes + [
                f"{k}: {v}" for k, v in extra_notes.items()],
            "objectives": objectives, "ratios": ratios,
            "summary": {m: {k: list(v) for k, v in s.items()} for m, s in summary.items()},
            "costs": costs}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
        best = max((m for m in methods if np.isfinite(summary[m][metric][0])),
                   key=lambda m: summary[m][metric][0], default="")
        sections = [
            ("Results", f"Task **{c.task}**, {len(c.slide_ids)} slides ({c.num_samples} "
                        f"samples), {cfg.folds}-fold cross-validation stratified and grouped "
                        f"by patient (seed {cfg.seed}). Mean ± std over folds; train s is "
                        "the mean per fold of each method's own training.\n\n" + table_md
                        + f"\n\nBest on {metric}: **{labels.get(best, best)}**."),
            ("Plots", "\n\n".join(rp.image_md(p, cap) + f"\n\n*{cap}*" for p, cap in plots)),
            ("Cost", _cost_text(costs, ratios, objectives, c)),
            ("Exclusions and notes", _exclusion_text(c, extra_notes)),
        ]
        rp.write_markdown_report(out / "report.md", "fusedist fuse report", sections)
        for p in sorted(out.rglob("*")):
            if p.is_file():
                storage.upload_file(p, storage.join(cfg.output, p.relative_to(out).as_posix()))
        _log_mlflow(run, fold_metrics, summary, costs, objectives, ratios, out)
    return FuseResult(
        output=cfg.output, task=c.task, primary_metric=metric, methods=methods,
        fold_metrics=fold_metrics, summary=summary, costs=costs, objectives=objectives,
        notes=notes, exclusions=c.exclusions, table_md=table_md, table_csv=table_csv,
        report=storage.join(cfg.output, "report.md"), ratios=ratios,
        random_weights=next((n for n in c.notes if n.startswith("RANDOM WEIGHTS")), ""))


def _cost_text(costs, ratios, objectives, c: Cohort) -> str:
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


def _exclusion_text(c: Cohort, extra: dict[str, str]) -> str:
    lines = [f"- {x['slide_id']}: {x['reason']}" for x in c.exclusions[:50]]
    if len(c.exclusions) > 50:
        lines.append(f"- ... {len(c.exclusions) - 50} more in manifest.json")
    lines += [f"- {n}" for n in c.notes] + [f"- {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) or "None: every labelled slide with bags was used."


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
