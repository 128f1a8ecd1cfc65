"""The fold engine: which methods run (``select_methods``) and their once-per-cohort work
(``prepare_methods``), the ``FoldContext`` every method of a fold trains in (targets, seeds,
device, the experts trained once, the inner cross-validation), and one outer fold
(``run_fold``): a loop over the selected methods, each fitted on the training folds and
asked to predict the held-out fold. A fold is one task of the execution layer (a Ray task,
a local process, or inline: ``FuseConfig.executor``) and the unit of resumption.

Logit-level methods (best expert, mean ensemble, LogitProd) reuse the experts, which the
``FoldContext`` trains once; the LogitProd gate and the best-expert choice learn from the
experts' *out-of-fold* outputs on the training folds (an inner cross-validation), never from
the held-out fold.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fusedist.fusion.cohort import Cohort
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import make_folds, restrict_training
from fusedist.fusion.methods import registry
from fusedist.fusion.methods.base import FitInfo, Inputs, Method, Skipped
from fusedist.fusion.tasks import Task, get_task

if TYPE_CHECKING:
    import torch

    from fusedist.fusion.methods.experts import HeadFitted

log = logging.getLogger("fusedist")


# ---------------------------------------------------------------------- which methods run

def select_methods(cfg: FuseConfig, c: Cohort) -> tuple[list[Method], dict[str, str]]:
    """The rows to run, in table order (the experts, then ``cfg.methods`` that apply to the
    task), and {method: why it is skipped} for the others."""
    families, skipped = [registry.get("experts")], {}
    for name in dict.fromkeys(cfg.methods):
        fam = registry.get(name)
        if cfg.task in fam.tasks:
            families.append(fam)
        else:
            skipped[name] = f"not defined for {cfg.task} (methods.md)"
    rows = [m for fam in families for m in fam.expand(cfg, c)]
    return sorted(rows, key=lambda m: (m.order, m.name)), skipped


def prepare_methods(methods: list[Method], c: Cohort, cfg: FuseConfig, progress: bool
                    ) -> tuple[dict[str, object], dict[str, str]]:
    """Each family's once-per-cohort work (``Method.prepare``): (key -> result, notes)."""
    prepared, notes = {}, {}
    for m in methods:
        if m.key in prepared:
            continue
        obj, n = type(m).prepare(c, cfg, progress)
        prepared[m.key] = obj
        notes.update(n)
    return prepared, notes


# ----------------------------------------------------------------------------- the fold

class FoldContext:
    """What every method of one fold shares: cohort, config, the fold's targets, device,
    seeds, and the experts (trained once, reused by the logit-level methods)."""

    def __init__(self, c: Cohort, cfg: FuseConfig, task: Task, train: np.ndarray,
                 test: np.ndarray, fold: int, device: torch.device,
                 prepared: dict[str, object] | None = None,
                 fixed_epochs: dict[str, int] | None = None) -> None:
        self.c, self.cfg, self.task, self.fold = c, cfg, task, fold
        self.train, self.test, self.device = train, test, device
        self.targets = task.prepare(c, train)
        self.prepared = prepared or {}
        self.costs: dict[str, dict[str, float]] = {}
        """Costs of shared work that is not a method row (the inner CV)."""
        self.fixed_epochs = dict(fixed_epochs or {})
        """Head name -> epochs to train on every training slide, no validation split (the
        final refit: the folds' choice, :func:`refit_epochs`)."""
        self.best_epochs: dict[str, int] = {}
        """Head name -> the epoch its validation split chose (heads with ``select_best``)."""
        self._experts: dict[str, HeadFitted] = {}
        self._oof: dict[str, np.ndarray] | None = None
        self.tiles = None
        if task.tile:  # one (samples, d) matrix per encoder
            self.tiles = {e: np.stack([c.aligned[e][s][j] for s, j in
                                       zip(c.sample_slide, c.sample_index)])
                          for e in c.feature_group}

    def seed(self, *name: object) -> int:
        # lazy: training imports torch; fuse's driver imports this module without it
        from fusedist.fusion.training import seed_for

        return seed_for(self.cfg.seed, self.fold, *name)

    def inputs(self, idx: np.ndarray, attention_for: tuple[int, ...] = ()) -> Inputs:
        plans = self.prepared.get("fusecpath")
        return Inputs(idx=idx, bags=self.c.bags, aligned=self.c.aligned, tiles=self.tiles,
                      plans=plans[0] if plans else None, attention_for=attention_for)

    @property
    def num_outputs(self) -> int:
        return self.targets.num_outputs

    # ------------------------------------------------------------------- fitting heads
    def fit_head(self, name: str, arch: str, kw: dict, encoders: list[str], view: str,
                 train: np.ndarray, epochs: int, lr: float, schedule: str = "constant",
                 select_best: bool = False) -> HeadFitted:
        """Build (seeded by ``name`` and the training size) and train one head. Bag heads
        can follow the released expert recipe: ``schedule="warm_restarts"`` and
        ``select_best`` (the epoch with the lowest loss on a held-out ``val_fraction`` of
        ``train``, which the head then does not train on; the epoch is kept in
        ``best_epochs``). A head named in ``fixed_epochs`` trains that many epochs on all of
        ``train`` instead."""
        import torch

        # lazy: the heads and their loops import torch, which only a fold's worker loads
        from fusedist.fusion.methods.experts import HeadFitted, build_head
        from fusedist.fusion.training import (holdout_split, train_bags, train_tiles,
                                              trainable_params)

        ex = self.cfg.experts
        if name in self.fixed_epochs:
            epochs, select_best = self.fixed_epochs[name], False
        torch.manual_seed(self.seed(name, "init", len(train)))
        model = build_head(arch, kw)
        seed = self.seed(name, len(train))
        if self.task.tile:
            secs = train_tiles(model, [self.tiles[e] for e in encoders], train, self.targets,
                               epochs, lr, ex.weight_decay, ex.tile_batch_size, seed,
                               self.device)
        else:
            src = self.c.bags if view == "bags" else self.c.aligned
            val = None
            if select_best and len(train) >= 2:
                tr, va = holdout_split(len(train), self.task.strata(self.c, train),
                                       ex.val_fraction, self.seed(name, "val", len(train)))
                train, val = train[tr], train[va]
            secs, kept = train_bags(model, [src[e] for e in encoders], train, self.targets,
                                    epochs, lr, ex.weight_decay, ex.max_tiles, seed,
                                    self.device, schedule=schedule, val=val)
            if val is not None:
                self.best_epochs[name] = kept
        return HeadFitted(self.targets, model, arch, kw, encoders, view, self.task.tile,
                          FitInfo(train_s=secs, params=trainable_params(model)))

    def expert_epochs(self) -> int:
        ex = self.cfg.experts
        return ex.survival_epochs if self.task.name == "survival" else ex.epochs

    def expert_spec(self, e: str) -> tuple[str, dict]:
        ex = self.cfg.experts
        if self.task.tile:
            return "tile_mlp", {"dim": self.c.dims[e], "out": self.num_outputs}
        # The spec records the attention biases so a saved expert rebuilds the same modules.
        return "abmil", {"dim": self.c.dims[e], "out": self.num_outputs, "hidden": ex.hidden,
                         "dropout": ex.dropout, "attention_bias": ex.attention_bias,
                         "init": ex.init}

    def fit_expert(self, e: str, train: np.ndarray, name: str | None = None) -> HeadFitted:
        ex = self.cfg.experts
        arch, kw = self.expert_spec(e)
        return self.fit_head(name or f"expert.{e}", arch, kw, [e], "bags", train,
                             self.expert_epochs(), ex.lr, ex.schedule, ex.select_best)

    def expert(self, e: str) -> HeadFitted:
        """The expert of encoder ``e`` on the fold's training samples (trained once)."""
        if e not in self._experts:
            self._experts[e] = self.fit_expert(e, self.train)
        return self._experts[e]

    def expert_raw(self, e: str, idx: np.ndarray) -> np.ndarray:
        return self.expert(e).raw(self.inputs(idx), self.device)[0]

    def inner_oof(self) -> dict[str, np.ndarray]:
        """Out-of-fold raw outputs of every expert on the training samples, from an inner
        cross-validation (computed once per fold)."""
        if self._oof is None:
            t0 = time.perf_counter()
            inner = make_folds(self.c, self.train, self.cfg.inner_folds, self.seed("inner"),
                               self.task)
            oof = {e: np.zeros((len(self.train), self.num_outputs), np.float32)
                   for e in self.c.encoders}
            for j in range(self.cfg.inner_folds):
                tr, va = self.train[inner != j], self.train[inner == j]
                for e in self.c.encoders:
                    fitted = self.fit_expert(e, tr, f"expert.{e}.inner{j}")
                    oof[e][inner == j] = fitted.raw(self.inputs(va), self.device)[0]
            self.costs["inner_cv"] = {"train_s": time.perf_counter() - t0, "params": 0}
            self._oof = oof
        return self._oof

    def score(self, idx: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        return self.task.score(self.c, idx, pred)


def refit_epochs(per_fold: list[dict[str, int]]) -> dict[str, int]:
    """Head name -> epochs for the final refit: the median (rounded up) of the best epochs
    the folds' validation splits chose. A best epoch picked on the 3-4 slides a split of a
    small cohort holds out is noisy, and a refit that held slides out again would train on
    fewer slides than it could; the folds' median is both steadier and uses every slide."""
    names = sorted({n for d in per_fold for n in d})
    return {n: int(math.ceil(float(np.median([d[n] for d in per_fold if n in d]))))
            for n in names}


# ------------------------------------------------------------------------- one outer fold


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
    refit trains the folds' median epochs (``refit_epochs``)."""


def fold_context(c: Cohort, cfg: FuseConfig, train: np.ndarray, test: np.ndarray, fold: int,
                 prepared: dict[str, object] | None,
                 fixed_epochs: dict[str, int] | None = None) -> FoldContext:
    import torch

    # lazy: training imports torch; fuse's driver imports this module without it
    from fusedist.fusion.training import pick_device

    torch.set_num_threads(max(1, int(cfg.fold_cpus)))
    return FoldContext(c, cfg, get_task(cfg), train, test, fold, pick_device(cfg.device),
                       prepared, fixed_epochs)


def run_fold(c: Cohort, cfg: FuseConfig, fold_ids: np.ndarray, fold: int,
             heatmap_slides: list[int], methods: list[Method] | None = None,
             prepared: dict[str, object] | None = None) -> FoldResult:
    """Every method of ``methods`` (default: what ``cfg`` selects) on outer fold ``fold``."""
    if methods is None:
        methods = select_methods(cfg, c)[0]
    if prepared is None:
        prepared = prepare_methods(methods, c, cfg, progress=False)[0]
    train, test = np.flatnonzero(fold_ids != fold), np.flatnonzero(fold_ids == fold)
    train = restrict_training(c, cfg, train)  # train_slides: the test fold is unchanged
    # lazy: training imports torch; fuse's driver imports this module without it
    from fusedist.fusion.training import eager_optim

    with eager_optim():
        return _run_fold(c, cfg, train, test, fold, heatmap_slides, methods, prepared)


def _run_fold(c: Cohort, cfg: FuseConfig, train: np.ndarray, test: np.ndarray, fold: int,
              heatmap_slides: list[int], methods: list[Method],
              prepared: dict[str, object]) -> FoldResult:
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
