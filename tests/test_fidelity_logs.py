"""``logitprod.logs: clamped`` takes every log as the released LogitProd code does (issue 29).

Each site is pinned on saturated inputs (probabilities near 0 and 1) with the expected value
written from the released formula — its eps, what it clamps, float32 — by hand or in numpy
float32, never by re-running fusedist's code. ``exact`` (the default correction) is checked
beside it where the two differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

F32 = np.float32


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True))
                                                 .sum(-1, keepdims=True))


# ------------------------------------------------------ 1, 5: classification product

def test_released_product_takes_exact_log_softmax_and_returns_s():
    from fusedist.fusion.methods.logitprod import LogitProd, logitprod_loss_terms
    from fusedist.fusion.logs import class_log_probs

    # Expert 0 puts p_1 = e^-20 / (1 + e^-20) ~ 2.1e-9 on class 1, below the old 1e-7 clamp.
    z = torch.tensor([[[0.0, -20.0], [0.0, 2.0]]])
    y = torch.tensor([1])
    # Released: s = sum_m w_m log_softmax(z_m), w = 1/2 at the zero-initialised gate.
    s = 0.5 * (_log_softmax([0.0, -20.0]) + _log_softmax([0.0, 2.0]))
    p = np.exp(_log_softmax(s))
    fused = {}
    for logs in ("exact", "clamped"):
        fused[logs], w = LogitProd(2, 2, logs=logs)(z)
        assert w.tolist() == [[0.5, 0.5]]
        np.testing.assert_allclose(fused[logs].exp()[0].detach().numpy(), p, rtol=1e-5)
    assert torch.equal(fused["exact"], fused["clamped"])
    # What the old clamp at 1e-7 gave: p_1 about 7x too large.
    s_old = 0.5 * (np.log(np.maximum(np.exp(_log_softmax([0.0, -20.0])), 1e-7))
                   + _log_softmax([0.0, 2.0]))
    assert np.exp(_log_softmax(s_old))[1] > 5 * p[1]
    assert class_log_probs(z[0], "clamped")[0, 1].item() == pytest.approx(-20.0, abs=1e-6)
    with pytest.raises(ValueError, match="logs"):
        class_log_probs(z, "rounded")
    # 5: the released returns s, fusedist log_softmax(s): the same probabilities and CE.
    s_t = torch.tensor(s, dtype=torch.float32).view(1, 2)
    ce = logitprod_loss_terms(fused["clamped"], w, y, None)["ce"].item()
    assert ce == pytest.approx(F.cross_entropy(s_t, y).item(), rel=1e-6)
    assert ce == pytest.approx(-math.log(p[1]), rel=1e-5)


# ---------------------------------------------------- 2: survival outcome law, hazards

def test_released_survival_outcome_law_clamps_at_1e12():
    from fusedist.fusion.logs import released_outcome_log_probs

    # h = sigmoid(-18) ~ 1.523e-8 in all 4 bins: P(t) ~ 1.523e-8 (1 - ...)^(t-1), far above
    # 1e-12, so log(P + 1e-12) ~ log P (the old 1e-7 clamp gave log 1e-7 = -16.12 instead).
    h = 1.0 / (1.0 + math.exp(18.0))
    lp = released_outcome_log_probs(torch.full((1, 4), -18.0))[0]
    assert lp[0].item() == pytest.approx(math.log(h + 1e-12), abs=1e-5)
    assert lp[3].item() == pytest.approx(math.log(h * (1 - h) ** 3 + 1e-12), abs=1e-5)
    assert lp[4].item() == pytest.approx(math.log((1 - h) ** 4), abs=1e-6)
    # Saturated: h = (9.36e-14, 1, 1/2, 1/2) in float32. 1 - h(2) = 0 -> 1e-12, so S = (1,
    # 1e-12, 5e-13, 2.5e-13); P = (9.36e-14, 1, 5e-13, 2.5e-13 | tail 2.5e-13), each below
    # 1e-12 clamped to it; log(P + 1e-12) = log 2e-12 there and log(1 + 1e-12) = 0.
    lp = released_outcome_log_probs(torch.tensor([[-30.0, 30.0, 0.0, 0.0]]))[0]
    two = math.log(F32(2e-12))
    np.testing.assert_allclose(lp.numpy(), [two, 0.0, two, two, two], rtol=1e-6, atol=1e-7)
    assert lp.dtype == torch.float32


def test_released_fused_hazards_come_back_through_one_minus_cumsum():
    from fusedist.fusion.methods.logitprod import LogitProdSurvival
    from fusedist.fusion.logs import released_hazards

    # One expert (weight 1): the fused law is softmax(log(P + 1e-12)) = (2e-12, 1, 2e-12,
    # 2e-12 | 2e-12) (its sum 1 + 8e-12 is 1 in float32). Back: P clamped at 1e-12 (none
    # is below it), cdf = (2e-12, 1, 1, 1), S(t-1) = (1, 1 - 2e-12 = 1, 0 -> 1e-12,
    # 0 -> 1e-12): h = (2e-12, 1, 2, 2) clamped to [1e-12, 1 - 1e-12 = 1 in float32].
    z = torch.tensor([[[-30.0, 30.0, 0.0, 0.0]]])
    rel = LogitProdSurvival(1, 4, logs="clamped")(z)
    np.testing.assert_allclose(rel["hazards"][0].detach().numpy(), [2e-12, 1.0, 1.0, 1.0],
                               rtol=1e-5)
    assert torch.isinf(rel["hazard_logits"][0, 1:]).all()      # logit(1): S = 0 after bin 1
    exact = LogitProdSurvival(1, 4)(z)["hazards"][0].detach()
    np.testing.assert_allclose(exact.numpy(), [math.exp(-30) / (1 + math.exp(-30)), 1.0,
                                               0.5, 0.5], rtol=1e-5)
    # Hand: P(t) below the floor is raised to it; S from 1 - cumsum.
    q = torch.tensor([[0.5, 0.25, 1e-14, 0.25]])
    # P = (0.5, 0.25, 1e-12); cdf = (0.5, 0.75, 0.75); S = (1, 0.5, 0.25).
    np.testing.assert_allclose(released_hazards(q)[0].numpy(), [0.5, 0.5, 4e-12], rtol=1e-5)


def _np_released_fused_hazards(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The released survival product in numpy float32, uniform weights (a zero gate):
    (hazards, S(t-1))."""
    eps = F32(1e-12)
    h = (F32(1) / (F32(1) + np.exp(-z.astype(F32)))).astype(F32)
    surv = np.cumprod(np.maximum(F32(1) - h, eps), axis=-1, dtype=F32)
    prev = np.concatenate([np.ones_like(surv[..., :1]), surv[..., :-1]], -1)
    p = np.concatenate([np.maximum(prev * h, eps), np.maximum(surv[..., -1:], eps)], -1)
    s = np.log(p + eps).mean(axis=1, dtype=F32)                      # w = 1/M
    q = np.exp(s - s.max(-1, keepdims=True))
    q = (q / q.sum(-1, keepdims=True, dtype=F32)).astype(F32)
    pe = np.maximum(q[..., :-1], eps)
    cdf = np.cumsum(pe, -1, dtype=F32)
    sp = np.concatenate([np.ones_like(cdf[..., :1]), np.maximum(F32(1) - cdf[..., :-1], eps)],
                        -1)
    return np.clip(pe / sp, eps, F32(1) - eps), sp


def test_released_fused_hazards_match_the_released_formula_at_saturating_scales():
    from fusedist.fusion.methods.logitprod import LogitProdSurvival

    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 2, 4, generator=g) * 6.0     # a share of bins saturate
    rel = LogitProdSurvival(2, 4, logs="clamped")(z)["hazards"].detach().numpy()
    ref, surv = _np_released_fused_hazards(z.numpy())
    # float32 exp/log may differ by an ulp between numpy and torch; where 1 - cdf cancels,
    # a few ulps of the cdf (~1e-6 in all) change h by ~1e-6 / S(t-1) relatively. So compare
    # where S(t-1) >= 1e-3 with that tolerance, and at the floor, where S(t-1) = 1e-12.
    ok = (surv >= 1e-3) | (surv == F32(1e-12))
    assert ok.mean() > 0.75 and (surv == F32(1e-12)).any()
    tol = ref * (1e-5 + 1e-6 / np.where(surv >= 1e-3, surv, 1.0)) + 1e-9
    assert (np.abs(rel - ref) <= tol)[ok].all()
    exact = LogitProdSurvival(2, 4)(z)["hazards"].detach().numpy()
    assert np.abs(exact - rel)[ok].max() > 0.1       # the released floor and cancellation


# --------------------------------------------------------------------- 3: NLL-survival

def test_released_nll_survival_clamps_h_in_float32():
    from fusedist.fusion.survival import nll_survival_loss

    # Sample 0: h = (1, 1/2), event in bin 1. h(1) -> 1 - 1e-7, which float32 rounds to
    # 1 - 2^-23, so S(1) = 2^-23 (above the 1e-7 floor): L = -(log 2^-23 + log 1/2) = 24 ln 2.
    # Sample 1: h = (1e-9, 1e-9) -> 1e-7 each, event in bin 0: L = -log 1e-7.
    # Sample 2: the same hazards, censored after bin 1: S(2) = (1 - 2^-23)^2, weight 0.6.
    h = torch.tensor([[1.0, 0.5], [1e-9, 1e-9], [1e-9, 1e-9]])
    tb, ev = torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0])
    per = nll_survival_loss(h, tb, ev, from_logits=False, reduction="none")
    expected = [24 * math.log(2), -math.log(F32(1e-7)), -0.6 * 2 * math.log1p(-2.0 ** -23)]
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-6)
    # The old rule (1 - h clamped at 1e-7) gave -log 1e-7 + ln 2: 0.176 more per saturated bin.
    assert per[0].item() - (-math.log(1e-7) + math.log(2)) == pytest.approx(
        math.log(1e-7) + 23 * math.log(2), abs=1e-5)
    # float64 keeps 1 - 1e-7: the released dtype is what makes the 2^-23.
    per64 = nll_survival_loss(h.double(), tb, ev, from_logits=False, reduction="none")
    assert per64[0].item() == pytest.approx(-math.log(1e-7) + math.log(2), rel=1e-9)
    # The fused survival loss of ``logs: clamped`` reads the hazards through it.
    from fusedist.fusion.methods.logitprod import logitprod_survival_loss_terms

    out = {"hazards": h[:1], "weights": torch.full((1, 3, 1), 1.0)}
    nll = logitprod_survival_loss_terms(out, tb[:1], ev[:1], None, from_logits=False)["nll"]
    assert nll.item() == pytest.approx(24 * math.log(2), rel=1e-6)


# ---------------------------------------------------------------- 4: error correlation

def _hand_R01(errors: np.ndarray, shrink: float = 0.1) -> float:
    """Two experts: R_01 = (1 - shrink) * Pearson(e_0, e_1), clamped at 0 (the 2 x 2
    shrunk matrix [[1, b], [b, 1]] is PSD already)."""
    return max(0.0, (1 - shrink) * float(np.corrcoef(errors.T)[0, 1]))


def test_released_classification_R_clamps_p_y_at_1e8_in_float32():
    from fusedist.fusion.methods.logitprod import error_correlation, expert_errors

    # Expert 0 is saturated and wrong on samples 0 and 1 (p_y = e^-30, e^-25), expert 1 not.
    d = np.array([[-30.0, -3.0], [-25.0, -2.0], [0.0, 1.0], [2.0, 3.0]])
    z = torch.tensor(np.stack([np.zeros_like(d), d], -1), dtype=torch.float32)
    y = torch.tensor([1, 1, 1, 1])
    # -log p_1 = log(1 + e^-d) for logits (0, d); released: p_1 clamped at 1e-8 first.
    nll = np.vectorize(lambda d: math.log1p(math.exp(-d)))
    released = np.minimum(nll(d), -math.log(F32(1e-8)))
    np.testing.assert_allclose(expert_errors(z, y, "nll", logs="clamped").numpy(), released,
                               rtol=1e-6)
    np.testing.assert_allclose(expert_errors(z, y, "nll").numpy(), nll(d), rtol=1e-9)
    rel = error_correlation(z, y, logs="clamped")[0, 1].item()
    assert rel == pytest.approx(_hand_R01(released), abs=1e-5)
    exact = error_correlation(z, y)[0, 1].item()
    assert exact == pytest.approx(_hand_R01(nll(d)), abs=1e-5)
    assert abs(rel - exact) > 1e-3
    with pytest.raises(ValueError, match="logs"):
        expert_errors(z, y, "brier", logs="rounded")


def _np_released_nll(h: np.ndarray, tb: np.ndarray, ev: np.ndarray,
                     alpha: float = 0.4) -> np.ndarray:
    """The released NLL-survival in numpy float32: h clamped to [1e-7, 1 - 1e-7]."""
    eps = F32(1e-7)
    h = np.clip(h.astype(F32), eps, F32(1) - eps)
    s = np.concatenate([np.ones_like(h[:, :1]), np.cumprod(F32(1) - h, 1, dtype=F32)], 1)
    i = np.arange(len(tb))
    unc = -ev * (np.log(np.maximum(s[i, tb], eps)) + np.log(np.maximum(h[i, tb], eps)))
    cen = -(1 - ev) * np.log(np.maximum(s[i, tb + 1], eps))
    return (1 - alpha) * (unc + cen) + alpha * unc


def test_released_survival_R_takes_the_released_nll_of_sigmoid():
    from fusedist.fusion.methods.logitprod import survival_error_correlation, survival_expert_errors

    # Expert 0 saturates (hazard logits +-20), expert 1 does not; both go wrong on the first
    # three slides (an event after a near-certain bin-0 hazard, an event at a near-0 hazard,
    # a censoring after near-certain hazards), so their errors correlate.
    z = torch.tensor([[[20.0, 0.0], [2.0, 0.0]],
                      [[-20.0, -20.0], [-1.0, -1.0]],
                      [[20.0, 20.0], [1.5, 1.0]],
                      [[-20.0, 20.0], [-1.0, 1.0]],
                      [[0.0, -20.0], [0.0, -1.0]]])
    tb, ev = torch.tensor([1, 0, 1, 1, 0]), torch.tensor([1, 1, 0, 1, 0])
    h = 1.0 / (1.0 + np.exp(-z.numpy().astype(np.float64)))
    released = np.stack([_np_released_nll(h[:, m], tb.numpy(), ev.numpy().astype(F32))
                         for m in range(2)], 1)
    got = survival_expert_errors(z, tb, ev, logs="clamped")
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), released, rtol=1e-5)
    rel = survival_error_correlation(z, tb, ev, logs="clamped")[0, 1].item()
    assert rel == pytest.approx(_hand_R01(released), abs=1e-5)
    exact = survival_error_correlation(z, tb, ev)[0, 1].item()
    assert abs(rel - exact) > 1e-3
