"""The protocol every fusion method follows: what it predicts from, what it returns, and
how a trained one is saved and rebuilt. Every method module stands on it; it imports only
the registry (and, for annotations, the config, cohort and tasks below it). The fold a
method trains in is ``fusion.fold.FoldContext``.

A ``Method`` is one row of the results table (``expert.<encoder>``, ``logitprod``,
``meta.<strategy>``...). ``fit(ctx)`` trains it on the fold's training samples and returns a
``Fitted``: ``predict(inputs)`` gives the task's predictions (plus attention or gate weights
when it has them), ``state_dict()`` its tensors and ``spec()`` the JSON that rebuilds its
modules, so ``load_fitted(spec, state, targets)`` gives back the same predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fusedist.fusion.methods.registry import fitted_kind

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.cohort import Cohort
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

    def fit(self, ctx) -> Fitted:
        """Train on ``ctx`` (a ``fusion.fold.FoldContext``): its training samples, targets,
        seeds and the fold's experts."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
