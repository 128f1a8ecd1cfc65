"""Score the folds' held-out predictions: per-fold metrics, costs, notes, the comparison
table. Files, plots, the report and MLflow are ``report.write_outputs``'s."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fusedist import storage
from fusedist.fusion import report as rp
from fusedist.fusion.cohort import Cohort
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.fold import FoldResult
from fusedist.fusion.methods.base import Method
from fusedist.fusion.metrics import summarize
from fusedist.fusion.tasks import Task, get_task

log = logging.getLogger("fusedist")


def _oof(c: Cohort, results: list[FoldResult], m: str) -> np.ndarray:
    first = next(r.preds[m] for r in results if m in r.preds)
    out = np.full((c.num_samples, *first.shape[1:]), np.nan, np.float32)
    for r in results:
        if m in r.preds:
            out[r.test_idx] = r.preds[m]
    return out


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
class Scores:
    """Everything measured from the folds (what the report writes)."""

    task: Task
    methods: list[str]
    labels: dict[str, str]
    oof: dict[str, np.ndarray]
    fold_metrics: dict[str, list[dict[str, float]]]
    summary: dict[str, dict[str, tuple[float, float]]]
    costs: dict[str, dict[str, float]]
    notes: dict[str, str]
    objectives: dict[str, float]
    ratios: dict[str, float]
    table_md: str
    table_csv: str

    @property
    def best(self) -> str:
        """The method with the best mean primary metric ('' when none is finite)."""
        metric = self.task.primary_metric
        return max((m for m in self.methods if np.isfinite(self.summary[m][metric][0])),
                   key=lambda m: self.summary[m][metric][0], default="")


def score(c: Cohort, cfg: FuseConfig, results: list[FoldResult], methods: list[Method]
          ) -> Scores:
    """Metrics per fold and method, costs, notes, objectives, ratios and the table."""
    task = get_task(cfg)
    ran = {m for r in results for m in r.preds}
    rows = [m for m in methods if m.name in ran]
    names = [m.name for m in rows]
    labels = {m.name: m.label(task) for m in rows}
    oof = {m: _oof(c, results, m) for m in names}
    fold_metrics = {m: [task.score(c, r.test_idx, r.preds[m]) if m in r.preds else
                        {k: float("nan") for k in task.metric_names} for r in results]
                    for m in names}
    costs = {m: _costs(results, m, oof[m]) for m in names}
    notes = _notes(results, names, c)
    objectives = {k: float(np.mean([r.objectives[k] for r in results if k in r.objectives]))
                  # first-seen order, not a set's: manifest.json is the same bytes run to run
                  for k in dict.fromkeys(k for r in results for k in r.objectives)}
    ratios = {}
    ff = [costs[m]["train_s"] for m in names if m == "concat" or m.startswith("meta.")]
    if ff and costs.get("logitprod", {}).get("train_s"):
        ratios["feature_fusion_per_logitprod"] = float(np.mean(ff)) / costs["logitprod"]["train_s"]
    table_md, table_csv = rp.comparison_table(task.name, fold_metrics, costs, notes, labels)
    return Scores(task, names, labels, oof, fold_metrics, summarize(fold_metrics), costs,
                  notes, objectives, ratios, table_md, table_csv)


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
    model: str | None = None
    """The fused model's folder, when one was refitted."""
    final_resumed: bool = False
    """The refit had finished in an earlier run; its model folder was kept, not refitted."""
    mlflow_model: dict | None = None
    """Where the fused model is in MLflow: ``model_uri`` (the run's LoggedModel) and, when
    registered, ``registered_model``, ``version``, ``alias`` and ``uri``."""
    flat: dict[str, str] = field(default_factory=dict)
    """Refitted components whose training-slide outputs barely vary -> why
    (``final.min_spread``); ``retrain`` never promotes such a model."""

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
        if self.model:
            lines.append(f"fused model: {self.model}"
                         + (" (refit resumed: kept from an earlier run)" if self.final_resumed
                            else ""))
        lines += [f"FLAT REFIT {m}: {why}; the model barely tells its training slides apart "
                  "(more epochs or a higher lr, see docs/methods.md)"
                  for m, why in self.flat.items()]
        m = self.mlflow_model or {}
        if m.get("version"):
            ref = f"models:/{m['registered_model']}@{m['alias']}" if m.get("alias") else m["uri"]
            lines.append(f"registered: {ref} (version {m['version']}"
                         + (", unchanged: nothing registered" if m.get("reused") else "")
                         + f"); predict with `fusedist predict --model {ref}`")
        elif m:
            lines.append(f"logged: {m['model_uri']}")
        if "feature_fusion_per_logitprod" in self.ratios:
            lines.append("LogitProd's gate trains "
                         f"{self.ratios['feature_fusion_per_logitprod']:.1f}x faster than "
                         "feature fusion (mean of concat and Meta-Encoder), measured")
        if self.random_weights:
            lines.append(self.random_weights)
        return "\n".join(lines)


def evaluate(c: Cohort, cfg: FuseConfig, fold_ids: np.ndarray, results: list[FoldResult],
             extra_notes: dict[str, str], run, methods: list[Method]) -> FuseResult:
    """Score the folds, write every output (``report.write_outputs``), return the result."""
    s = score(c, cfg, results, methods)
    rp.write_outputs(c, cfg, fold_ids, results, s, extra_notes, run)
    return FuseResult(
        output=cfg.output, task=c.task, primary_metric=s.task.primary_metric,
        methods=s.methods, fold_metrics=s.fold_metrics, summary=s.summary, costs=s.costs,
        objectives=s.objectives, notes=s.notes, exclusions=c.exclusions, table_md=s.table_md,
        table_csv=s.table_csv, report=storage.join(cfg.output, "report.md"), ratios=s.ratios,
        random_weights=next((n for n in c.notes if n.startswith("RANDOM WEIGHTS")), ""))
