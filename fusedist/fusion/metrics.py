"""Evaluation metrics for the fusion benchmark: per-task scores, fold summaries, survival stats.

- ``task_metrics`` dispatches on the task (``TASKS``) to classification, survival or
  regression scores; ``PRIMARY_METRIC`` names the score that ranks methods.
- ``summarize`` turns per-fold scores into (mean, std) per method, ignoring failed folds.
- ``kaplan_meier`` / ``logrank_p`` back the Kaplan-Meier panels of the report.

Rows whose prediction is not finite (a method that produced nothing for a sample) are
dropped before scoring, so one missing slide does not turn a whole fold into nan.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

TASKS = ("classification", "tile_classification", "survival", "regression")
PRIMARY_METRIC: dict[str, str] = {
    "classification": "auc",
    "tile_classification": "auc",
    "survival": "c_index",
    "regression": "pearson",
}
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("auc", "balanced_accuracy", "macro_f1"),
    "tile_classification": ("auc", "balanced_accuracy", "macro_f1"),
    "survival": ("c_index",),
    "regression": ("pearson",),
}
_NAN = float("nan")


# -------------------------------------------------------------------------- classification

def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for a boolean ``positive``; nan unless both classes occur."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return _NAN
    return float(roc_auc_score(positive, score))


def multiclass_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUC of (N, K) ``probs`` for labels ``y``: binary -> AUC of column 1; K > 2 -> mean
    one-vs-rest AUC over the classes present in ``y`` (a class absent from a fold has no
    positives, so its AUC is undefined rather than 0). nan if fewer than 2 classes occur."""
    if probs.shape[1] == 2:
        return _binary_auc(y == 1, probs[:, 1])
    aucs = [_binary_auc(y == c, probs[:, c]) for c in np.unique(y)]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else _NAN


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``auc``, ``balanced_accuracy`` and ``macro_f1`` for int labels ``y`` (N,) in [0, K)
    and class probabilities ``probs`` (N, K). Macro F1 averages over all K labels (a class
    never predicted nor present scores 0), so folds with a missing class stay comparable."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    y = np.asarray(y).astype(int).ravel()
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, K) with N = {y.shape[0]}, got {probs.shape}")
    keep = np.isfinite(probs).all(axis=1)
    y, probs = y[keep], probs[keep]
    if y.size == 0:
        return {"auc": _NAN, "balanced_accuracy": _NAN, "macro_f1": _NAN}
    pred = probs.argmax(axis=1)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" is expected on small folds.
        warnings.simplefilter("ignore", UserWarning)
        bacc = balanced_accuracy_score(y, pred)
    f1 = f1_score(y, pred, labels=list(range(probs.shape[1])), average="macro",
                  zero_division=0)
    return {"auc": multiclass_auc(y, probs), "balanced_accuracy": float(bacc),
            "macro_f1": float(f1)}


# ------------------------------------------------------------------- survival, regression

def survival_metrics(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> dict[str, float]:
    """``{"c_index": Harrell's c}``; higher ``risk`` means an earlier expected event."""
    from fusedist.fusion.survival import harrell_c_index  # lazy: survival imports torch

    r, t, e = (np.asarray(a, dtype=float).ravel() for a in (risk, time, event))
    keep = np.isfinite(r) & np.isfinite(t) & np.isfinite(e)
    if not keep.any():
        return {"c_index": _NAN}
    return {"c_index": harrell_c_index(r[keep], t[keep], e[keep])}


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def per_target_pearson(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson r per target column of ``y``, ``pred`` (N, G) (or (N,)) -> (G,); nan for a
    target whose truth or prediction is constant (r is undefined there) or has < 2 rows."""
    y, pred = _as_2d(y), _as_2d(pred)
    if y.shape != pred.shape:
        raise ValueError(f"y {y.shape} and pred {pred.shape} differ in shape")
    out = np.full(y.shape[1], np.nan)
    for g in range(y.shape[1]):
        ok = np.isfinite(y[:, g]) & np.isfinite(pred[:, g])
        a, b = y[ok, g], pred[ok, g]
        if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        a, b = a - a.mean(), b - b.mean()
        out[g] = float((a @ b) / math.sqrt((a @ a) * (b @ b)))
    return out


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``{"pearson": mean Pearson r over targets}``, skipping undefined targets."""
    r = per_target_pearson(y, pred)
    r = r[np.isfinite(r)]
    return {"pearson": float(r.mean()) if r.size else _NAN}


def task_metrics(task: str, y, pred, *, time=None, event=None) -> dict[str, float]:
    """Scores of ``pred`` for ``task``: class probabilities (classification tasks), risk
    (survival; ``y`` is ignored and ``time``/``event`` are required) or values (regression)."""
    if task in ("classification", "tile_classification"):
        return classification_metrics(y, pred)
    if task == "survival":
        if time is None or event is None:
            raise ValueError("survival metrics need time= and event=")
        return survival_metrics(pred, time, event)
    if task == "regression":
        return regression_metrics(y, pred)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


# ---------------------------------------------------------------------------- fold summary

def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:  # checked here: np.nanmean of all-nan warns
        return (_NAN, _NAN)
    return (float(v.mean()), float(v.std(ddof=0)))


def summarize(fold_metrics: Mapping[str, Sequence[Mapping[str, float]]]
              ) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, std over folds, ddof 0), ignoring nan folds. A metric
    missing from some folds counts as nan there; metrics keep first-seen order."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method, folds in fold_metrics.items():
        names = list(dict.fromkeys(k for fold in folds for k in fold))
        out[method] = {k: _mean_std([fold.get(k, _NAN) for fold in folds]) for k in names}
    return out


# --------------------------------------------------------------------- survival statistics

def _clean_survival(time, event) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(time, dtype=float).ravel()
    e = np.asarray(event, dtype=float).ravel() > 0
    if t.shape != e.shape:
        raise ValueError(f"time {t.shape} and event {e.shape} differ in shape")
    if (t < 0).any():
        raise ValueError("survival times must be >= 0")
    return t, e


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Product-limit estimate as a right-continuous step function: ``(times, surv)`` with
    ``times = [0, every distinct observed time...]`` and ``surv[i]`` = S just after
    ``times[i]`` (``surv[0] = 1``). Censored times are kept as steps of height 0, so censor
    marks can be read off the curve. At tied times events count before censorings (the
    censored patients are still at risk of those events)."""
    t, e = _clean_survival(time, event)
    uniq = np.unique(t)
    surv = np.ones(uniq.size + 1)
    s = 1.0
    for i, u in enumerate(uniq):
        at_risk = np.count_nonzero(t >= u)
        deaths = np.count_nonzero((t == u) & e)
        s *= 1.0 - deaths / at_risk
        surv[i + 1] = s
    return np.concatenate([[0.0], uniq]), surv


def logrank_p(time_a, event_a, time_b, event_b) -> float:
    """Two-group log-rank test p-value (chi-square, 1 dof). nan when a group is empty or
    there is no information (no events, or every event time has only one group at risk)."""
    ta, ea = _clean_survival(time_a, event_a)
    tb, eb = _clean_survival(time_b, event_b)
    if ta.size == 0 or tb.size == 0:
        return _NAN
    t, e = np.concatenate([ta, tb]), np.concatenate([ea, eb])
    in_a = np.arange(t.size) < ta.size
    observed = expected = variance = 0.0
    for u in np.unique(t[e]):
        at_risk = t >= u
        n, n_a = at_risk.sum(), (at_risk & in_a).sum()
        dead = (t == u) & e
        d, d_a = dead.sum(), (dead & in_a).sum()
        observed += d_a
        expected += d * n_a / n
        if n > 1:  # hypergeometric variance of d_a
            variance += d * (n_a / n) * (1 - n_a / n) * (n - d) / (n - 1)
    if variance <= 0:
        return _NAN
    # lazy: scipy.stats takes ~0.4 s to import, and fuse's input check imports this module
    from scipy.stats import chi2

    return float(chi2.sf((observed - expected) ** 2 / variance, df=1))
