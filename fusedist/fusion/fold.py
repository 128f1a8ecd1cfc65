"""One outer fold: a loop over the selected methods, each fitted on the training folds and
asked to predict the held-out fold. A fold is a Ray task and the unit of resumption.

Logit-level methods (best expert, mean ensemble, LogitProd) reuse the experts, which the
``FoldContext`` trains once; the LogitProd gate and the best-expert choice learn from the
experts' *out-of-fold* outputs on the training folds (an inner cross-validation), never from
the held-out fold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import Cohort
from fusedist.fusion.methods.base import FoldContext, Method, Skipped

log = logging.getLogger("fusedist")


@dataclass
class FoldResult:
    """Predictions for the held-out samples of one fold, per method, and what they cost."""

    fold: int
    test_idx: np.ndarray
    preds: dict[str, np.ndarray] = field(default_factory=dict)
    """method -> (n_test, K) probabilities, (n_test,) risk or (n_test, G) targets; NaN rows
    where a method could not predict a sample (e.g. a slide FuseCPath skipped)."""
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    objectives: dict[str, float] = field(default_factory=dict)
    """Gate-training objective (CE, or NLL-survival) of LogitProd and of each expert alone,
    on the gate's own training data (lower is better)."""
    attention: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    """expert method -> slide index -> attention over that encoder's tiles."""
    gate_weights: list[float] | None = None
    """LogitProd's mean gate weight per expert on the held-out fold."""
    chosen: dict[str, str] = field(default_factory=dict)
    """Experts picked in this fold: ``best_expert`` (on inner scores) and, when the gate
    fell back to one expert, ``logitprod_fallback``."""
    best_epochs: dict[str, int] = field(default_factory=dict)
    """Head name -> the epoch its validation split chose (``select_best`` heads): the final
    refit trains the folds' median epochs (``methods.base.refit_epochs``)."""


def fold_context(c: Cohort, cfg: FuseConfig, train: np.ndarray, test: np.ndarray, fold: int,
                 prepared: dict[str, object] | None,
                 fixed_epochs: dict[str, int] | None = None) -> FoldContext:
    import torch

    from fusedist.fusion.tasks import get_task
    from fusedist.fusion.train import pick_device

    torch.set_num_threads(max(1, int(cfg.fold_cpus)))
    return FoldContext(c, cfg, get_task(cfg), train, test, fold, pick_device(cfg.device),
                       prepared, fixed_epochs)


def run_fold(c: Cohort, cfg: FuseConfig, fold_ids: np.ndarray, fold: int,
             heatmap_slides: list[int], methods: list[Method] | None = None,
             prepared: dict[str, object] | None = None) -> FoldResult:
    """Every method of ``methods`` (default: what ``cfg`` selects) on outer fold ``fold``."""
    from fusedist.fusion.methods.registry import prepare_methods, select_methods

    if methods is None:
        methods = select_methods(cfg, c)[0]
    if prepared is None:
        prepared = prepare_methods(methods, c, cfg, progress=False)[0]
    from fusedist.fusion.data import restrict_training

    train, test = np.flatnonzero(fold_ids != fold), np.flatnonzero(fold_ids == fold)
    train = restrict_training(c, cfg, train)  # train_slides: the test fold is unchanged
    ctx = fold_context(c, cfg, train, test, fold, prepared)
    res = FoldResult(fold, test)
    heat = () if ctx.task.tile else tuple(i for i in heatmap_slides if i in set(test.tolist()))
    for m in methods:
        try:
            fitted = m.fit(ctx)
        except Skipped as s:
            res.notes[m.name] = s.note
            if s.nan:
                res.preds[m.name] = np.full((len(test), ctx.num_outputs), np.nan, np.float32)
            continue
        out = fitted.predict(ctx.inputs(test, heat if m.heatmaps else ()), ctx.device)
        res.preds[m.name] = out.pred
        res.costs[m.name] = {"train_s": fitted.info.train_s, "params": fitted.info.params}
        if out.attention:
            res.attention[m.name] = out.attention
        if out.weights is not None:
            res.gate_weights = out.weights.mean(0).tolist()
        for note in (fitted.info.note, out.note):
            if note:
                res.notes[m.name] = note
        res.objectives.update(fitted.info.objectives)
        res.chosen.update(fitted.info.chosen)
    res.costs.update(ctx.costs)
    res.best_epochs = dict(ctx.best_epochs)
    return res
