"""Logit-level baselines over the experts: the best single expert (chosen on the inner
out-of-fold scores, never on the held-out fold) and the mean-probability ensemble."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fusedist.fusion.methods.base import FitInfo, Fitted, Method, Outputs, load_fitted, sub_state
from fusedist.fusion.methods.experts import HeadFitted
from fusedist.fusion.methods.registry import register, register_fitted

if TYPE_CHECKING:
    from fusedist.fusion.fold import FoldContext


@register_fitted
class SelectedExpert(Fitted):
    """One expert, used as the method's prediction."""

    kind = "selected_expert"

    def __init__(self, targets, expert: HeadFitted, encoder: str, info=None) -> None:
        super().__init__(targets, info)
        self.expert, self.encoder = expert, encoder

    def encoders(self):
        return [self.encoder]

    def predict(self, x, device=None):
        return Outputs(self.expert.predict(x, device).pred)

    def state_dict(self):
        return {f"expert.{k}": v for k, v in self.expert.state_dict().items()}

    def spec(self):
        return {"kind": self.kind, "encoder": self.encoder, "expert": self.expert.spec()}

    @classmethod
    def from_spec(cls, spec, state, targets):
        return cls(targets, load_fitted(spec["expert"], sub_state(state, "expert."), targets),
                   spec["encoder"])


@register
class BestExpert(Method):
    key = "best_expert"
    order = 10

    def label(self, task):
        return "best single expert"

    def fit(self, ctx: FoldContext):
        metric = ctx.task.primary_metric
        oof = ctx.inner_oof()
        scores = {}
        for e in ctx.c.encoders:
            m = ctx.score(ctx.train, ctx.targets.predict(oof[e]))
            scores[e] = m[metric] if np.isfinite(m[metric]) else -np.inf
        best = max(scores, key=scores.get)
        note = (f"fold {ctx.fold}: {best} ({metric} {scores[best]:.3f} on inner out-of-fold "
                "training outputs)")
        return SelectedExpert(ctx.targets, ctx.expert(best), best,
                              FitInfo(note=note, chosen={"best_expert": best}))


@register_fitted
class MeanEnsemble(Fitted):
    """The mean of the experts' predictions."""

    kind = "mean_ensemble"

    def __init__(self, targets, experts: dict[str, HeadFitted], info=None) -> None:
        super().__init__(targets, info)
        self.experts = experts

    def encoders(self):
        return list(self.experts)

    def predict(self, x, device=None):
        preds = np.stack([f.predict(x, device).pred for f in self.experts.values()])
        return Outputs(preds.mean(0))

    def state_dict(self):
        return {f"expert.{e}.{k}": v for e, f in self.experts.items()
                for k, v in f.state_dict().items()}

    def spec(self):
        return {"kind": self.kind, "experts": {e: f.spec() for e, f in self.experts.items()}}

    @classmethod
    def from_spec(cls, spec, state, targets):
        return cls(targets, {e: load_fitted(s, sub_state(state, f"expert.{e}."), targets)
                             for e, s in spec["experts"].items()})


@register
class MeanProbEnsemble(Method):
    key = "mean_ensemble"
    order = 20

    def label(self, task):
        return "mean-prob ensemble"

    def fit(self, ctx: FoldContext):
        return MeanEnsemble(ctx.targets, {e: ctx.expert(e) for e in ctx.c.encoders})
