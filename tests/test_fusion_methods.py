"""Fusion methods: LogitProd (+ survival), FuseCPath, Meta-Encoder, expert heads, clustering.

Expected values are worked out by hand in the comments (small distributions, hazards
0.1..0.4, a 3-cluster sub-bag layout); the rest are properties the methods promise
(uniform start, gradients where the released code had none, invariances).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusedist.fusion.config import LogitProdConfig
from fusedist.fusion.methods.experts import GatedABMIL, TileMLP, mean_probability_ensemble
from fusedist.fusion.methods.fusecpath import (CrossRegionAttention, EmptyClusterError,
                                               FuseCPathModel, SparseAttention, cluster_subbags,
                                               collaborative_kd_loss, collaborative_kd_terms,
                                               multiview_kmeans, multiview_spectral,
                                               plan_subbags, slide_probabilities,
                                               topk_keep_mask)
from fusedist.fusion.methods.logitprod import (LogitProd, LogitProdSurvival, correlation_steps,
                                               error_correlation, expert_errors, fit_logitprod,
                                               harrell_c_index,
                                               hazard_logits_to_outcome_log_probs,
                                               hazards_to_outcome_probs, logit_features,
                                               logitprod_loss, logitprod_loss_terms,
                                               logitprod_survival_loss_terms, nll_survival_loss,
                                               outcome_log_probs_to_hazards,
                                               survival_error_correlation, survival_risk)
from fusedist.fusion.methods.meta import STRATEGIES, MetaEncoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors on a shared 2-core machine: two intra-op threads fight each other and
    # make each step ~40x slower. One thread keeps the module well under a minute.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _h(p: list[float]) -> float:
    return -sum(x * math.log(x + 1e-12) for x in p)


# ------------------------------------------------------------------------ logit features

def test_logit_features_hand_example():
    p1, p2 = [0.5, 0.25, 0.25], [0.2, 0.3, 0.5]
    logits = torch.log(torch.tensor([[p1, p2]], dtype=torch.float64)).float().requires_grad_()
    f = logit_features(logits)
    assert f.shape == (1, 3 * 2 + 2) and not f.requires_grad
    h1, h2 = 1.5 * math.log(2), _h(p2)            # H(p1) = .5 ln2 + 2 * .25 ln4
    mean_p = [0.35, 0.275, 0.375]
    expected = [0.5, 0.5,                           # msp
                0.25, 0.2,                          # margin = top1 - top2
                h1, h2,                             # entropies
                (h1 + h2) / 2,                      # mean entropy
                _h(mean_p) - (h1 + h2) / 2]         # mutual information
    assert torch.allclose(f[0], torch.tensor(expected), atol=1e-6)


def test_logit_features_single_class_margin_zero():
    f = logit_features(torch.randn(4, 3, 1))
    assert torch.allclose(f[:, :3], torch.ones(4, 3))          # msp = 1
    assert torch.equal(f[:, 3:6], torch.zeros(4, 3))           # margin 0 when K = 1
    assert f[:, 6:].abs().max() < 1e-6                         # entropies and MI ~ 0


# --------------------------------------------------------------------- error correlation

def test_correlation_steps_hand_example():
    # e1 = e2 (corr 1), e3 = reversed (corr -1): raw = [[1,1,-1],[1,1,-1],[-1,-1,1]].
    e = torch.tensor([1.0, 2.0, 3.0, 4.0])
    errors = torch.stack([e, e, e.flip(0)], dim=1)
    st = correlation_steps(errors, shrink=0.1)
    raw = torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    assert torch.allclose(st["raw"], raw)
    # Shrink toward mean(diag) I = I: off-diagonals x0.9, diagonal stays 1; already PSD
    # (eigenvalues 0.9 * {3, 0, 0} + 0.1), so the projection changes nothing.
    assert torch.allclose(st["shrunk"], 0.9 * raw + 0.1 * torch.eye(3, dtype=torch.float64))
    assert torch.allclose(st["psd"], st["shrunk"], atol=1e-12)
    final = torch.tensor([[0, 0.9, 0], [0.9, 0, 0], [0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(st["final"], final, atol=1e-12)
    # Without shrinkage the kept correlation is 1, not 0.9.
    assert correlation_steps(errors, shrink=0.0)["final"][0, 1].item() == pytest.approx(1.0)
    # The final matrix (zero trace, non-zero) is NOT PSD: eigenvalues +-0.9 and 0.
    ev = torch.linalg.eigvalsh(st["final"])
    assert torch.allclose(ev, torch.tensor([-0.9, 0.0, 0.9], dtype=torch.float64), atol=1e-12)


def _correlated_logits(n: int = 300, m: int = 4, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, 1, k, generator=g) + 0.7 * torch.randn(n, m, k, generator=g)
    z[torch.arange(n), :, y] += 1.0
    return z, y


@pytest.mark.parametrize("kind", ["nll", "brier", "zero_one"])
def test_error_correlation_properties(kind):
    z, y = _correlated_logits()
    R = error_correlation(z, y, kind=kind)
    assert R.shape == (4, 4) and R.dtype == torch.float32
    assert torch.equal(R, R.T)
    assert torch.equal(R.diagonal(), torch.zeros(4))
    assert (R >= 0).all() and R.max() > 0
    st = correlation_steps(expert_errors(z, y, kind), shrink=0.1)
    # raw is a correlation matrix (Gram of z-scores): unit diagonal, PSD; shrunk and psd too.
    assert torch.allclose(st["raw"].diagonal(), torch.ones(4, dtype=torch.float64))
    for name in ("raw", "shrunk", "psd"):
        assert torch.linalg.eigvalsh(st[name]).min() > -1e-10, name
    # Shrinkage: exactly (1 - s) raw + s * mean(diag) I.
    assert torch.allclose(st["shrunk"], 0.9 * st["raw"] + 0.1 * torch.eye(4, dtype=torch.float64))
    # After clamping entries and zeroing the diagonal: what holds is copositivity
    # (w^T R w >= 0 for w on the simplex), not PSD (trace 0 with positive entries).
    assert torch.linalg.eigvalsh(R.double()).min() < 0
    w = torch.distributions.Dirichlet(torch.ones(4)).sample((500,))
    assert (torch.einsum("bi,ij,bj->b", w, R, w) >= 0).all()
    # Stronger shrinkage -> smaller off-diagonal correlations.
    assert (error_correlation(z, y, kind, shrink=0.5) <= R + 1e-7).all()


def test_expert_errors_hand_example():
    p = torch.tensor([[[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]], dtype=torch.float64)
    y = torch.tensor([0])
    z = p.log()
    assert torch.allclose(expert_errors(z, y, "nll")[0], -torch.log(torch.tensor([0.7, 0.2],
                                                                             dtype=torch.float64)))
    brier = [0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2, 0.8 ** 2 + 0.5 ** 2 + 0.3 ** 2]
    assert torch.allclose(expert_errors(z, y, "brier")[0], torch.tensor(brier, dtype=torch.float64))
    assert expert_errors(z, y, "zero_one")[0].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        expert_errors(z, y, "hinge")


# -------------------------------------------------------------------------------- LogitProd

def test_logitprod_starts_uniform_and_gate_gets_gradients():
    torch.manual_seed(0)
    z, y = torch.randn(8, 3, 4), torch.randint(0, 4, (8,))
    model = LogitProd(3, 4)
    fused, w = model(z)
    assert torch.equal(w, torch.full((8, 3), 1 / 3))
    expected = F.log_softmax(F.log_softmax(z, -1).mean(dim=1), dim=-1)
    assert torch.allclose(fused, expected, atol=1e-6)
    assert torch.allclose(fused.exp().sum(-1), torch.ones(8))
    terms = logitprod_loss_terms(fused, w, y, error_correlation(z, y))
    terms["loss"].backward()
    assert model.gate.weight.grad.abs().sum() > 0 and model.gate.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        model(torch.randn(8, 2, 4))


def test_logitprod_loss_hand_example():
    fused = torch.log(torch.tensor([[0.6, 0.4], [0.3, 0.7]]))
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    R = torch.tensor([[0.0, 0.4], [0.4, 0.0]])
    y = torch.tensor([0, 1])
    ce = -(math.log(0.6) + math.log(0.7)) / 2
    pen = (2 * 0.5 * 0.5 * 0.4 + 0.0) / 2          # w^T R w = 2 w1 w2 R12, batch mean
    assert math.isclose(logitprod_loss(fused, w, y, R, lam=0.1).item(), ce + 0.1 * pen,
                        rel_tol=1e-6)


def test_logitprod_mlp_gate_deterministic_with_seed():
    z, y = _correlated_logits(64, 3, 3, seed=1)

    def run() -> torch.Tensor:
        torch.manual_seed(123)
        model = LogitProd(3, 3, gate="mlp", hidden=8)
        assert torch.allclose(model(z)[1], torch.full((64, 3), 1 / 3))   # zeroed last layer
        fit_logitprod(model, (z, y), None, None, LogitProdConfig(lr=0.01, max_epochs=2), seed=5)
        return model(z)[0]

    assert torch.equal(run(), run())


def _split_experts(n: int = 160, k: int = 3, seed: int = 0):
    """Expert 0 is right and confident on the first half and diffuse-but-wrong on the
    second; expert 1 the reverse. Confidence (msp/entropy) tells the gate whom to trust."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    wrong = (y + 1) % k
    z = 0.1 * torch.randn(n, 2, k, generator=g)
    first = torch.arange(n) < n // 2
    for good, bad, rows in ((0, 1, first), (1, 0, ~first)):
        idx = torch.nonzero(rows).view(-1)
        z[idx, good, y[idx]] += 3.0
        z[idx, bad, wrong[idx]] += 0.7
    return z, y


def test_logitprod_beats_best_single_expert():
    z, y = _split_experts()
    best_single = min(F.cross_entropy(z[:, m], y).item() for m in range(2))
    model = LogitProd(2, 3)
    uniform = F.nll_loss(model(z)[0], y).item()
    out = fit_logitprod(model, (z, y), (z, y), error_correlation(z, y),
                        LogitProdConfig(lr=0.05, max_epochs=25, patience=10))
    fused, w = model(z)
    ce = F.nll_loss(fused, y).item()
    assert ce < uniform < best_single
    assert ce < 0.5 * best_single
    assert out["best_val"] == pytest.approx(ce, rel=1e-5)       # best state restored
    first = torch.arange(160) < 80
    assert (w[first, 0] > 0.8).all() and (w[~first, 1] > 0.8).all()


# -------------------------------------------------------------------------------- survival

HAZ = [0.1, 0.2, 0.3, 0.4]
# P(t) = S(t-1) h(t): 0.1, 0.9*0.2, 0.72*0.3, 0.504*0.4; last = S(4) = 0.504*0.6
OUTCOMES = [0.1, 0.18, 0.216, 0.2016, 0.3024]


def test_survival_conversions_round_trip():
    h = torch.tensor([HAZ], dtype=torch.float64)
    p = hazards_to_outcome_probs(h)
    assert torch.allclose(p, torch.tensor([OUTCOMES], dtype=torch.float64))
    assert torch.allclose(p.sum(-1), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(outcome_log_probs_to_hazards(p.log()), h)
    assert torch.allclose(outcome_log_probs_to_hazards(p.log(), as_logits=True), torch.logit(h))
    assert torch.allclose(hazard_logits_to_outcome_log_probs(torch.logit(h)).exp(), p)
    # Unnormalised log-probs give the same hazards (renormalisation cancels).
    assert torch.allclose(outcome_log_probs_to_hazards(p.log() + 3.0), h)
    z = torch.randn(5, 4, dtype=torch.float64) * 3
    lp = hazard_logits_to_outcome_log_probs(z)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(outcome_log_probs_to_hazards(lp, as_logits=True), z)


def test_nll_survival_hand_example():
    h = torch.tensor([HAZ, HAZ])
    time_bin, event = torch.tensor([2, 1]), torch.tensor([1, 0])
    # Sample 0, event in bin 2: L_unc = -log(S(1) h(2)) = -log(0.72 * 0.3); weight 1.
    # Sample 1, censored after bin 1: L_cens = -log S(1) = -log 0.72; weight 1 - alpha.
    expected = (-math.log(0.216) + 0.6 * -math.log(0.72)) / 2
    assert math.isclose(nll_survival_loss(h, time_bin, event, alpha=0.4, from_logits=False).item(),
                        expected, rel_tol=1e-5)
    assert math.isclose(nll_survival_loss(torch.logit(h), time_bin, event, alpha=0.4).item(),
                        expected, rel_tol=1e-5)
    per = nll_survival_loss(h, time_bin, event, from_logits=False, reduction="none")
    assert torch.allclose(per, torch.tensor([-math.log(0.216), -0.6 * math.log(0.72)]))


def test_survival_risk_and_c_index():
    # risk = -sum_t S(t): S = 0.9, 0.72, 0.504, 0.3024
    assert math.isclose(survival_risk(torch.logit(torch.tensor([HAZ]))).item(),
                        -(0.9 + 0.72 + 0.504 + 0.3024), rel_tol=1e-5)
    time, event = [1.0, 2.0, 3.0], [1, 1, 0]
    assert harrell_c_index([3.0, 2.0, 1.0], time, event) == 1.0
    assert harrell_c_index([1.0, 2.0, 3.0], time, event) == 0.0
    assert harrell_c_index([1.0, 1.0, 1.0], time, event) == 0.5


def test_logitprod_survival_gate_receives_gradients():
    torch.manual_seed(0)
    z = torch.randn(6, 3, 4) * 2
    time_bin, event = torch.randint(0, 4, (6,)), torch.tensor([1, 0, 1, 1, 0, 1])
    model = LogitProdSurvival(3, num_bins=4)
    out = model(z)
    assert out["weights"].shape == (6, 5, 3)
    assert torch.allclose(out["weights"], torch.full((6, 5, 3), 1 / 3))
    assert torch.allclose(out["outcome_log_probs"].exp().sum(-1), torch.ones(6), atol=1e-6)
    # At the uniform start the fused outcome law is the renormalised geometric mean.
    geo = F.log_softmax(hazard_logits_to_outcome_log_probs(z).mean(1), -1)
    assert torch.allclose(out["outcome_log_probs"], geo, atol=1e-5)
    # The NLL alone (no penalty) must reach the gate: the released no-grad bug is gone.
    terms = logitprod_survival_loss_terms(out, time_bin, event, R=None, lam=0.0)
    terms["loss"].backward()
    assert model.gate.weight.grad is not None and model.gate.weight.grad.abs().sum() > 0
    # R from per-sample NLL-survival; a short fit with early stopping runs end to end.
    R = survival_error_correlation(z, time_bin, event)
    assert R.shape == (3, 3) and torch.equal(R.diagonal(), torch.zeros(3)) and (R >= 0).all()
    before = model.gate.weight.detach().clone()
    out = fit_logitprod(model, (z, time_bin, event), (z, time_bin, event), R,
                        LogitProdConfig(lr=0.01, max_epochs=3, batch_size=4))
    assert len(out["history"]) == 3 and not torch.equal(model.gate.weight, before)


# -------------------------------------------------------------------------------- FuseCPath

def test_collaborative_kd_hand_example():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    t1 = torch.tensor([[0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    t2 = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    T, alpha = 3.0, 0.5

    def soft(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    ce = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    kd = []
    for t in ([[0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]):
        kd.append(sum(kl(soft(ti), soft(si)) for ti, si in zip(t, [[1.0, 0.0], [0.0, 2.0]])) / 2)
    expected = alpha * ce + (1 - alpha) * (sum(kd) / 2) * T * T
    loss = collaborative_kd_loss(s, [t1, t2], y, alpha=alpha, temperature=T)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    terms = collaborative_kd_terms(s, [t1, t2], y, alpha=alpha, temperature=T)
    assert math.isclose(terms["ce"].item(), ce, rel_tol=1e-6)
    loss.backward()
    # Teacher logits are not detached: the KL term pushes them too.
    assert t1.grad.abs().sum() > 0 and t2.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        collaborative_kd_loss(s, [], y)


# Three clusters of sizes 2, 5, 11 over 18 tiles.
C0, C1 = [3, 10], [0, 4, 5, 12, 17]
C2 = [i for i in range(18) if i not in C0 + C1]      # [1, 2, 6, 7, 8, 9, 11, 13, 14, 15, 16]


def _ids() -> torch.Tensor:
    ids = torch.full((18,), 2)
    ids[C0], ids[C1] = 0, 1
    return ids


def test_cluster_subbags_hand_layout_without_shuffle():
    bags = cluster_subbags(_ids(), n_bags=4, per_cluster=3, seed=0, shuffle=False,
                           rule="cycle")
    # Bag i, cluster c: positions i*3 .. i*3+2 of cluster c's list, cyclic when short.
    expected = [
        [3, 10, 3, 0, 4, 5, 1, 2, 6],
        [10, 3, 10, 12, 17, 0, 7, 8, 9],
        [3, 10, 3, 4, 5, 12, 11, 13, 14],
        [10, 3, 10, 17, 0, 4, 15, 16, 1],
    ]
    assert bags.dtype == torch.long and bags.tolist() == expected


def test_cluster_subbags_shuffled_seeded():
    ids = _ids()
    bags = cluster_subbags(ids, n_bags=4, per_cluster=3, seed=7, rule="cycle")
    assert bags.shape == (4, 9)
    for c, members in enumerate((C0, C1, C2)):
        block = bags[:, 3 * c:3 * c + 3]
        assert set(block.reshape(-1).tolist()) <= set(members)     # laid out cluster by cluster
        assert (ids[block] == c).all()
    # The documented draw: one randperm per cluster from Generator(seed), in id order,
    # walked cyclically by consecutive sub-bags.
    g = torch.Generator().manual_seed(7)
    pos = torch.arange(12).view(4, 3)
    for c, members in enumerate((C0, C1, C2)):
        perm = torch.tensor(members)[torch.randperm(len(members), generator=g)]
        assert torch.equal(bags[:, 3 * c:3 * c + 3], perm[pos % len(members)])
    walk = bags[:, 6:9].reshape(-1)          # cluster 2: 12 draws from 11 tiles
    assert sorted(walk[:11].tolist()) == C2 and walk[11] == walk[0]
    assert torch.equal(bags, cluster_subbags(ids, n_bags=4, per_cluster=3, seed=7, rule="cycle"))
    assert not torch.equal(bags, cluster_subbags(ids, n_bags=4, per_cluster=3, seed=8,
                                                 rule="cycle"))


def test_cluster_subbags_empty_cluster_error():
    with pytest.raises(EmptyClusterError) as err:
        cluster_subbags(torch.tensor([0, 0, 2, 2]), n_bags=2, per_cluster=1)
    assert err.value.empty == [1]
    with pytest.raises(EmptyClusterError):
        cluster_subbags(torch.tensor([0, 1]), n_clusters=3)


def test_topk_mask_exact_keeps_at_most_k_even_with_ties():
    scores = torch.zeros(2, 3, 40)                       # all tied
    keep = topk_keep_mask(scores, 16, ties="exact")
    assert (keep.sum(-1) == 16).all()
    assert topk_keep_mask(torch.randn(4, 10), 16).all()  # shorter rows keep everything


def test_sparse_attention_rows_have_at_most_16_scores():
    torch.manual_seed(0)
    attn_mod = SparseAttention(32, num_heads=4, topk=16, epeg=True, epeg_k=5,
                               topk_ties="exact").eval()
    _, attn = attn_mod(torch.randn(2, 40, 32), return_attn=True)
    assert attn.shape == (2, 4, 40, 40)
    nonzero = (attn > 0).sum(-1)
    assert (nonzero <= 16).all() and (nonzero >= 1).all()
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 40))


def test_fusecpath_student_forward_on_a_subbag():
    torch.manual_seed(0)
    dims, teacher_dims = [48, 32, 40], [24, 16]
    model = FuseCPathModel(sum(dims), num_classes=3, teacher_dims=teacher_dims,
                           topk_ties="exact").eval()
    x = torch.randn(1, 500, sum(dims))
    logits, pool_attn = model(x, return_attn=True)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert torch.allclose(pool_attn.sum(-1), torch.ones(1))
    # Cross-region attention runs over the 8 x 8 = 64 regions: top-16 sparsity bites there.
    h = model.encoder.norm2(model.embed(x))
    _, attn = model.encoder.crmsa(h, return_attn=True)
    assert attn.shape == (3, 8, 64, 64)                  # (bags x k reps, heads, regions, regions)
    assert ((attn > 0).sum(-1) <= 16).all()
    # Teachers go through their projectors into the shared classifier; KD trains them.
    model.train()
    emb = [torch.randn(1, d) for d in teacher_dims]
    loss = collaborative_kd_loss(model(x), model.teacher_logits(emb), torch.tensor([2]))
    loss.backward()
    assert model.teacher_projectors[0].weight.grad.abs().sum() > 0
    assert model.embed[0].weight.grad.abs().sum() > 0
    assert model.encoder.crmsa.phi.grad.abs().sum() > 0


def test_fusecpath_bags_in_a_batch_do_not_mix():
    torch.manual_seed(0)
    model = CrossRegionAttention(32, num_heads=4, region_num=4).eval()
    x = torch.randn(2, 60, 32)
    y = model(x)
    x2 = x.clone()
    x2[1] += 1.0
    assert torch.allclose(model(x2)[0], y[0], atol=1e-6)   # bag 0 ignores bag 1
    assert torch.allclose(slide_probabilities(torch.zeros(5, 4)), torch.full((4,), 0.25))


# ----------------------------------------------------------------------------- Meta-Encoder

DIMS = [16, 24, 8]


def _xs(b: int = 6, n: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lead = (b,) if n is None else (b, n)
    return [torch.randn(*lead, d, generator=g) for d in DIMS]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_meta_encoder_shapes_and_gradients(strategy):
    torch.manual_seed(0)
    enc = MetaEncoder(DIMS, strategy, out_dim=5, embed_dim=64, token_dim=32, proj_dim=16)
    xs = [x.requires_grad_() for x in _xs()]
    out = enc(xs)
    assert out.shape == (6, 5)
    (out.pow(2).mean() + enc.aux_loss()).backward()
    assert enc.head.weight.grad.abs().sum() > 0
    assert xs[0].grad.abs().sum() > 0
    assert enc(_xs(2, 7)).shape == (2, 7, 5)                  # per-tile fusion for bags
    assert MetaEncoder(DIMS, strategy, None, embed_dim=64, token_dim=32,
                       proj_dim=16)(_xs()).shape[-1] == enc.fused_dim


def test_meta_encoder_self_attention_is_value_then_output_projection():
    torch.manual_seed(0)
    enc = MetaEncoder(DIMS, "self_attention", out_dim=None, embed_dim=64, num_heads=8)
    xs = _xs()
    fused, _ = enc.fuse(xs)
    a = enc.attn
    explicit = a.out_proj(a.v_proj(torch.cat(xs, -1)))
    assert torch.allclose(fused, explicit, atol=1e-5)
    fused.sum().backward()
    # As released, the query/key projections never influence the output: their gradient
    # is zero up to rounding in the one-key softmax.
    v_grad = a.v_proj.weight.grad.abs().max()
    assert a.q_proj.weight.grad.abs().max() < 1e-4 * v_grad
    assert a.k_proj.weight.grad.abs().max() < 1e-4 * v_grad


def test_meta_encoder_cross_attention_only_sees_fm1():
    torch.manual_seed(0)
    enc = MetaEncoder(DIMS, "cross_attention", out_dim=4, embed_dim=64)
    xs = _xs()
    out = enc(xs)
    assert torch.allclose(enc([xs[0], xs[1] + 5.0, -xs[2]]), out, atol=1e-5)
    assert not torch.allclose(enc([xs[0] + 1.0, xs[1], xs[2]]), out, atol=1e-3)
    explicit = torch.cat([a.out_proj(a.v_proj(xs[0])) for a in enc.attns], -1)
    assert torch.allclose(enc.fuse(xs)[0], explicit, atol=1e-5)


def test_meta_encoder_token_attention_sees_every_fm():
    torch.manual_seed(0)
    enc = MetaEncoder(DIMS, "token_attention", out_dim=4, token_dim=32).eval()
    xs = _xs()
    out = enc(xs)
    for i in range(len(DIMS)):
        changed = [x + 1.0 if j == i else x for j, x in enumerate(xs)]
        assert not torch.allclose(enc(changed), out, atol=1e-4), i


def test_meta_encoder_contrastive_aux_loss():
    torch.manual_seed(0)
    dims = [8, 8]
    enc = MetaEncoder(dims, "contrastive", out_dim=3, proj_dim=8, contrastive_weight=1.0)
    x = torch.randn(32, 8)
    _, aux = enc([x, torch.randn(32, 8)], return_aux=True)
    misaligned = aux["contrastive"].item()
    assert misaligned > 0 and enc.aux_loss().item() == pytest.approx(misaligned)
    # Aligned projections of the same input: the positives dominate, the loss drops.
    with torch.no_grad():
        enc.projs[1].load_state_dict(enc.projs[0].state_dict())
    enc([x, x])
    aligned = enc.aux_loss().item()
    assert 0 < aligned < misaligned
    # And optimising the auxiliary loss alone aligns two views of the same samples.
    enc2 = MetaEncoder(dims, "contrastive", out_dim=3, proj_dim=8, contrastive_weight=1.0)
    v2 = x @ torch.randn(8, 8)
    opt = torch.optim.Adam(enc2.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        enc2([x, v2])
        loss = enc2.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------- expert heads

def test_gated_abmil_attention_sums_to_one_over_tiles():
    torch.manual_seed(0)
    head = GatedABMIL(20, num_classes=3).eval()
    out = head(torch.randn(2, 7, 20))
    assert out["logits"].shape == (2, 3) and out["attention"].shape == (2, 7)
    assert torch.allclose(out["attention"].sum(-1), torch.ones(2))
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = head(torch.randn(2, 7, 20), mask=mask)
    assert torch.allclose(out["attention"].sum(-1), torch.ones(2))
    assert torch.equal(out["attention"][1, 4:], torch.zeros(3))
    assert head(torch.randn(9, 20))["logits"].shape == (1, 3)          # one (N, D) bag
    assert TileMLP(20, 4)(torch.randn(5, 20)).shape == (5, 4)
    z = torch.log(torch.tensor([[[0.8, 0.2], [0.4, 0.6]]]))
    assert torch.allclose(mean_probability_ensemble(z), torch.tensor([[0.6, 0.4]]))


# ------------------------------------------------------------------------------ clustering

def _blobs(n_per: int = 30, k: int = 4, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(k), n_per)
    centres_a, centres_b = rng.normal(0, 10, (k, 12)), rng.normal(0, 10, (k, 5))
    views = [centres_a[truth] + rng.normal(0, 0.5, (len(truth), 12)),
             centres_b[truth] + rng.normal(0, 0.5, (len(truth), 5))]
    return views, truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return all(len(set(a[b == c])) == 1 for c in np.unique(b)) and \
        len(np.unique(a)) == len(np.unique(b))


# Well-separated blobs give a disconnected kNN graph, which is the point here.
@pytest.mark.filterwarnings("ignore:Graph is not fully connected")
@pytest.mark.parametrize("method", ["kmeans", "spectral"])
def test_multiview_clustering_recovers_blobs(method):
    views, truth = _blobs()
    fn = multiview_kmeans if method == "kmeans" else multiview_spectral
    labels = fn(views, 4, seed=0) if method == "spectral" else fn(views, 4, seed=0, nredo=3)
    assert labels.shape == (120,) and _same_partition(labels, truth)


def test_plan_subbags_and_skip_reasons():
    views, _ = _blobs()
    plan = plan_subbags(views, n_clusters=4, n_bags=5, per_cluster=3)
    assert plan.ok and plan.indices.shape == (5, 12)
    # Released layout: clusters in order of first appearance among the tiles.
    for b, c in enumerate(dict.fromkeys(plan.labels.tolist())):
        assert (plan.labels[plan.indices[:, 3 * b:3 * b + 3].numpy()] == c).all()
    by_id = plan_subbags(views, n_clusters=4, n_bags=5, per_cluster=3, rule="cycle")
    for c in range(4):
        assert (by_id.labels[by_id.indices[:, 3 * c:3 * c + 3].numpy()] == c).all()
    few = plan_subbags([v[:3] for v in views], n_clusters=4)
    assert not few.ok and "only 3 tiles" in few.reason


def test_expert_fallback_switches_only_when_an_expert_is_better():
    """One expert is right and confident, the other confidently wrong: the uniform gate is
    worse than the good expert alone, so the fallback selects it; a gate that already
    beats every expert is left as it is."""
    from fusedist.fusion.methods.logitprod import expert_fallback, select_expert, training_objective

    y = torch.tensor([0, 1, 0, 1])
    good = F.one_hot(y, 2).float() * 4.0
    bad = F.one_hot(1 - y, 2).float() * 4.0
    z = torch.stack([bad, good], dim=1)                       # (4, M=2, K=2)
    model = LogitProd(2, 2)
    before = training_objective(model, (z, y), None, 0.0)
    assert expert_fallback(model, (z, y), None, 0.0) == 1
    after = training_objective(model, (z, y), None, 0.0)
    assert after < before
    assert after == pytest.approx(float(F.cross_entropy(good, y)), abs=1e-6)
    _, w = model(z)
    assert torch.allclose(w, torch.tensor([[0.0, 1.0]]).expand(4, 2), atol=1e-6)
    # Now the fitted state is the best expert itself: nothing better to switch to.
    assert expert_fallback(model, (z, y), None, 0.0) is None
    # Survival gate: one softmax per outcome bin, all on the chosen expert.
    surv = LogitProdSurvival(3, num_bins=4)
    select_expert(surv, 2)
    out = surv(torch.randn(5, 3, 4))
    assert torch.allclose(out["weights"][..., 2], torch.ones(5, 5), atol=1e-6)


def test_meta_encoder_mil_fuses_per_tile_then_pools():
    from fusedist.fusion.methods.meta import MetaEncoderMIL, MetaEncoderTile

    torch.manual_seed(0)
    xs = [torch.randn(7, 5), torch.randn(7, 3)]
    for strategy in ("concat", "self_attention", "cross_attention", "token_attention",
                     "contrastive"):
        m = MetaEncoderMIL([5, 3], strategy, 4, hidden=16, embed_dim=8, token_dim=8,
                           proj_dim=8)
        out = m(xs)
        assert out["logits"].shape == (1, 4) and out["attention"].shape == (1, 7)
        assert torch.allclose(out["attention"].sum(), torch.tensor(1.0))
        (out["logits"].sum() + m.aux_loss()).backward()
        assert all(p.grad is not None for p in m.meta.parameters() if p.requires_grad), strategy
        # the bag's prediction does not depend on the order of its tiles
        perm = torch.randperm(7)
        m.eval()
        assert torch.allclose(m(xs)["logits"], m([x[perm] for x in xs])["logits"], atol=1e-5)
    t = MetaEncoderTile([5, 3], "token_attention", 4, token_dim=8)
    assert t([torch.randn(6, 5), torch.randn(6, 3)]).shape == (6, 4)


_EAGER_OPTIM_PARITY = """
import sys
import torch
from torch import nn
from fusedist.fusion.training import eager_optim

def train():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    for make in (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-5),
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4)):
        opt = make(m.parameters())
        warm = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2,
                                                                    eta_min=1e-6)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0.001)
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            m(torch.randn(4, 5)).square().sum().backward()
            opt.step(); warm.step(); cos.step()
        opt.state_dict()
    return torch.cat([p.detach().flatten() for p in m.parameters()])

with eager_optim():
    a = train()
    print("inside", type(sys.modules["torch._dynamo"]).__name__)  # the stand-in
print("after", "torch._dynamo" in sys.modules)
import torch._dynamo  # the real one, after the block: torch's wrappers use it again
b = train()
print("equal", torch.equal(a, b))
with eager_optim():  # a process that has torch._dynamo keeps it
    print("kept", type(sys.modules["torch._dynamo"]).__name__)
"""

_EAGER_OPTIM_FALLBACK = """
import sys
import torch
from fusedist.fusion.training import eager_optim

with eager_optim():
    stub = sys.modules["torch._dynamo"]
    reset = stub.reset  # more than eager torch.optim asks: the real module answers
    print(type(sys.modules["torch._dynamo"]).__name__, reset.__module__)
print("torch._dynamo" in sys.modules)
"""


def test_eager_optim_trains_the_same_without_importing_dynamo():
    """``eager_optim`` (issue 27): the optimisers and schedulers the fusion heads use step to
    the same parameters as with the real ``torch._dynamo``, which is not imported inside the
    block and is importable (and used) after it. A fresh process: this one may have it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", _EAGER_OPTIM_PARITY], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["inside", "_EagerDynamo", "after", "False", "equal", "True", "kept",
                                "module"], p.stdout
    # Asked for anything else, the stand-in steps aside for the real torch._dynamo.
    p = subprocess.run([sys.executable, "-c", _EAGER_OPTIM_FALLBACK], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["module", "torch._dynamo", "True"], p.stdout
