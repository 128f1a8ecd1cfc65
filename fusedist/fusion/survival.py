"""Discrete-time survival math shared by the survival task and the survival LogitProd:
hazards <-> outcome distributions, the NLL-survival loss, risk, and Harrell's c-index."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def hazards_to_outcome_probs(hazards: Tensor) -> Tensor:
    """Hazards h (..., T) in (0, 1) -> outcome distribution (..., T + 1):
    P(t) = S(t-1) h(t) for t = 1..T, P(T+1) = S(T), with S(t) = prod_{u<=t} (1 - h(u))."""
    surv = torch.cumprod(1.0 - hazards, dim=-1)
    prev = torch.cat([torch.ones_like(surv[..., :1]), surv[..., :-1]], dim=-1)
    return torch.cat([prev * hazards, surv[..., -1:]], dim=-1)


def hazard_logits_to_outcome_log_probs(hazard_logits: Tensor) -> Tensor:
    """The same map from hazard logits, in log space (stable for saturated hazards)."""
    log_h = F.logsigmoid(hazard_logits)
    log_surv = torch.cumsum(F.logsigmoid(-hazard_logits), dim=-1)
    prev = torch.cat([torch.zeros_like(log_surv[..., :1]), log_surv[..., :-1]], dim=-1)
    return torch.cat([prev + log_h, log_surv[..., -1:]], dim=-1)


def outcome_log_probs_to_hazards(log_probs: Tensor, as_logits: bool = False) -> Tensor:
    """Outcome log-probabilities (..., T + 1) -> hazards (..., T) (or their logits).

    h(t) = P(t) / S(t-1) with S(t-1) = sum_{u>=t} P(u); logit h(t) = log P(t) - log S(t).
    Works on unnormalised log-probs too (the ratio cancels the normaliser).
    """
    tail = torch.logcumsumexp(log_probs.flip(-1), dim=-1).flip(-1)  # log S(t-1), t = 1..T+1
    if as_logits:
        return log_probs[..., :-1] - tail[..., 1:]
    return torch.exp(log_probs[..., :-1] - tail[..., :-1])


def nll_survival_loss(hazards: Tensor, time_bin: Tensor, event: Tensor, alpha: float = 0.4,
                      from_logits: bool = True, eps: float = 1e-7,
                      reduction: str = "mean") -> Tensor:
    """Discrete-time NLL-survival (Zadeh & Schmid; the MCAT/PORPOISE form).

    ``hazards`` (B, T): hazard logits (``from_logits=True``) or hazards in (0, 1);
    ``time_bin`` (B,) 0-based bin of the event/censoring time; ``event`` (B,) 1 = observed.
        L_unc  = -event     * [log S(y-1) + log h(y)]
        L_cens = -(1-event) * log S(y)
        L      = (1 - alpha) * (L_unc + L_cens) + alpha * L_unc
    i.e. alpha is extra weight on the uncensored term. From logits the logs are exact
    (logsigmoid). From hazards, as the released LogitProd loss (``logs: clamped``): h is
    clamped to [eps, 1 - eps] in its own dtype (float32: ``1 - 1e-7`` rounds to
    ``1 - 2^-23``), S = cumprod(1 - h), and S and h are clamped at eps before their logs.
    """
    z = hazards if hazards.dtype == torch.float64 else hazards.float()
    if from_logits:
        log_h, log_1mh = F.logsigmoid(z), F.logsigmoid(-z)
        log_surv = torch.cumsum(log_1mh, dim=1)
    else:
        h = z.clamp(min=eps, max=1.0 - eps)
        log_h = torch.log(h.clamp(min=eps))
        log_surv = torch.log(torch.cumprod(1.0 - h, dim=1).clamp(min=eps))
    y = time_bin.long().view(-1, 1)
    ev = event.to(z.dtype).view(-1)
    log_surv = torch.cat([torch.zeros_like(log_surv[:, :1]), log_surv], 1)
    uncensored = -ev * (log_surv.gather(1, y).squeeze(1) + log_h.gather(1, y).squeeze(1))
    censored = -(1.0 - ev) * log_surv.gather(1, y + 1).squeeze(1)
    loss = (1.0 - alpha) * (uncensored + censored) + alpha * uncensored
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def survival_risk(hazard_logits: Tensor) -> Tensor:
    """Risk = -sum_t S(t) from hazard logits (..., T); higher = earlier event."""
    return -torch.exp(torch.cumsum(F.logsigmoid(-hazard_logits.float()), dim=-1)).sum(dim=-1)


def harrell_c_index(risk: np.ndarray | Tensor, time: np.ndarray | Tensor,
                    event: np.ndarray | Tensor) -> float:
    """Harrell's c: over comparable pairs, the fraction with risk_i > risk_j (ties in risk
    count 1/2). (i, j) is comparable when i had the event and either time_i < time_j, or
    time_i == time_j and j is censored (censored at t means still at risk at t) — the rule of
    scikit-survival's ``concordance_index_censored`` (tested against it). Two events at the
    same time are not comparable. O(N^2) memory; fine per fold."""
    r, t, e = (np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=float)
               .ravel() for a in (risk, time, event))
    ev = e > 0
    later = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~ev[None, :])
    comparable = later & ev[:, None]
    np.fill_diagonal(comparable, False)
    if not comparable.any():
        return float("nan")
    diff = r[:, None] - r[None, :]
    score = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
    return float(score[comparable].mean())
