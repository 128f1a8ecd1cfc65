"""LogitProd (methods.md §2): a gate over the experts' logits, trained on their inner
out-of-fold outputs (``logitprod.gate_data: oof``) or on their in-fold outputs (``in_fold``,
as released); survival fuses the experts' outcome distributions with one gate per bin."""

from __future__ import annotations

import time

import numpy as np

from fusedist.fusion.methods.base import (FitInfo, Fitted, FoldContext, Method, Outputs,
                                          holdout_split, load_fitted, sub_state)
from fusedist.fusion.methods.registry import register, register_fitted


def _gate(num_experts: int, num_outputs: int, gate: str, survival: bool, logs: str):
    from fusedist.fusion.logitprod import LogitProd, LogitProdSurvival

    cls = LogitProdSurvival if survival else LogitProd
    return cls(num_experts, num_outputs, gate=gate, logs=logs)


@register_fitted
class LogitProdFitted(Fitted):
    """The experts and the gate that weights them; ``predict`` returns the per-sample
    expert weights too (averaged over the outcome bins for survival)."""

    kind = "logitprod"

    def __init__(self, targets, experts: dict, gate, gate_kind: str, survival: bool,
                 info=None) -> None:
        super().__init__(targets, info)
        self.experts, self.gate, self.gate_kind, self.survival = experts, gate, gate_kind, survival
        self.logs = gate.logs

    def encoders(self):
        return list(self.experts)

    def predict(self, x, device=None):
        import torch

        from fusedist.fusion.survival import survival_risk

        zt = torch.as_tensor(np.stack([f.raw(x, device)[0] for f in self.experts.values()], 1))
        self.gate.eval()
        with torch.no_grad():
            if self.survival:
                out = self.gate(zt)
                return Outputs(survival_risk(out["hazard_logits"]).numpy(),
                               weights=out["weights"].mean(dim=1).numpy())
            fused, w = self.gate(zt)
            return Outputs(fused.exp().numpy(), weights=w.numpy())

    def state_dict(self):
        out = {f"gate.{k}": v.detach().cpu() for k, v in self.gate.state_dict().items()}
        for e, f in self.experts.items():
            out.update({f"expert.{e}.{k}": v for k, v in f.state_dict().items()})
        return out

    def spec(self):
        return {"kind": self.kind, "gate": self.gate_kind, "survival": self.survival,
                "logs": self.logs, "experts": {e: f.spec() for e, f in self.experts.items()}}

    @classmethod
    def from_spec(cls, spec, state, targets):
        experts = {e: load_fitted(s, sub_state(state, f"expert.{e}."), targets)
                   for e, s in spec["experts"].items()}
        # Cards written before ``logs`` existed used exact logs.
        gate = _gate(len(experts), targets.num_outputs, spec["gate"], spec["survival"],
                     spec.get("logs", "exact"))
        gate.load_state_dict(sub_state(state, "gate."))
        return cls(targets, experts, gate, spec["gate"], spec["survival"])


@register
class LogitProdMethod(Method):
    key = "logitprod"
    tasks = ("classification", "tile_classification", "survival")
    order = 30

    def label(self, task):
        return "LogitProd"

    def fit(self, ctx: FoldContext):
        import torch
        import torch.nn.functional as F

        from fusedist.fusion.logitprod import (error_correlation, expert_fallback, fit_logitprod,
                                               survival_error_correlation, training_objective)
        from fusedist.fusion.survival import nll_survival_loss
        from fusedist.fusion.train import trainable_params

        lp, es, cfg = ctx.cfg.logitprod, ctx.c.encoders, ctx.cfg
        gate_raw = ctx.inner_oof() if lp.gate_data == "oof" else \
            {e: ctx.expert_raw(e, ctx.train) for e in es}
        z = torch.as_tensor(np.stack([gate_raw[e] for e in es], 1))
        surv = ctx.task.name == "survival"
        tgt = tuple(t.cpu() for t in ctx.targets.targets(ctx.train, torch.device("cpu")))
        tr, va = holdout_split(len(ctx.train), ctx.task.strata(ctx.c, ctx.train),
                               lp.val_fraction, ctx.seed("gate-val"))
        alpha = cfg.survival_alpha
        if surv:
            R = survival_error_correlation(z, tgt[0], tgt[1], lp.shrink, alpha, lp.logs)
        else:
            R = error_correlation(z, tgt[0], lp.error, lp.shrink, lp.logs)
        model = _gate(len(es), ctx.num_outputs, lp.gate, surv, lp.logs)
        pen = lp.survival.penalty
        # The survival gate stops on the c-index of the slides' event times, not their bins.
        val_time = torch.as_tensor(ctx.c.time[ctx.train[va]]) if surv else None
        t0 = time.perf_counter()
        fit = fit_logitprod(model, (z[tr], *(t[tr] for t in tgt)),
                            (z[va], *(t[va] for t in tgt)), R, lp, alpha=alpha,
                            seed=ctx.seed("gate"), val_time=val_time)
        data = (z, *tgt)
        fell_back = expert_fallback(model, data, R, lp.lam, alpha, pen) if lp.expert_fallback \
            else None
        secs = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            if surv:
                per = [float(nll_survival_loss(z[:, m], *tgt, alpha=alpha))
                       for m in range(len(es))]
            else:
                per = [float(F.cross_entropy(z[:, m].float(), tgt[0].long()))
                       for m in range(len(es))]
        # The objective the gate minimises, on all of its data; an expert alone is the
        # one-hot gate, whose penalty R_mm is 0, so its objective is its CE / NLL.
        objectives = {"logitprod": training_objective(model, data, R, lp.lam, alpha, pen)}
        objectives.update({f"expert.{e}": v for e, v in zip(es, per)})
        note = (f"fold {ctx.fold}: gate stopped at epoch {fit['best_epoch']}"
                + (f", fell back to {es[fell_back]} (lower training objective)"
                   if fell_back is not None else ""))
        info = FitInfo(train_s=secs, params=trainable_params(model), note=note,
                       objectives=objectives,
                       chosen={} if fell_back is None else {"logitprod_fallback": es[fell_back]})
        return LogitProdFitted(ctx.targets, {e: ctx.expert(e) for e in es}, model, lp.gate,
                               surv, info)
