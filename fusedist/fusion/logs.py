"""Every log LogitProd takes, exact or as the released code takes it (``logitprod.logs``).

``exact`` (fusedist's default, a correction) works in log space throughout: log-softmax,
log-sigmoid, logcumsumexp. ``clamped`` reproduces the released LogitProd scripts site by
site — each eps, what it clamps and the dtype (float32 everywhere; docs/methods.md,
divergences):

======================================  ==============================================  =====
site                                    released                                        eps
======================================  ==============================================  =====
classification product of experts       exact ``log_softmax`` (no clamp at all)          —
survival experts' outcome law           ``1-h``, ``S(t-1)·h`` and ``S(T)`` clamped at   1e-12
                                        eps, then ``log(P + eps)``
survival hazards back from the fused    ``P(t)`` clamped, ``S(t-1) = 1 - cumsum P``      1e-12
law                                     clamped, ``h = P / S`` clamped to [eps, 1-eps]
NLL-survival                            ``h`` clamped to [eps, 1 - eps] (``1 - 1e-7``    1e-7
                                        is ``1 - 2^-23`` in float32), ``S`` = cumprod,
                                        ``S`` and ``h`` clamped at eps before the logs
R, classification (``error: nll``)      ``-log(clamp(softmax(z)_y, eps))``               1e-8
R, survival                             the NLL-survival above on ``sigmoid(z)``         1e-7
======================================  ==============================================  =====

The NLL-survival itself is ``survival.nll_survival_loss(from_logits=False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_MODES = ("exact", "clamped")

OUTCOME_EPS = 1e-12
"""Released survival conversions: hazards <-> the T + 1 outcome probabilities."""

NLL_EPS = 1e-7
"""Released NLL-survival (the loss of the fused hazards, and the survival R's errors)."""

CLASS_R_EPS = 1e-8
"""Released classification R: the clamp of p_y before the experts' NLL errors."""


def check_logs(logs: str) -> str:
    if logs not in LOG_MODES:
        raise ValueError(f"logs must be one of {LOG_MODES}, got {logs!r}")
    return logs


def class_log_probs(logits: Tensor, logs: str = "exact") -> Tensor:
    """The experts' log p over the last dim for the product of experts: ``log_softmax`` in
    both modes — the released product takes exact logs too (``logs`` is only checked)."""
    check_logs(logs)
    return F.log_softmax(logits, dim=-1)


def released_outcome_log_probs(hazard_logits: Tensor) -> Tensor:
    """(..., T) hazard logits -> (..., T + 1) outcome log-probabilities as released, float32:
    h = sigmoid(z), S(t) = prod_{u<=t} clamp(1 - h(u), eps), P(t) = clamp(S(t-1) h(t), eps),
    P(T+1) = clamp(S(T), eps), then log(P + eps) with eps = ``OUTCOME_EPS``."""
    h = torch.sigmoid(hazard_logits.float())
    surv = torch.cumprod((1.0 - h).clamp(min=OUTCOME_EPS), dim=-1)
    prev = torch.cat([torch.ones_like(surv[..., :1]), surv[..., :-1]], dim=-1)
    p = torch.cat([(prev * h).clamp(min=OUTCOME_EPS),
                   surv[..., -1:].clamp(min=OUTCOME_EPS)], dim=-1)
    return torch.log(p + OUTCOME_EPS)


def released_hazards(probs: Tensor) -> Tensor:
    """(..., T + 1) outcome probabilities -> (..., T) hazards as released, float32:
    P(t) clamped at eps, S(t-1) = clamp(1 - sum_{u<t} P(u), eps) (S(0) = 1), h = P(t) / S(t-1)
    clamped to [eps, 1 - eps] (in float32 ``1 - 1e-12`` is 1). The survival function comes
    from ``1 - cumsum``, not from the tail sum, so it cancels to the eps floor once the
    earlier bins hold (numerically) all the mass, and the later hazards then saturate."""
    p = probs.float()[..., :-1].clamp(min=OUTCOME_EPS)
    cdf = torch.cumsum(p, dim=-1)
    prev = torch.cat([torch.ones_like(cdf[..., :1]),
                      (1.0 - cdf[..., :-1]).clamp(min=OUTCOME_EPS)], dim=-1)
    return (p / prev).clamp(min=OUTCOME_EPS, max=1.0 - OUTCOME_EPS)


def class_nll_errors(logits: Tensor, labels: Tensor, logs: str = "exact") -> Tensor:
    """Per-sample, per-expert NLL -log p_y (N, M), float64 out: exact (float64 log-softmax)
    or released (float32, p_y clamped at ``CLASS_R_EPS``)."""
    n, m, _ = logits.shape
    idx = labels.detach().long().view(n, 1, 1).expand(n, m, 1)
    if check_logs(logs) == "exact":
        return -F.log_softmax(logits.detach().double(), dim=-1).gather(-1, idx).squeeze(-1)
    p = F.softmax(logits.detach().float(), dim=-1).gather(-1, idx).squeeze(-1)
    return (-torch.log(p.clamp(min=CLASS_R_EPS))).double()


__all__ = ["CLASS_R_EPS", "LOG_MODES", "NLL_EPS", "OUTCOME_EPS", "check_logs",
           "class_log_probs", "class_nll_errors", "released_hazards",
           "released_outcome_log_probs"]
