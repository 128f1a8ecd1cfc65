"""LogitProd (methods.md §2): a gate over the experts' logits, trained on their inner
out-of-fold outputs (``logitprod.gate_data: oof``) or on their in-fold outputs (``in_fold``,
as released); survival fuses the experts' outcome distributions with one gate per bin.

The module holds the gate modules, their losses and error correlations, the gate's training
loop (``fit_logitprod``) and the ``logitprod`` method with its ``Fitted``.

LogitProd: sample-adaptive weighted product of frozen experts' distributions (methods.md §2).

Every expert (one head per frozen FM) has already produced logits, out of fold. LogitProd
never touches features: a gate reads confidence statistics of the experts' predictions and
weights their log-probabilities,

    w = softmax(gate(logit_features(z)) / tau)          (B, M), uniform at start
    s_k = sum_m w_m * log_softmax(z_m)_k                 a weighted geometric mean
    loss = CE(s, y) + lam * mean_b(w^T R w)              R: experts' error correlation

Survival (T discrete-time hazard bins) fuses the T+1 outcome distributions in log space
with one gate per outcome bin, renormalises, and converts back to hazards — with
gradients throughout (the released code wrapped the conversions in no-grad, so only the
penalty trained its survival gate; ``gradients=False`` reproduces that).

Released-code switches (docs/methods.md, divergences): ``logs="clamped"`` takes every log as
the released code takes it (``fusedist.fusion.logs``: its eps, what it clamps, float32)
instead of exact log-softmax / log-sigmoid; the survival penalty is ``mean_weight`` (w̄ᵀRw̄
of the bin-mean weights, released) or ``per_bin``; ``fit_logitprod`` reads the gate-loop
settings from ``LogitProdConfig``.
"""

from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedist.fusion.config import LogitProdConfig
from fusedist.fusion.logs import (LOG_MODES, NLL_EPS, check_logs, class_log_probs,
                                  class_nll_errors, released_hazards,
                                  released_outcome_log_probs)
from fusedist.fusion.methods.base import FitInfo, Fitted, Method, Outputs, load_fitted, sub_state
from fusedist.fusion.methods.registry import register, register_fitted
from fusedist.fusion.survival import (harrell_c_index, hazard_logits_to_outcome_log_probs,
                                      hazards_to_outcome_probs, nll_survival_loss,
                                      outcome_log_probs_to_hazards, survival_risk)
from fusedist.fusion.training import holdout_split, trainable_params

if TYPE_CHECKING:
    from fusedist.fusion.fold import FoldContext

ERROR_KINDS = ("nll", "brier", "zero_one")
PENALTY_KINDS = ("mean_weight", "per_bin")


# --------------------------------------------------------------------------- gate features

def _entropy(p: Tensor, eps: float) -> Tensor:
    return -(p * torch.log(p + eps)).sum(dim=-1)


@torch.no_grad()
def logit_features(logits: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, M, K) expert logits -> (B, 3M + 2) gate features, no gradient.

    Order: ``[msp_1..msp_M, margin_1..margin_M, entropy_1..entropy_M, mean_entropy,
    mutual_info]`` with p_m = softmax(z_m), msp = max_k p, margin = top1 - top2 (0 when
    K = 1), entropy = -sum p log(p + eps), mutual_info = H(mean_m p_m) - mean_entropy.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, M, K), got {tuple(logits.shape)}")
    p = logits.detach().float().softmax(dim=-1)
    msp = p.amax(dim=-1)
    if p.shape[-1] >= 2:
        top2 = p.topk(2, dim=-1).values
        margin = top2[..., 0] - top2[..., 1]
    else:
        margin = torch.zeros_like(msp)
    ent = _entropy(p, eps)                                   # (B, M)
    mean_ent = ent.mean(dim=1, keepdim=True)                 # (B, 1)
    mutual_info = _entropy(p.mean(dim=1), eps).unsqueeze(1) - mean_ent
    return torch.cat([msp, margin, ent, mean_ent, mutual_info], dim=1)


# ---------------------------------------------------------------------- error correlation

def expert_errors(logits: Tensor, labels: Tensor, kind: str = "nll",
                  logs: str = "exact") -> Tensor:
    """Per-sample, per-expert error (N, M) in float64: ``nll`` (-log p_y; ``logs="clamped"``:
    as released, float32 with p_y clamped at 1e-8), ``brier`` (sum_k (p_k - 1[k = y])^2) or
    ``zero_one`` (argmax != y). (The released Brier writes the one-hot of expert 0 only, a
    bug not copied: docs/methods.md.)"""
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, M, K), got {tuple(logits.shape)}")
    check_logs(logs)
    z = logits.detach().double()
    y = labels.detach().long().view(-1)
    n, m, k = z.shape
    if y.numel() != n:
        raise ValueError(f"{y.numel()} labels for {n} samples")
    if kind == "nll":
        return class_nll_errors(logits, y, logs)
    if kind == "brier":
        onehot = F.one_hot(y, k).double().unsqueeze(1)
        return ((F.log_softmax(z, dim=-1).exp() - onehot) ** 2).sum(dim=-1)
    if kind == "zero_one":
        return (z.argmax(dim=-1) != y.view(n, 1)).double()
    raise ValueError(f"unknown error kind {kind!r}; choose one of {ERROR_KINDS}")


def correlation_steps(errors: Tensor, shrink: float = 0.1) -> dict[str, Tensor]:
    """Every stage of R, from per-sample errors (N, M), in float64.

    ``raw`` = Z^T Z / (N - 1) of the column-z-scored errors (symmetrised; a correlation
    matrix, diagonal 1), ``shrunk`` = (1 - shrink) raw + shrink * mean(diag) I, ``psd`` =
    eigenvalues clamped at 0 (PSD by construction), ``final`` = entries clamped at 0 and
    the diagonal zeroed. (``raw`` is a Gram matrix and ``shrunk`` a convex mix of it with a
    non-negative multiple of I, so both are PSD already; the eigenvalue clamp only removes
    rounding error. It is kept because the method specifies it.)

    What holds for ``final``: symmetric, non-negative, zero diagonal, hence
    w^T R w >= 0 for every non-negative w (copositive) — all the penalty needs, since gate
    weights are a softmax. It is *not* PSD in general: its trace is 0, so unless every
    entry is 0 it has a negative eigenvalue. Only ``psd`` (before the last two steps) is PSD.

    An expert whose errors are constant (e.g. 0/1 error never wrong) has no variance to
    correlate; its z-scores are set to 0, so its row and column of ``raw`` are 0.
    """
    e = errors.detach().double()
    if e.ndim != 2 or e.shape[0] < 2:
        raise ValueError(f"errors must be (N >= 2, M), got {tuple(e.shape)}")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must be in [0, 1], got {shrink}")
    n, m = e.shape
    sd = e.std(dim=0, unbiased=True)
    ok = sd > 1e-12
    z = torch.where(ok, (e - e.mean(dim=0)) / torch.where(ok, sd, torch.ones_like(sd)),
                    torch.zeros_like(e))
    raw = z.T @ z / (n - 1)
    raw = 0.5 * (raw + raw.T)
    eye = torch.eye(m, dtype=raw.dtype)
    shrunk = (1.0 - shrink) * raw + shrink * raw.diagonal().mean() * eye
    evals, evecs = torch.linalg.eigh(shrunk)
    psd = evecs @ torch.diag(evals.clamp(min=0.0)) @ evecs.T
    psd = 0.5 * (psd + psd.T)
    final = psd.clamp(min=0.0) * (1.0 - eye)
    return {"raw": raw, "shrunk": shrunk, "psd": psd, "final": final}


def error_correlation(logits: Tensor, labels: Tensor, kind: str = "nll",
                      shrink: float = 0.1, logs: str = "exact") -> Tensor:
    """Out-of-fold expert logits (N, M, K) and labels (N,) -> diversity matrix R (M, M),
    float32. See ``correlation_steps`` for the stages and what the result guarantees;
    ``logs`` as in ``expert_errors``."""
    return correlation_steps(expert_errors(logits, labels, kind, logs), shrink)["final"].float()


def survival_expert_errors(hazard_logits: Tensor, time_bin: Tensor, event: Tensor,
                           alpha: float = 0.4, logs: str = "exact") -> Tensor:
    """Per-sample, per-expert NLL-survival (N, M), float64 out: exact (float64 log-sigmoid)
    or released (``logs="clamped"``: of sigmoid(z) in float32, h clamped at 1e-7)."""
    z = hazard_logits.detach()
    if check_logs(logs) == "exact":
        per = [nll_survival_loss(z[:, j].double(), time_bin, event, alpha=alpha,
                                 reduction="none") for j in range(z.shape[1])]
    else:
        h = torch.sigmoid(z.float())
        per = [nll_survival_loss(h[:, j], time_bin, event, alpha=alpha, from_logits=False,
                                 eps=NLL_EPS, reduction="none") for j in range(z.shape[1])]
    return torch.stack(per, dim=1).double()


def survival_error_correlation(hazard_logits: Tensor, time_bin: Tensor, event: Tensor,
                               shrink: float = 0.1, alpha: float = 0.4,
                               logs: str = "exact") -> Tensor:
    """R for survival experts: the per-sample error is each expert's NLL-survival
    (``survival_expert_errors``)."""
    errs = survival_expert_errors(hazard_logits, time_bin, event, alpha, logs)
    return correlation_steps(errs, shrink)["final"].float()


# ----------------------------------------------------------------------------- the gates

def _make_gate(in_dim: int, out_dim: int, gate: str, hidden: int) -> nn.Module:
    if gate == "linear":
        layer = nn.Linear(in_dim, out_dim)
        last = layer
    elif gate == "mlp":
        layer = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        last = layer[-1]
    else:
        raise ValueError(f"gate must be 'linear' or 'mlp', got {gate!r}")
    # Zero output layer: every expert starts with weight 1/M (the plain geometric mean),
    # and the gate moves away from it only as far as the data asks.
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return layer


class LogitProd(nn.Module):
    """``forward(logits (B, M, K))`` -> ``(fused_log_probs (B, K), weights (B, M))``.

    ``fused_log_probs = log_softmax(s)`` with s_k = sum_m w_m log_softmax(z_m)_k.
    Train with ``F.nll_loss(fused_log_probs, y)``, which equals CE on s (log_softmax is
    idempotent); predict ``fused_log_probs.exp()`` = softmax(s).
    ``gate="mlp"`` swaps the linear gate for Linear -> GELU -> Linear (last layer zeroed).
    ``logs`` changes nothing here: the released product takes exact log-softmax too (it
    returns s itself, whose softmax and CE are those of log_softmax(s)); it only sets how
    the caller's ``error_correlation`` takes its logs.
    """

    def __init__(self, num_experts: int, num_classes: int, gate: str = "linear",
                 hidden: int = 32, temperature: float = 1.0, eps: float = 1e-12,
                 logs: str = "exact") -> None:
        super().__init__()
        if num_experts < 1 or num_classes < 1:
            raise ValueError("need at least one expert and one class")
        self.num_experts, self.num_classes = num_experts, num_classes
        self.temperature, self.eps = float(temperature), float(eps)
        self.logs = check_logs(logs)
        self.gate = _make_gate(3 * num_experts + 2, num_experts, gate, hidden)

    def _check(self, logits: Tensor) -> Tensor:
        if logits.ndim != 3 or logits.shape[1:] != (self.num_experts, self.num_classes):
            raise ValueError(f"expected (B, {self.num_experts}, {self.num_classes}) logits, "
                             f"got {tuple(logits.shape)}")
        return logits.float()

    def gate_weights(self, logits: Tensor) -> Tensor:
        feats = logit_features(self._check(logits), self.eps)
        return F.softmax(self.gate(feats) / self.temperature, dim=-1)

    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        z = self._check(logits)
        w = self.gate_weights(z)
        s = torch.einsum("bm,bmk->bk", w, class_log_probs(z, self.logs))
        return F.log_softmax(s, dim=-1), w


def diversity_penalty(weights: Tensor, R: Tensor) -> Tensor:
    """mean over all leading dims of w^T R w; weights (..., M)."""
    R = R.to(weights.dtype)
    return torch.einsum("...i,ij,...j->...", weights, R, weights).mean()


def survival_penalty(weights: Tensor, R: Tensor, kind: str = "mean_weight") -> Tensor:
    """Penalty of survival gate weights (B, T + 1, M): ``mean_weight`` (released) =
    mean_b w̄_bᵀ R w̄_b with w̄_b the weights averaged over the outcome bins; ``per_bin`` =
    mean_{b,t} w_btᵀ R w_bt."""
    if kind == "mean_weight":
        return diversity_penalty(weights.mean(dim=-2), R)
    if kind == "per_bin":
        return diversity_penalty(weights, R)
    raise ValueError(f"survival penalty must be one of {PENALTY_KINDS}, got {kind!r}")


def logitprod_loss_terms(fused: Tensor, weights: Tensor, labels: Tensor,
                         R: Tensor | None, lam: float = 0.1) -> dict[str, Tensor]:
    """``{"loss", "ce", "penalty"}`` with loss = CE + lam * mean_b(w^T R w)."""
    ce = F.nll_loss(fused, labels.long().view(-1))
    pen = diversity_penalty(weights, R) if R is not None else fused.new_zeros(())
    return {"loss": ce + lam * pen, "ce": ce, "penalty": pen}


def logitprod_loss(fused: Tensor, weights: Tensor, labels: Tensor, R: Tensor | None,
                   lam: float = 0.1) -> Tensor:
    """Scalar CE + lam * mean_b(w^T R w) (``fused`` = LogitProd's log-probs)."""
    return logitprod_loss_terms(fused, weights, labels, R, lam)["loss"]


# ------------------------------------------------------------------------------ survival

class LogitProdSurvival(nn.Module):
    """Survival LogitProd: ``forward(hazard_logits (B, M, T))`` -> dict with
    ``hazard_logits`` (B, T), ``hazards`` (B, T), ``outcome_log_probs`` (B, T + 1) and
    ``weights`` (B, T + 1, M).

    Each expert's hazards become a distribution over T + 1 outcomes; the gate reads
    ``logit_features`` of those distributions and emits one softmax over experts per
    outcome bin; the fused log-probabilities are renormalised and turned back into hazards.
    Everything after the (no-grad) gate features is differentiable, so the NLL trains the
    gate; ``gradients=False`` detaches the fused outputs as the released code does (only the
    penalty, through ``weights``, then trains it). ``logs="clamped"`` (released) works with
    probabilities in float32 as the released code does (``fusion.logs``:
    ``released_outcome_log_probs``, ``released_hazards``; ``hazard_logits`` = logit(hazards),
    +inf where a hazard saturates at 1); the loss then reads ``hazards``
    (``logitprod_survival_loss_terms(from_logits=False)``).
    """

    def __init__(self, num_experts: int, num_bins: int = 4, gate: str = "linear",
                 hidden: int = 32, temperature: float = 1.0, eps: float = 1e-12,
                 logs: str = "exact", gradients: bool = True) -> None:
        super().__init__()
        self.num_experts, self.num_bins = num_experts, num_bins
        self.temperature, self.eps = float(temperature), float(eps)
        self.logs, self.gradients = check_logs(logs), bool(gradients)
        self.gate = _make_gate(3 * num_experts + 2, (num_bins + 1) * num_experts, gate, hidden)

    def forward(self, hazard_logits: Tensor) -> dict[str, Tensor]:
        if hazard_logits.ndim != 3 or hazard_logits.shape[1:] != (self.num_experts,
                                                                  self.num_bins):
            raise ValueError(f"expected (B, {self.num_experts}, {self.num_bins}) hazard "
                             f"logits, got {tuple(hazard_logits.shape)}")
        z = hazard_logits.float()
        exact = self.logs == "exact"
        logp = (hazard_logits_to_outcome_log_probs(z) if exact
                else released_outcome_log_probs(z))                         # (B, M, T+1)
        b = logp.shape[0]
        g = self.gate(logit_features(logp, self.eps)).view(b, self.num_bins + 1,
                                                           self.num_experts)
        w = F.softmax(g / self.temperature, dim=-1)                         # (B, T+1, M)
        s = torch.einsum("btm,bmt->bt", w, logp)
        fused = F.log_softmax(s, dim=-1)
        if exact:
            hz = outcome_log_probs_to_hazards(fused, as_logits=True)
            hazards = torch.sigmoid(hz)
        else:  # released: the fused law is softmax(s), in probabilities
            hazards = released_hazards(F.softmax(s, dim=-1))
            hz = torch.logit(hazards)
        if not self.gradients:  # released: the conversions ran under no-grad
            hz, hazards, fused = hz.detach(), hazards.detach(), fused.detach()
        return {"hazard_logits": hz, "hazards": hazards, "outcome_log_probs": fused,
                "weights": w}


def logitprod_survival_loss_terms(out: dict[str, Tensor], time_bin: Tensor, event: Tensor,
                                  R: Tensor | None, lam: float = 0.1, alpha: float = 0.4,
                                  penalty: str = "mean_weight",
                                  from_logits: bool = True) -> dict[str, Tensor]:
    """``{"loss", "nll", "penalty"}``: NLL-survival + lam * ``survival_penalty`` (``penalty``
    kind). ``from_logits=False`` (the released clamped logs) takes the NLL of ``hazards`` as
    released (``nll_survival_loss(from_logits=False)``, eps 1e-7, float32)."""
    if from_logits:
        nll = nll_survival_loss(out["hazard_logits"], time_bin, event, alpha=alpha)
    else:
        nll = nll_survival_loss(out["hazards"], time_bin, event, alpha=alpha,
                                from_logits=False, eps=NLL_EPS)
    pen = survival_penalty(out["weights"], R, penalty) if R is not None else nll.new_zeros(())
    return {"loss": nll + lam * pen, "nll": nll, "penalty": pen}


# ------------------------------------------------------------------------------ training

# methods.md §2 schedule: cosine warm restarts, T0 = 10 epochs, x2, down to 1e-6.
WARM_RESTART_T0, WARM_RESTART_MULT, MIN_LR = 10, 2, 1e-6


def _objective(model: nn.Module, batch: tuple[Tensor, ...], R: Tensor | None, lam: float,
               alpha: float, penalty: str = "mean_weight") -> dict[str, Tensor]:
    if isinstance(model, LogitProdSurvival):
        return logitprod_survival_loss_terms(model(batch[0]), batch[1], batch[2], R, lam, alpha,
                                             penalty, from_logits=model.logs == "exact")
    fused, w = model(batch[0])
    terms = logitprod_loss_terms(fused, w, batch[1], R, lam)
    terms["nll"] = terms["ce"]
    return terms


def batch_starts(n: int, batch_size: int, drop_last: bool) -> range:
    """Start of every batch of an ``n``-sample epoch. ``drop_last`` (the released loaders)
    drops the last partial batch, unless there is no full batch at all (the released loop
    would then step on nothing; the whole set is one batch instead)."""
    stop = (n // batch_size) * batch_size if drop_last and n >= batch_size else n
    return range(0, stop, batch_size)


def _val_score(model: nn.Module, val: tuple[Tensor, ...], stop_on: str, alpha: float,
               val_time: Tensor | None) -> float:
    """Validation score: NLL / CE (lower is better), or Harrell's c of the fused risk (higher
    is better; NaN when no pair is comparable, which never counts as an improvement)."""
    model.eval()
    with torch.no_grad():
        if stop_on == "c_index":
            risk = survival_risk(model(val[0])["hazard_logits"])
            return harrell_c_index(risk, val[1] if val_time is None else val_time, val[2])
        return float(_objective(model, val, None, 0.0, alpha)["nll"])


def gate_settings(model: nn.Module, cfg: LogitProdConfig) -> dict[str, object]:
    """The gate loop's settings for ``model`` from the ``logitprod`` config section:
    classification reads the section itself (floor 1e-6, stopping on the CE, ``drop_last``),
    survival its ``survival`` subsection (never dropping batches)."""
    if isinstance(model, LogitProdSurvival):
        sc = cfg.survival
        return {"weight_decay": sc.weight_decay, "min_lr": sc.min_lr, "patience": sc.patience,
                "stop_on": sc.stop_on, "drop_last": False, "penalty": sc.penalty,
                "gradients": sc.gradients}
    return {"weight_decay": cfg.weight_decay, "min_lr": MIN_LR, "patience": cfg.patience,
            "stop_on": "nll", "drop_last": cfg.drop_last}


def fit_logitprod(model: LogitProd | LogitProdSurvival, train: tuple[Tensor, ...],
                  val: tuple[Tensor, ...] | None = None, R: Tensor | None = None,
                  cfg: LogitProdConfig | None = None, *, alpha: float = 0.4,
                  seed: int = 0, val_time: Tensor | None = None) -> dict[str, object]:
    """Train the gate with ``cfg`` (the ``logitprod`` section of the fuse config, passed as
    is): Adam, cosine warm restarts (T0 = 10 epochs, x2), early stopping, best state
    restored. ``train``/``val`` = (logits, labels) or (hazard_logits, time_bin, event).

    Classification: ``lr``, ``weight_decay``, ``batch_size``, floor 1e-6, early stopping on
    the validation CE (penalty excluded) with ``patience``; ``drop_last`` drops the last
    partial batch of the training epoch and of the validation set (``batch_starts``).
    Survival: ``cfg.survival`` gives the weight decay, the floor, the stopping score
    (``c_index`` of the risk against ``val_time``, default the time bins, or the
    NLL-survival with ``alpha``), the patience and the penalty kind; batches are never
    dropped. A batch whose loss has no gradient (the released survival gate,
    ``survival.gradients: false``, without a penalty) makes no step.
    Without ``val``, runs ``max_epochs`` and keeps the last state.
    Returns ``{"best_epoch", "best_val", "history", "settings"}`` (history: per-epoch train
    loss, val; settings: ``gate_settings``); ``best_epoch`` is -1 when no epoch beat the
    starting state."""
    cfg = cfg or LogitProdConfig()
    st = gate_settings(model, cfg)
    if isinstance(model, LogitProdSurvival):  # the released no-grad gate: training only
        model.gradients = cfg.survival.gradients
    wd, floor, patience = st["weight_decay"], st["min_lr"], st["patience"]
    stop_on, drop_last = st["stop_on"], st["drop_last"]
    higher = stop_on == "c_index"
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=WARM_RESTART_T0, T_mult=WARM_RESTART_MULT, eta_min=floor)
    n = train[0].shape[0]
    if val is not None and drop_last:  # the released validation loader drops its tail too
        keep = batch_starts(val[0].shape[0], cfg.batch_size, True).stop
        val = tuple(t[:keep] for t in val)
    best = (-math.inf if higher else math.inf, -1, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    for epoch in range(cfg.max_epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for i in batch_starts(n, cfg.batch_size, drop_last):
            idx = order[i:i + cfg.batch_size]
            loss = _objective(model, tuple(t[idx] for t in train), R, cfg.lam, alpha,
                              cfg.survival.penalty)["loss"]
            if loss.requires_grad:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        sched.step()
        row = {"epoch": epoch, "train_loss": total / seen}
        if val is not None:
            v = _val_score(model, val, stop_on, alpha, val_time)
            row["val"] = v
            if (v > best[0]) if higher else (v < best[0]):
                best = (v, epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= patience:
                history.append(row)
                break
        history.append(row)
    if val is not None:
        model.load_state_dict(best[2])
    return {"best_epoch": best[1] if val is not None else len(history) - 1,
            "best_val": best[0] if val is not None else float("nan"), "history": history,
            "settings": st}


def select_expert(model: LogitProd | LogitProdSurvival, m: int, scale: float = 50.0) -> None:
    """Set the gate to (numerically) one-hot weights on expert ``m``: output weights zero,
    bias ``scale`` at m (softmax leaves e^-scale for the others). The weighted-product family
    contains every single expert; this is that member."""
    last = model.gate if isinstance(model.gate, nn.Linear) else model.gate[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias.view(-1, model.num_experts)[:, m] = scale


def training_objective(model: LogitProd | LogitProdSurvival, data: tuple[Tensor, ...],
                       R: Tensor | None, lam: float, alpha: float = 0.4,
                       penalty: str = "mean_weight") -> float:
    """The gate's objective (CE or NLL-survival, + lam * penalty) on ``data``, no grad."""
    was = model.training
    model.eval()
    with torch.no_grad():
        v = float(_objective(model, data, R, lam, alpha, penalty)["loss"])
    model.train(was)
    return v


def expert_fallback(model: LogitProd | LogitProdSurvival, data: tuple[Tensor, ...],
                    R: Tensor | None, lam: float, alpha: float = 0.4,
                    penalty: str = "mean_weight") -> int | None:
    """If one expert alone (one-hot weights, whose penalty is R_mm = 0) has a lower training
    objective on ``data`` than the fitted gate, switch the gate to that expert.

    The paper's guarantee (the optimal weighted product is at least as good as the best
    expert under the training objective) is about the optimum; a gate trained at lr 1e-5
    from uniform weights and stopped early need not reach it. Checking the M one-hot members
    of the family makes the guarantee hold for the model that is actually used.
    Returns the expert switched to, or None."""
    fitted = training_objective(model, data, R, lam, alpha, penalty)
    state = copy.deepcopy(model.state_dict())
    best = (fitted, None)
    for m in range(model.num_experts):
        select_expert(model, m)
        v = training_objective(model, data, R, lam, alpha, penalty)
        if v < best[0]:
            best = (v, m)
    if best[1] is None:
        model.load_state_dict(state)
    else:
        select_expert(model, best[1])
    return best[1]


# ---------------------------------------------------------------------------- the method

def _gate(num_experts: int, num_outputs: int, gate: str, survival: bool, logs: str):
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
