"""The four fusion tasks as objects: what each reads from the labels, how a fold prepares its
targets, the loss, what predictions look like, how they are scored, stratified and plotted.

Nothing else in ``fusedist.fusion`` compares task names: the cohort, the folds, the training
loops, the methods and the report ask the task object. A new task is one new class here and
one entry in ``TASKS``.

Two levels:
- ``Task`` (one per run) parses targets, checks the cohort, scores, stratifies, plots;
- ``Targets`` (one per fold, or per fitted model) holds what the training fold fixed: class
  names, survival time bins, the regression standardisation. It turns raw head outputs into
  predictions, so a saved model carries it (``card()`` / ``targets_from_card``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fusedist.config import ConfigError
from fusedist.fusion import report as rp
from fusedist.fusion.metrics import METRICS, PRIMARY_METRIC, task_metrics

if TYPE_CHECKING:
    from torch import Tensor

    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.cohort import Cohort


def _float(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def _missing(cfg: FuseConfig, r: dict[str, str], names: list[str]) -> str | None:
    """Why row ``r`` has no target (a ``missing_values`` cell in ``names``), or None."""
    na = set(cfg.missing_values) | {""}
    gone = [c for c in names if r[c] in na]
    if not gone:
        return None
    return ("missing value " + ", ".join(f"{c}={r[c]!r}" for c in gone) + f" in {cfg.labels}"
            " (a `missing_values` spelling)")


def need_columns(url: str, cols: list[str], needed: list[str], key: str) -> None:
    missing = [c for c in needed if c not in cols]
    if missing:
        raise ConfigError(f"labels: {url} has no column(s) {missing} (columns: {cols}); "
                          f"set `{key}` to the right column(s)")


def class_order(values: list[str]) -> list[str]:
    """Classes sorted numerically when they are numbers ("2" < "10"), else as text."""
    try:
        return sorted(set(values), key=float)
    except ValueError:
        return sorted(set(values))


# ------------------------------------------------------------------------------ targets

@dataclass
class Targets:
    """What one training fold fixed about the targets; base of the per-task kinds."""

    num_outputs: int

    def targets(self, idx: np.ndarray, device) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def loss(self, out: Tensor, tgt: tuple[Tensor, ...]) -> Tensor:
        raise NotImplementedError

    def predict(self, out: np.ndarray) -> np.ndarray:
        """Raw head outputs -> what metrics read and predictions.csv shows."""
        raise NotImplementedError

    def card(self) -> dict:
        """What a saved model needs to turn raw outputs into predictions (JSON)."""
        raise NotImplementedError


@dataclass
class ClassTargets(Targets):
    classes: list[str] = field(default_factory=list)
    y: np.ndarray | None = None

    def targets(self, idx, device):
        import torch

        return (torch.as_tensor(self.y[idx], device=device),)

    def loss(self, out, tgt):
        import torch.nn.functional as F

        return F.cross_entropy(out.float(), tgt[0].long())

    def predict(self, out):
        import torch
        import torch.nn.functional as F

        return F.softmax(torch.as_tensor(out, dtype=torch.float32), dim=-1).numpy()

    def card(self):
        return {"classes": self.classes}


@dataclass
class SurvivalTargets(Targets):
    bin_edges: list[float] = field(default_factory=list)
    alpha: float = 0.4
    time_bin: np.ndarray | None = None
    event: np.ndarray | None = None

    def targets(self, idx, device):
        import torch

        return (torch.as_tensor(self.time_bin[idx], device=device),
                torch.as_tensor(self.event[idx], device=device))

    def loss(self, out, tgt):
        # lazy: survival imports torch; the tasks load with the cohort, before torch
        from fusedist.fusion.survival import nll_survival_loss

        return nll_survival_loss(out, tgt[0], tgt[1], alpha=self.alpha)

    def predict(self, out):
        import torch

        # lazy: survival imports torch; the tasks load with the cohort, before torch
        from fusedist.fusion.survival import survival_risk

        return survival_risk(torch.as_tensor(out, dtype=torch.float32)).numpy()

    def card(self):
        return {"time_bins": [float(v) for v in self.bin_edges], "alpha": self.alpha}


@dataclass
class RegressionTargets(Targets):
    names: list[str] = field(default_factory=list)
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    y: np.ndarray | None = None
    """Standardised targets (S, G)."""

    def targets(self, idx, device):
        import torch

        return (torch.as_tensor(self.y[idx], device=device),)

    def loss(self, out, tgt):
        import torch.nn.functional as F

        return F.mse_loss(out.float(), tgt[0].float())

    def predict(self, out):
        import torch

        t = torch.as_tensor(out, dtype=torch.float32)
        return (t.numpy() * self.std + self.mean).astype(np.float32)

    def card(self):
        return {"targets": self.names, "mean": np.asarray(self.mean, np.float64).tolist(),
                "std": np.asarray(self.std, np.float64).tolist()}


# --------------------------------------------------------------------------------- tasks

class Task:
    """One kind of prediction target; subclasses fill in the hooks."""

    name: ClassVar[str]
    tile: ClassVar[bool] = False
    """One sample per sampled tile rather than per slide."""

    def __init__(self, cfg: FuseConfig) -> None:
        self.cfg = cfg

    # what the report and the tables use
    @property
    def primary_metric(self) -> str:
        return PRIMARY_METRIC[self.name]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS[self.name]

    def score(self, c: Cohort, idx: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def strata(self, c: Cohort, idx: np.ndarray) -> np.ndarray:
        return np.zeros(len(idx), np.int64)

    def parse(self, rows: list[dict[str, str]], cols: list[str]
              ) -> tuple[dict[str, object], dict[str, str], list[str]]:
        """slide_id -> parsed target, slide_id -> why it has none, and the target names."""
        raise NotImplementedError

    def set_targets(self, c: Cohort, targets: dict[str, object]) -> None:
        raise NotImplementedError

    def check(self, c: Cohort) -> None:
        """Stop the run (ConfigError) when the folds cannot work on this cohort."""

    def prepare(self, c: Cohort, train_idx: np.ndarray) -> Targets:
        """The fold's targets, learnt from the training samples only."""
        raise NotImplementedError

    def columns(self, c: Cohort) -> list[str]:
        """Truth and prediction columns of predictions.csv."""
        raise NotImplementedError

    def cells(self, c: Cohort, i: int, pred: np.ndarray) -> list[object]:
        raise NotImplementedError

    def plot(self, c: Cohort, named: dict[str, np.ndarray], fold_ids: np.ndarray,
             pdir: Path) -> tuple[str, str]:
        """Draw the task's main plot of out-of-fold predictions; (relative path, caption)."""
        raise NotImplementedError


class ClassificationTask(Task):
    name = "classification"

    def _column(self) -> str:
        t = self.cfg.target
        return t if isinstance(t, str) else t[0]

    def score(self, c, idx, pred):
        return task_metrics(self.name, c.y[idx], pred)

    def strata(self, c, idx):
        return c.y[idx]

    def parse(self, rows, cols):
        col, cfg = self._column(), self.cfg
        need_columns(cfg.labels, cols, [col], "target")
        ok, bad = {}, {}
        for r in rows:
            why = _missing(cfg, r, [col])
            (ok.__setitem__(r["slide_id"], r[col]) if why is None
             else bad.__setitem__(r["slide_id"], why))
        return ok, bad, [col]

    def set_targets(self, c, targets):
        vals = [str(targets[s]) for s in c.slide_ids]
        c.classes = class_order(vals)
        if len(c.classes) < 2:
            raise ConfigError(f"labels: {self.cfg.labels}: only one class ({c.classes}) among "
                              f"the {len(vals)} usable slides; classification needs two or "
                              "more")
        c.y = np.array([c.classes.index(v) for v in vals], np.int64)

    def check(self, c):
        cfg = self.cfg
        groups = c.sample_groups
        need = max(cfg.folds, math.ceil(cfg.inner_folds * cfg.folds / (cfg.folds - 1)))
        for k, name in enumerate(c.classes):
            pats = {g for g, y in zip(groups, c.y) if y == k}
            if len(pats) < need:
                raise ConfigError(
                    f"class {name!r} has {len(pats)} patient(s); folds={cfg.folds} with "
                    f"inner_folds={cfg.inner_folds} need at least {need} per class. Lower "
                    "folds/inner_folds, merge the class with another, or drop its rows from "
                    f"{cfg.labels}")

    def prepare(self, c, train_idx):
        return ClassTargets(len(c.classes), classes=list(c.classes), y=c.y)

    def columns(self, c):
        return ["label"] + [f"prob_{k}" for k in c.classes]

    def cells(self, c, i, pred):
        return [c.classes[int(c.y[i])]] + [f"{v:.6g}" for v in pred]

    def plot(self, c, named, fold_ids, pdir):
        rp.plot_roc(c.y, named, pdir / "roc.png")
        return "plots/roc.png", ("ROC curves of the pooled out-of-fold predictions "
                                 "(their AUC; the table's is the mean over folds)")


class TileClassificationTask(ClassificationTask):
    name = "tile_classification"
    tile = True


class SurvivalTask(Task):
    name = "survival"

    def score(self, c, idx, pred):
        return task_metrics(self.name, None, pred, time=c.time[idx], event=c.event[idx])

    def strata(self, c, idx):
        return c.event[idx]

    def parse(self, rows, cols):
        cfg = self.cfg
        tc, ec = cfg.time_column, cfg.event_column
        need_columns(cfg.labels, cols, [tc, ec], "time_column/event_column")
        ok, bad = {}, {}
        for r in rows:
            why = _missing(cfg, r, [tc, ec])
            if why is not None:
                bad[r["slide_id"]] = why
                continue
            t, e = _float(r[tc]), _float(r[ec])
            if t is None or t < 0 or e not in (0.0, 1.0):
                bad[r["slide_id"]] = (f"{tc}={r[tc]!r}, {ec}={r[ec]!r} in {cfg.labels}: need a "
                                      "time >= 0 and an event of 0 or 1")
            else:
                ok[r["slide_id"]] = (t, int(e))
        return ok, bad, [tc, ec]

    def set_targets(self, c, targets):
        vals = [targets[s] for s in c.slide_ids]
        c.time = np.array([v[0] for v in vals], np.float64)
        c.event = np.array([v[1] for v in vals], np.int64)
        bins = self.cfg.survival_bins
        if c.event.sum() < bins:
            raise ConfigError(f"labels: {self.cfg.labels}: {int(c.event.sum())} uncensored "
                              f"slides, fewer than survival_bins={bins}; lower survival_bins "
                              "or add events")

    def prepare(self, c, train_idx):
        bins = self.cfg.survival_bins
        t_unc = c.time[train_idx][c.event[train_idx] == 1]
        edges = np.quantile(t_unc, np.linspace(0, 1, bins + 1))
        tb = np.clip(np.searchsorted(edges[1:-1], c.time, side="right"), 0, bins - 1)
        return SurvivalTargets(bins, bin_edges=edges.tolist(), alpha=self.cfg.survival_alpha,
                               time_bin=tb.astype(np.int64), event=c.event)

    def columns(self, c):
        return ["time", "event", "risk"]

    def cells(self, c, i, pred):
        return [c.time[i], int(c.event[i]), float(pred)]

    def plot(self, c, named, fold_ids, pdir):
        ranked = {k: rank_within_folds(v, fold_ids) for k, v in named.items()}
        rp.plot_km(c.time, c.event, ranked, pdir / "km.png", max_panels=12,
                   time_label=f"time (labels column '{self.cfg.time_column}')")
        return "plots/km.png", ("Kaplan-Meier curves, patients split at the median "
                                "out-of-fold risk (ranked within each fold)")


class RegressionTask(Task):
    name = "regression"

    def score(self, c, idx, pred):
        return task_metrics(self.name, c.y[idx], pred)

    def parse(self, rows, cols):
        import fnmatch

        cfg = self.cfg
        pats = [cfg.target] if isinstance(cfg.target, str) else list(cfg.target)
        names: list[str] = []
        for p in pats:
            hits = [c for c in cols if fnmatch.fnmatchcase(c, p)] \
                if any(ch in p for ch in "*?[") else [p]
            if not hits:
                raise ConfigError(f"labels: {cfg.labels}: no column matches target {p!r} "
                                  f"(columns: {cols})")
            names += [h for h in hits if h not in names]
        need_columns(cfg.labels, cols, names, "target")
        ok, bad = {}, {}
        for r in rows:
            why = _missing(cfg, r, names)
            if why is not None:
                bad[r["slide_id"]] = why
                continue
            vals = [_float(r[c]) for c in names]
            if any(v is None for v in vals):
                bad[r["slide_id"]] = f"missing or non-numeric target(s) in {cfg.labels}"
            else:
                ok[r["slide_id"]] = vals
        return ok, bad, names

    def set_targets(self, c, targets):
        vals = [targets[s] for s in c.slide_ids]
        c.y = np.array(vals, np.float32).reshape(len(vals), -1)

    def prepare(self, c, train_idx):
        mean, std = c.y[train_idx].mean(0), c.y[train_idx].std(0)
        std = np.where(std > 1e-8, std, 1.0)
        return RegressionTargets(c.y.shape[1], names=list(c.target_names), mean=mean, std=std,
                                 y=(c.y - mean) / std)

    def columns(self, c):
        return [f"true_{n}" for n in c.target_names] + [f"pred_{n}" for n in c.target_names]

    def cells(self, c, i, pred):
        return [f"{v:.6g}" for v in c.y[i]] + [f"{v:.6g}" for v in pred]

    def plot(self, c, named, fold_ids, pdir):
        rp.plot_regression(c.y, named, pdir / "regression.png")
        return "plots/regression.png", "Pearson r per target (out-of-fold)"


def rank_within_folds(risk: np.ndarray, fold_ids: np.ndarray) -> np.ndarray:
    """Each fold's model has its own risk scale (and its own time bins), so pooled
    out-of-fold risks are split at the median only after ranking them within their fold."""
    out = np.full(len(risk), np.nan)
    for f in np.unique(fold_ids):
        m = (fold_ids == f) & np.isfinite(risk)
        if m.any():
            out[m] = (np.argsort(np.argsort(risk[m])) + 0.5) / m.sum()
    return out


TASKS: dict[str, type[Task]] = {t.name: t for t in (
    ClassificationTask, TileClassificationTask, SurvivalTask, RegressionTask)}


def get_task(cfg: FuseConfig) -> Task:
    return TASKS[cfg.task](cfg)


def targets_from_card(task: str, card: dict) -> Targets:
    """The prediction half of a fold's targets, from a model card."""
    if task in ("classification", "tile_classification"):
        return ClassTargets(len(card["classes"]), classes=list(card["classes"]))
    if task == "survival":
        return SurvivalTargets(len(card["time_bins"]) - 1, bin_edges=list(card["time_bins"]),
                               alpha=float(card.get("alpha", 0.4)))
    return RegressionTargets(len(card["targets"]), names=list(card["targets"]),
                             mean=np.asarray(card["mean"], np.float32),
                             std=np.asarray(card["std"], np.float32))
