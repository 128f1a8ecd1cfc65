"""What every fusion method shares: the fold it trains in, what it predicts from, what it
returns, and how a trained one is saved and rebuilt.

A ``Method`` is one row of the results table (``expert.<encoder>``, ``logitprod``,
``meta.<strategy>``...). ``fit(ctx)`` trains it on the fold's training samples and returns a
``Fitted``: ``predict(inputs)`` gives the task's predictions (plus attention or gate weights
when it has them), ``state_dict()`` its tensors and ``spec()`` the JSON that rebuilds its
modules, so ``load_fitted(spec, state, targets)`` gives back the same predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fusedist.fusion.methods.registry import fitted_kind, register_fitted

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import Cohort
    from fusedist.fusion.tasks import Targets, Task


class Skipped(Exception):
    """A method that cannot run in this fold; ``note`` says why. With ``nan`` the fold
    still records NaN predictions for it (scored as missing, not dropped)."""

    def __init__(self, note: str, nan: bool = False) -> None:
        super().__init__(note)
        self.note, self.nan = note, nan


@dataclass
class Inputs:
    """What ``predict`` reads, for the samples ``idx``: each encoder's per-slide features on
    its own tiles, the feature group's features on their shared tiles, the tile matrices of
    tile tasks, and FuseCPath's sub-bag plans. In a fold these are the cohort's lists and
    ``idx`` selects the held-out samples; for new slides they hold just those slides."""

    idx: np.ndarray
    bags: dict[str, list[np.ndarray]]
    aligned: dict[str, list[np.ndarray]]
    tiles: dict[str, np.ndarray] | None = None
    plans: list | None = None
    attention_for: tuple[int, ...] = ()
    """Samples whose attention to return (heatmaps)."""


@dataclass
class Outputs:
    """Predictions for ``Inputs.idx``: ``pred`` (N, K) probabilities, (N,) risk or (N, G)
    targets; ``raw`` head outputs (what logit-level fusion reads) when the method has one."""

    pred: np.ndarray
    raw: np.ndarray | None = None
    attention: dict[int, np.ndarray] = field(default_factory=dict)
    weights: np.ndarray | None = None
    """LogitProd: per-sample weight of each expert (N, M)."""
    note: str | None = None


@dataclass
class FitInfo:
    """What a fit reports besides the model: cost, notes, objectives, choices."""

    train_s: float = 0.0
    params: int = 0
    note: str | None = None
    objectives: dict[str, float] = field(default_factory=dict)
    chosen: dict[str, str] = field(default_factory=dict)


class Fitted:
    """A trained method. Subclasses set ``kind`` and register with ``register_fitted``."""

    kind: ClassVar[str]

    def __init__(self, targets: Targets, info: FitInfo | None = None) -> None:
        self.targets = targets
        self.info = info or FitInfo()

    def predict(self, x: Inputs, device: torch.device | None = None) -> Outputs:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def spec(self) -> dict:
        """JSON that, with ``state_dict()``, rebuilds this (``load_fitted``)."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict, state: dict[str, Tensor], targets: Targets) -> Fitted:
        raise NotImplementedError

    def encoders(self) -> list[str]:
        """Encoders whose bags ``predict`` reads."""
        raise NotImplementedError

    def prepare_unit(self, x: Inputs, unit_id: str, card: dict) -> Inputs:
        """A new slide's (or patient's) ``Inputs`` with what this method needs besides the
        bags, built as the cohort's were before the folds (``Method.prepare``); ``card``: the
        fused model's card. Default: nothing extra."""
        return x


def load_fitted(spec: dict, state: dict[str, Tensor], targets: Targets) -> Fitted:
    return fitted_kind(spec["kind"]).from_spec(spec, state, targets)


def sub_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class Method:
    """One row of the results. Subclasses set ``key`` (the name in ``methods``), ``tasks``,
    ``order`` and implement ``fit``; a family with several rows overrides ``expand``."""

    key: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("classification", "tile_classification", "survival",
                                        "regression")
    order: ClassVar[int] = 50
    """Position of the family in tables (experts 0 ... FuseCPath 60)."""
    heatmaps: ClassVar[bool] = False
    """Whether the fold asks it for attention on the heatmap slides."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def expand(cls, cfg: FuseConfig, c: Cohort) -> list[Method]:
        """The rows this family runs for ``cfg`` and cohort ``c``."""
        return [cls(cls.key)]

    @classmethod
    def prepare(cls, c: Cohort, cfg: FuseConfig, progress: bool
                ) -> tuple[object | None, dict[str, str]]:
        """Cohort-level work done once before the folds (e.g. clustering): (what the folds
        get as ``ctx.prepared[key]``, notes for the report)."""
        return None, {}

    def label(self, task: Task) -> str:
        return self.name

    def fit(self, ctx: FoldContext) -> Fitted:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ------------------------------------------------------------------------ trained heads

def build_head(arch: str, kw: dict) -> nn.Module:
    """The modules a ``HeadFitted`` wraps, from their JSON description."""
    from fusedist.fusion.heads import GatedABMIL, TileMLP
    from fusedist.fusion.meta_encoder import MetaEncoderMIL, MetaEncoderTile
    from fusedist.fusion.train import ViewsBag, ViewsTile

    if arch == "abmil":
        # Specs written before the released-code switches: biased attention, torch init.
        return ViewsBag(GatedABMIL(kw["dim"], kw["out"], hidden=kw["hidden"],
                                   dropout=kw["dropout"],
                                   attention_bias=kw.get("attention_bias", True),
                                   init=kw.get("init", "torch")))
    if arch == "tile_mlp":
        return ViewsTile(TileMLP(kw["dim"], kw["out"]))
    if arch == "meta_mil":
        return MetaEncoderMIL(kw["dims"], kw["strategy"], kw["out"], hidden=kw["hidden"],
                              dropout=kw["dropout"], **kw["meta"])
    if arch == "meta_tile":
        return MetaEncoderTile(kw["dims"], kw["strategy"], kw["out"], **kw["meta"])
    raise KeyError(f"unknown head architecture {arch!r}")


@register_fitted
class HeadFitted(Fitted):
    """One trained head over bags (one slide per call) or tiles (batches): the experts,
    concat and the Meta-Encoder strategies."""

    kind = "head"

    def __init__(self, targets: Targets, model: nn.Module, arch: str, kw: dict,
                 encoders: list[str], view: str, tile: bool, info: FitInfo | None = None
                 ) -> None:
        super().__init__(targets, info)
        self.model, self.arch, self.kw = model, arch, kw
        self.encoders_, self.view, self.tile = list(encoders), view, tile

    def encoders(self) -> list[str]:
        return self.encoders_

    def raw(self, x: Inputs, device=None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        import torch

        from fusedist.fusion.train import predict_bags, predict_tiles

        device = device or torch.device("cpu")
        if self.tile:
            xs = [x.tiles[e] for e in self.encoders_]
            return predict_tiles(self.model, xs, x.idx, device), {}
        src = x.bags if self.view == "bags" else x.aligned
        return predict_bags(self.model, [src[e] for e in self.encoders_], x.idx, device,
                            x.attention_for)

    def predict(self, x, device=None):
        raw, attn = self.raw(x, device)
        return Outputs(self.targets.predict(raw), raw=raw, attention=attn)

    def state_dict(self):
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def spec(self):
        return {"kind": self.kind, "arch": self.arch, "kw": self.kw,
                "encoders": self.encoders_, "view": self.view, "tile": self.tile}

    @classmethod
    def from_spec(cls, spec, state, targets):
        model = build_head(spec["arch"], spec["kw"])
        model.load_state_dict(state)
        model.eval()
        return cls(targets, model, spec["arch"], spec["kw"], spec["encoders"], spec["view"],
                   spec["tile"])


def holdout_split(n: int, strat: np.ndarray, val_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, validation) of an ``n``-sample set, stratified by ``strat`` when
    every stratum allows it; both sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed,
                                  stratify=strat)
    except ValueError:  # a stratum with a single member
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed)
    return np.sort(tr), np.sort(va)


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
        from fusedist.fusion.train import seed_for

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

        from fusedist.fusion.train import train_bags, train_tiles, trainable_params

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
            from fusedist.fusion.data import make_folds

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
    import math

    names = sorted({n for d in per_fold for n in d})
    return {n: int(math.ceil(float(np.median([d[n] for d in per_fold if n in d]))))
            for n in names}
