"""One outer fold: train every expert and every fusion method on the training folds and
predict the held-out fold. A fold is a Ray task and the unit of resumption.

Logit-level methods (best expert, mean ensemble, LogitProd) reuse the experts. The LogitProd
gate and the best-expert choice learn from the experts' *out-of-fold* outputs on the training
folds (an inner cross-validation), never from the held-out fold.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import Cohort, make_folds
from fusedist.fusion.train import (FoldTask, ViewsBag, ViewsTile, pick_device, predict_bags,
                                   predict_fusecpath, predict_tiles, seed_for, train_bags,
                                   train_fusecpath, train_tiles, trainable_params)

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


class _Fold:
    """Holds what every method of one fold shares (task, device, views, expert outputs)."""

    def __init__(self, c: Cohort, cfg: FuseConfig, fold_ids: np.ndarray, fold: int,
                 heatmap_slides: list[int]) -> None:
        self.c, self.cfg, self.fold = c, cfg, fold
        self.train = np.flatnonzero(fold_ids != fold)
        self.test = np.flatnonzero(fold_ids == fold)
        self.task = FoldTask.build(c, self.train, cfg.survival_bins, cfg.survival_alpha)
        self.device = pick_device(cfg.device)
        self.tile = c.task == "tile_classification"
        self.heatmap_slides = [] if self.tile else [i for i in heatmap_slides
                                                    if i in set(self.test.tolist())]
        self.res = FoldResult(fold, self.test)
        if self.tile:  # one (samples, d) matrix per encoder
            self.tiles = {e: np.stack([c.aligned[e][s][j] for s, j in
                                       zip(c.sample_slide, c.sample_index)])
                          for e in c.feature_group}

    # ------------------------------------------------------------------ fit one model
    def seed(self, *name: object) -> int:
        return seed_for(self.cfg.seed, self.fold, *name)

    def fit_predict(self, name: str, make, encoders: list[str], train: np.ndarray,
                    test: np.ndarray, epochs: int, lr: float, attention: bool = False
                    ) -> tuple[np.ndarray, float, int]:
        """Build (seeded), train on ``train`` and return raw outputs on ``test``, seconds and
        trainable parameters."""
        ex = self.cfg.experts
        torch.manual_seed(self.seed(name, "init", len(train)))
        model = make()
        if self.tile:
            xs = [self.tiles[e] for e in encoders]
            secs = train_tiles(model, xs, train, self.task, epochs, lr, ex.weight_decay,
                               ex.tile_batch_size, self.seed(name, len(train)), self.device)
            return predict_tiles(model, xs, test, self.device), secs, trainable_params(model)
        views = [self.c.aligned[e] for e in encoders] if len(encoders) > 1 or \
            name.startswith(("concat", "meta")) else [self.c.bags[encoders[0]]]
        secs = train_bags(model, views, train, self.task, epochs, lr, ex.weight_decay,
                          ex.max_tiles, self.seed(name, len(train)), self.device)
        raw, attn = predict_bags(model, views, test, self.device,
                                 self.heatmap_slides if attention else ())
        if attention and attn:
            self.res.attention[name] = attn
        return raw, secs, trainable_params(model)

    def expert_maker(self, e: str):
        from fusedist.fusion.heads import GatedABMIL, TileMLP

        d, k, ex = self.c.dims[e], self.task.num_outputs, self.cfg.experts
        if self.tile:
            return lambda: ViewsTile(TileMLP(d, k))
        return lambda: ViewsBag(GatedABMIL(d, k, hidden=ex.hidden, dropout=ex.dropout))

    @property
    def expert_epochs(self) -> int:
        ex = self.cfg.experts
        return ex.survival_epochs if self.c.task == "survival" else ex.epochs

    # ------------------------------------------------------------------------ methods
    def experts(self, in_fold: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every expert on the outer split: raw test outputs and, if ``in_fold``, raw outputs
        on its own training samples (the released code's gate data)."""
        test_raw, train_raw = {}, {}
        for e in self.c.encoders:
            name = f"expert.{e}"
            both = np.concatenate([self.test, self.train]) if in_fold else self.test
            raw, secs, params = self.fit_predict(name, self.expert_maker(e), [e], self.train,
                                                 both, self.expert_epochs, self.cfg.experts.lr,
                                                 attention=True)
            test_raw[e], train_raw[e] = raw[: len(self.test)], raw[len(self.test):]
            self.res.preds[name] = self.task.predict(test_raw[e])
            self.res.costs[name] = {"train_s": secs, "params": params}
        return test_raw, train_raw

    def inner_oof(self) -> dict[str, np.ndarray]:
        """Out-of-fold raw outputs of every expert on the outer training samples."""
        t0 = time.perf_counter()
        inner = make_folds(self.c, self.train, self.cfg.inner_folds, self.seed("inner"))
        oof = {e: np.zeros((len(self.train), self.task.num_outputs), np.float32)
               for e in self.c.encoders}
        for j in range(self.cfg.inner_folds):
            tr, va = self.train[inner != j], self.train[inner == j]
            for e in self.c.encoders:
                raw, _, _ = self.fit_predict(f"expert.{e}.inner{j}", self.expert_maker(e),
                                             [e], tr, va, self.expert_epochs,
                                             self.cfg.experts.lr)
                oof[e][inner == j] = raw
        self.res.costs["inner_cv"] = {"train_s": time.perf_counter() - t0, "params": 0}
        return oof

    def best_expert(self, test_raw, gate_raw, source: str) -> None:
        from fusedist.fusion.metrics import PRIMARY_METRIC, task_metrics

        metric = PRIMARY_METRIC[self.c.task]
        scores = {}
        for e in self.c.encoders:
            pred = self.task.predict(gate_raw[e])
            y = self.c.y[self.train] if self.c.y is not None else None
            m = task_metrics(self.c.task, y, pred,
                             time=None if self.c.time is None else self.c.time[self.train],
                             event=None if self.c.event is None else self.c.event[self.train])
            scores[e] = m[metric] if np.isfinite(m[metric]) else -np.inf
        best = max(scores, key=scores.get)
        self.res.preds["best_expert"] = self.task.predict(test_raw[best])
        self.res.costs["best_expert"] = {"train_s": 0.0, "params": 0}
        self.res.chosen["best_expert"] = best
        self.res.notes["best_expert"] = (f"fold {self.fold}: {best} ({metric} "
                                         f"{scores[best]:.3f} on {source} training outputs)")

    def mean_ensemble(self) -> None:
        preds = np.stack([self.res.preds[f"expert.{e}"] for e in self.c.encoders])
        self.res.preds["mean_ensemble"] = preds.mean(0)
        self.res.costs["mean_ensemble"] = {"train_s": 0.0, "params": 0}

    def logitprod(self, test_raw, gate_raw) -> None:
        from fusedist.fusion.logitprod import (GateTrainConfig, LogitProd, LogitProdSurvival,
                                               error_correlation, expert_fallback,
                                               fit_logitprod, nll_survival_loss,
                                               survival_error_correlation, survival_risk,
                                               training_objective)

        lp, es = self.cfg.logitprod, self.c.encoders
        z = torch.as_tensor(np.stack([gate_raw[e] for e in es], 1))
        zt = torch.as_tensor(np.stack([test_raw[e] for e in es], 1))
        surv = self.c.task == "survival"
        tgt = tuple(t.cpu() for t in self.task.targets(self.train, torch.device("cpu")))
        strat = self.c.event[self.train] if surv else self.c.y[self.train]
        tr, va = _split(len(self.train), strat, lp.val_fraction, self.seed("gate-val"))
        if surv:
            R = survival_error_correlation(z, tgt[0], tgt[1], lp.shrink, self.cfg.survival_alpha)
            model = LogitProdSurvival(len(es), self.task.num_outputs, gate=lp.gate)
        else:
            R = error_correlation(z, tgt[0], lp.error, lp.shrink)
            model = LogitProd(len(es), self.task.num_outputs, gate=lp.gate)
        gcfg = GateTrainConfig(lr=lp.lr, weight_decay=lp.weight_decay, batch_size=lp.batch_size,
                               max_epochs=lp.max_epochs, patience=lp.patience, lam=lp.lam,
                               alpha=self.cfg.survival_alpha, seed=self.seed("gate"))
        t0 = time.perf_counter()
        fit = fit_logitprod(model, (z[tr], *(t[tr] for t in tgt)),
                            (z[va], *(t[va] for t in tgt)), R, gcfg)
        data, alpha = (z, *tgt), self.cfg.survival_alpha
        fell_back = expert_fallback(model, data, R, lp.lam, alpha) if lp.expert_fallback \
            else None
        secs = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            if surv:
                out = model(zt)
                self.res.preds["logitprod"] = survival_risk(out["hazard_logits"]).numpy()
                w = out["weights"].mean(dim=1)
                per = [float(nll_survival_loss(z[:, m], *tgt, alpha=alpha))
                       for m in range(len(es))]
            else:
                fused_t, w = model(zt)
                self.res.preds["logitprod"] = fused_t.exp().numpy()
                per = [float(F.cross_entropy(z[:, m].float(), tgt[0].long()))
                       for m in range(len(es))]
        # The objective the gate minimises, on all of its data; an expert alone is the
        # one-hot gate, whose penalty R_mm is 0, so its objective is its CE / NLL.
        self.res.objectives["logitprod"] = training_objective(model, data, R, lp.lam, alpha)
        self.res.objectives.update({f"expert.{e}": v for e, v in zip(es, per)})
        self.res.gate_weights = w.mean(0).tolist()
        if fell_back is not None:
            self.res.chosen["logitprod_fallback"] = es[fell_back]
        self.res.costs["logitprod"] = {"train_s": secs, "params": trainable_params(model)}
        self.res.notes["logitprod"] = (
            f"fold {self.fold}: gate stopped at epoch {fit['best_epoch']}"
            + (f", fell back to {es[fell_back]} (lower training objective)"
               if fell_back is not None else ""))

    def feature_fusion(self, name: str, strategy: str) -> None:
        from fusedist.fusion.meta_encoder import MetaEncoderMIL, MetaEncoderTile

        g, me, ex = self.c.feature_group, self.cfg.meta, self.cfg.experts
        need = 2 if strategy in ("concat", "cross_attention", "contrastive") else 1
        if len(g) < need:
            self.res.notes[name] = f"skipped: needs {need}+ encoders that share tiles, has {g}"
            return
        dims = [self.c.dims[e] for e in g]
        kw = dict(embed_dim=me.embed_dim, token_dim=me.token_dim, proj_dim=me.token_dim,
                  contrastive_weight=me.contrastive_weight)
        k = self.task.num_outputs
        make = (lambda: MetaEncoderTile(dims, strategy, k, **kw)) if self.tile else \
            (lambda: MetaEncoderMIL(dims, strategy, k, hidden=ex.hidden, dropout=ex.dropout,
                                    **kw))
        epochs = me.epochs or self.expert_epochs
        raw, secs, params = self.fit_predict(name, make, g, self.train, self.test, epochs,
                                             me.lr or ex.lr)
        self.res.preds[name] = self.task.predict(raw)
        self.res.costs[name] = {"train_s": secs, "params": params}

    def fusecpath(self, plans: list, teachers: list[np.ndarray]) -> None:
        from fusedist.fusion.fusecpath import FuseCPathModel

        fc, g = self.cfg.fusecpath, self.c.feature_group
        feats = {i: torch.as_tensor(np.concatenate([self.c.aligned[e][i] for e in g], 1))
                 for i in np.concatenate([self.train, self.test]) if plans[i] is not None}
        tr = [i for i in self.train if plans[i] is not None]
        k = self.task.num_outputs
        out = np.full((len(self.test), k), np.nan, np.float32)
        if len({int(self.c.y[i]) for i in tr}) < 2:
            self.res.notes["fusecpath"] = "skipped: too few clustered training slides"
            self.res.preds["fusecpath"] = out
            return
        torch.manual_seed(self.seed("fusecpath", "init"))
        model = FuseCPathModel(feats[tr[0]].shape[1], k, [t.shape[1] for t in teachers],
                               region_num=fc.region_num, topk=fc.topk)
        secs = train_fusecpath(
            model, [feats[i] for i in tr], [plans[i] for i in tr],
            torch.as_tensor(self.c.y[tr]), [torch.as_tensor(t[tr]) for t in teachers],
            fc.epochs, fc.lr, fc.batch_size, fc.alpha, fc.temperature, self.seed("fusecpath"),
            self.device)
        for row, i in enumerate(self.test):
            if plans[i] is not None:
                out[row] = predict_fusecpath(model, feats[i], plans[i], self.device)
        self.res.preds["fusecpath"] = out
        self.res.costs["fusecpath"] = {"train_s": secs, "params": trainable_params(model)}
        skipped = int(np.isnan(out[:, 0]).sum())
        if skipped:
            self.res.notes["fusecpath"] = (f"{skipped} held-out slide(s) without enough "
                                           "clusters are not scored")


def _split(n: int, strat: np.ndarray, val_fraction: float, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation split of the gate data, stratified when every stratum allows it."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed,
                                  stratify=strat)
    except ValueError:  # a stratum with a single member
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed)
    return np.sort(tr), np.sort(va)


def run_fold(c: Cohort, cfg: FuseConfig, fold_ids: np.ndarray, fold: int,
             heatmap_slides: list[int], plans: list | None,
             teachers: list[np.ndarray] | None) -> FoldResult:
    """Every method of ``cfg`` on outer fold ``fold``."""
    torch.set_num_threads(max(1, int(cfg.fold_cpus)))
    f = _Fold(c, cfg, fold_ids, fold, heatmap_slides)
    methods, _ = cfg.active_methods()
    in_fold = "logitprod" in methods and cfg.logitprod.gate_data == "in_fold"
    test_raw, train_raw = f.experts(in_fold)
    if "best_expert" in methods or "logitprod" in methods:
        oof = f.inner_oof() if (cfg.logitprod.gate_data == "oof" or
                                "best_expert" in methods) else None
        gate_raw = oof if cfg.logitprod.gate_data == "oof" else train_raw
        if "best_expert" in methods:
            f.best_expert(test_raw, oof, "inner out-of-fold")
        if "logitprod" in methods:
            f.logitprod(test_raw, gate_raw)
    if "mean_ensemble" in methods:
        f.mean_ensemble()
    if "concat" in methods:
        f.feature_fusion("concat", "concat")
    if "meta" in methods:
        for s in cfg.meta.strategies:
            f.feature_fusion(f"meta.{s}", s)
    if "fusecpath" in methods and plans is not None:
        f.fusecpath(plans, teachers)
    return f.res
