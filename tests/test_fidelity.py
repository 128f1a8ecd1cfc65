"""Released-code behaviours (issue 12), pinned on small hand-computed cases.

Each test names the released behaviour it pins and, where fusedist keeps a correction as an
option, checks that the option still gives the corrected behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedist.fusion.methods.fusecpath import (FuseCPathModel, SparseAttention,
                                               cluster_subbags, topk_keep_mask)


# --------------------------------------------------------------------- FuseCPath top-k

def test_topk_released_keeps_every_tie_with_the_kth():
    scores = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    # Released: mask = scores < (2nd largest = 3) -> 5, 3, 3, 3 survive.
    assert topk_keep_mask(scores, 2).tolist() == [[True, True, True, True, False, False]]
    assert topk_keep_mask(scores, 2, ties="keep").sum() == 4
    # The corrected option keeps exactly k.
    exact = topk_keep_mask(scores, 2, ties="exact")
    assert exact.sum() == 2 and bool(exact[0, 0])
    with pytest.raises(ValueError, match="tie rule"):
        topk_keep_mask(scores, 2, ties="nope")


def test_topk_tie_rule_matters_on_zero_padded_subbags():
    """A 500-tile sub-bag does not fill the 24 x 24 square: zero-padded regions give rows of
    tied scores, where the released rule keeps more than 16 entries."""
    torch.manual_seed(0)
    x = torch.randn(1, 500, 64)
    counts = {}
    for ties in ("keep", "exact"):
        torch.manual_seed(1)
        model = FuseCPathModel(64, num_classes=2, topk_ties=ties).eval()
        h = model.encoder.norm2(model.embed(x))
        _, attn = model.encoder.crmsa(h, return_attn=True)
        counts[ties] = (attn > 0).sum(-1)
    assert (counts["exact"] <= 16).all()
    more = int((counts["keep"] > 16).sum())
    assert more > 0, "the released >= rule should keep ties on padded regions"
    with pytest.raises(ValueError, match="tie rule"):
        SparseAttention(32, 4, topk_ties="sometimes")


# ------------------------------------------------------------------- FuseCPath sub-bags

def test_released_subbags_hand_layout_without_shuffle():
    # Cluster 1 appears first (tile 0), so its block comes first; cluster 0 holds 1, 3, 4.
    ids = torch.tensor([1, 0, 1, 0, 0])
    # per_cluster 1: span = ceil(3 / 1) * 6 = 18; [0, 2] repeated 9x, [1, 3, 4] 6x.
    bags = cluster_subbags(ids, n_bags=3, per_cluster=1, shuffle=False)
    assert bags.tolist() == [[0, 1], [2, 3], [0, 4]]
    # per_cluster 2: span = ceil(3 / 2) * 12 = 24.
    bags = cluster_subbags(ids, n_bags=2, per_cluster=2, shuffle=False)
    assert bags.tolist() == [[0, 2, 1, 3], [0, 2, 4, 1]]
    # The corrected rule lays clusters out by id and walks each list cyclically.
    assert cluster_subbags(ids, n_bags=3, per_cluster=1, shuffle=False,
                           rule="cycle").tolist() == [[1, 0], [3, 2], [4, 0]]


def test_released_subbags_past_the_list_end_draw_from_the_cluster():
    ids = torch.tensor([1, 0, 1, 0, 0])
    bags = cluster_subbags(ids, n_bags=20, per_cluster=1, shuffle=False)
    # Rows 0..16 slice the 18-entry lists; rows 17.. (upper bound >= 18) are draws.
    assert bags[:17, 0].tolist() == [0, 2] * 8 + [0]
    assert set(bags[17:, 0].tolist()) <= {0, 2} and set(bags[17:, 1].tolist()) <= {1, 3, 4}


def test_released_subbags_repeat_tiles_and_use_them_unevenly():
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.permutation(np.repeat(np.arange(5), [3, 12, 30, 7, 25])))
    rel = cluster_subbags(ids, n_bags=50, per_cluster=10, seed=3)
    cyc = cluster_subbags(ids, n_bags=50, per_cluster=10, seed=3, rule="cycle")
    assert rel.shape == cyc.shape == (50, 50)
    assert torch.equal(rel, cluster_subbags(ids, n_bags=50, per_cluster=10, seed=3))
    order = [int(c) for c in dict.fromkeys(ids.tolist())]         # first appearance
    for b, c in enumerate(order):
        assert (ids[rel[:, 10 * b:10 * b + 10]] == c).all()
    for c in range(5):
        assert (ids[cyc[:, 10 * c:10 * c + 10]] == c).all()        # by id
    # A block of a 3-tile cluster repeats tiles under both rules; a 30-tile cluster's block
    # repeats only under the released rule (repetition + second shuffle).
    big = order.index(2)
    rel_dups = sum(len(set(r)) < 10 for r in rel[:, 10 * big:10 * big + 10].tolist())
    cyc_dups = sum(len(set(r)) < 10 for r in cyc[:, 20:30].tolist())
    assert rel_dups > 0 and cyc_dups == 0
    # Tile use: the corrected rule uses every tile of a cluster equally often (+-1).
    cyc_use = np.bincount(cyc[:, 20:30].reshape(-1).numpy(), minlength=ids.numel())
    used = cyc_use[(ids == 2).numpy()]
    assert used.max() - used.min() <= 1
    rel_use = np.bincount(rel[:, 10 * big:10 * big + 10].reshape(-1).numpy(),
                          minlength=ids.numel())[(ids == 2).numpy()]
    assert rel_use.max() - rel_use.min() > 1
    with pytest.raises(ValueError, match="sub-bag rule"):
        cluster_subbags(ids, rule="random")


# ------------------------------------------------------------------------------ c-index

def test_harrell_c_index_matches_scikit_survival_with_ties():
    from sksurv.metrics import concordance_index_censored

    from fusedist.fusion.survival import harrell_c_index

    # Hand case: ties in time (event vs censored at t=2; two events at t=3) and in risk.
    t = np.array([1.0, 2.0, 2.0, 3.0, 3.0, 4.0])
    e = np.array([1, 1, 0, 1, 1, 0], bool)
    r = np.array([5.0, 4.0, 4.0, 2.0, 3.0, 1.0])
    # Comparable: 0 with 1..5 (5 pairs, all concordant); 1 with 2 (tied risk: 1/2), 3, 4, 5;
    # 3 and 4 with 5 (event 3-3 not comparable). 11 pairs, 10.5 concordant.
    assert harrell_c_index(r, t, e) == pytest.approx(10.5 / 11)
    assert harrell_c_index(r, t, e) == pytest.approx(concordance_index_censored(e, t, r)[0])
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        t = rng.integers(1, 8, n).astype(float)
        e = rng.random(n) < 0.6
        e[0] = True
        r = rng.integers(0, 5, n).astype(float)
        assert harrell_c_index(r, t, e) == pytest.approx(
            concordance_index_censored(e, t, r)[0], abs=1e-12)


def test_fuse_config_switches_reach_the_subbag_plan_and_the_model():
    from types import SimpleNamespace

    from fusedist.fusion.config import FuseCPathConfig
    from fusedist.fusion.methods.fusecpath import plan_slide

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 8, (4, 6))
    feats = [np.concatenate([c + rng.normal(0, 0.1, (15, 6)) for c in centers])[
        rng.permutation(60)].astype(np.float32)]
    plans = {}
    for rule in ("released", "cycle"):
        fc = FuseCPathConfig(n_clusters=4, n_bags=6, per_cluster=3, subbag_rule=rule)
        plans[rule], reason = plan_slide(feats, SimpleNamespace(fusecpath=fc, seed=0), "s1")
        assert plans[rule] is not None and plans[rule].shape == (6, 12), reason
    assert not torch.equal(plans["released"], plans["cycle"])
    with pytest.raises(ValueError):
        FuseCPathConfig(topk_ties="sometimes")
    assert FuseCPathConfig().topk_ties == "keep" and FuseCPathConfig().subbag_rule == "released"


# ------------------------------------------------------------------ LogitProd survival

def _one_sample_survival_weights():
    # Two experts, R_01 = 1; bin 0 trusts expert 0 alone, bin 1 expert 1 alone.
    R = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])                    # (B=1, T+1=2, M=2)
    return w, R


def test_survival_penalty_released_is_that_of_the_bin_mean_weight():
    from fusedist.fusion.methods.logitprod import survival_penalty

    w, R = _one_sample_survival_weights()
    # Released: w̄ = (0.5, 0.5), w̄ᵀRw̄ = 2 * 0.5 * 0.5 * 1 = 0.5. Per bin: one-hot, 0 each.
    assert survival_penalty(w, R).item() == pytest.approx(0.5)
    assert survival_penalty(w, R, "mean_weight").item() == pytest.approx(0.5)
    assert survival_penalty(w, R, "per_bin").item() == pytest.approx(0.0)
    w2 = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    # w̄ = (0.75, 0.25): 2 * 0.75 * 0.25 = 0.375; per bin: (0.5 + 0) / 2 = 0.25.
    assert survival_penalty(w2, R).item() == pytest.approx(0.375)
    assert survival_penalty(w2, R, "per_bin").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="survival penalty"):
        survival_penalty(w, R, "max")


def test_survival_loss_terms_take_the_configured_penalty():
    from fusedist.fusion.config import LogitProdConfig
    from fusedist.fusion.methods.logitprod import logitprod_survival_loss_terms

    w, R = _one_sample_survival_weights()
    out = {"hazard_logits": torch.zeros(1, 1), "hazards": torch.full((1, 1), 0.5),
           "weights": w}
    t, e = torch.tensor([0]), torch.tensor([1])
    # NLL of one event in bin 0 at hazard 1/2: -log 0.5.
    rel = logitprod_survival_loss_terms(out, t, e, R, lam=0.1, alpha=0.4,
                                        penalty=LogitProdConfig().survival.penalty)
    assert rel["nll"].item() == pytest.approx(np.log(2))
    assert rel["loss"].item() == pytest.approx(np.log(2) + 0.05)
    per = logitprod_survival_loss_terms(out, t, e, R, lam=0.1, penalty="per_bin")
    assert per["loss"].item() == pytest.approx(np.log(2))


def _constant_risk_case():
    """One expert (the gate's softmax over one expert is 1 whatever it learns: every epoch
    scores the same). Hazard logits c * 1 with c = 2, 0, 1 -> risk order 0 > 2 > 1; times
    1, 2, 3, events 1, 1, 0: comparable (0,1) (0,2) (1,2), concordant the first two: c = 2/3."""
    z = torch.tensor([2.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 1, 4).clone()
    return z, torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0])


def test_survival_gate_released_settings_and_c_index_stopping():
    from fusedist.fusion.config import LogitProdConfig
    from fusedist.fusion.methods.logitprod import LogitProdSurvival, fit_logitprod, gate_settings

    cfg = LogitProdConfig(max_epochs=300)
    model = LogitProdSurvival(1, num_bins=4)
    assert gate_settings(model, cfg) == {
        "weight_decay": 1e-3, "min_lr": 1e-7, "patience": 100, "stop_on": "c_index",
        "drop_last": False, "penalty": "mean_weight", "gradients": True}
    z, tb, ev = _constant_risk_case()
    out = fit_logitprod(model, (z, tb, ev), (z, tb, ev), None, cfg,
                        val_time=torch.tensor([1.0, 2.0, 3.0]))
    assert out["best_val"] == pytest.approx(2 / 3)                 # the c-index, not the NLL
    # Best at epoch 0, never beaten: stops once 100 epochs passed without a better score.
    assert out["best_epoch"] == 0 and len(out["history"]) == 101
    # fusedist's earlier survival loop: the classification settings, stopping on the NLL.
    old = LogitProdConfig(max_epochs=300, patience=50,
                          survival={"weight_decay": 1e-4, "min_lr": 1e-6, "stop_on": "nll",
                                    "patience": 50})
    out = fit_logitprod(LogitProdSurvival(1, num_bins=4), (z, tb, ev), (z, tb, ev), None, old)
    assert len(out["history"]) == 51 and out["best_val"] > 1.0    # an NLL, not a c-index
    assert out["settings"]["stop_on"] == "nll" and out["settings"]["min_lr"] == 1e-6


def test_survival_gate_released_no_gradient_switch():
    from fusedist.fusion.config import LogitProdConfig
    from fusedist.fusion.methods.logitprod import (LogitProdSurvival, fit_logitprod,
                                                   logitprod_survival_loss_terms, survival_penalty)

    torch.manual_seed(0)
    z = torch.randn(6, 2, 4) * 2
    tb, ev = torch.randint(0, 4, (6,)), torch.tensor([1, 0, 1, 1, 0, 1])
    R = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    grads = {}
    for gradients in (True, False):
        model = LogitProdSurvival(2, num_bins=4, gradients=gradients)
        with torch.no_grad():  # off the uniform start, where the penalty's gradient is 0
            model.gate.bias.copy_(torch.linspace(-1.0, 1.0, model.gate.bias.numel()))
        out = model(z)
        nll_only = logitprod_survival_loss_terms(out, tb, ev, None, lam=0.0)["loss"]
        assert nll_only.requires_grad is gradients
        terms = logitprod_survival_loss_terms(out, tb, ev, R, lam=0.1)
        terms["loss"].backward()
        grads[gradients] = model.gate.bias.grad.clone()
        # Released: what reaches the gate is exactly the penalty's gradient.
        if not gradients:
            model.zero_grad()
            (0.1 * survival_penalty(model(z)["weights"], R)).backward()
            assert torch.allclose(model.gate.bias.grad, grads[False])
    assert not torch.allclose(grads[True], grads[False])
    # Without a penalty the released gate never steps; fusedist's does.
    for gradients, moved in ((False, False), (True, True)):
        model = LogitProdSurvival(2, num_bins=4)
        before = model.gate.weight.detach().clone()
        cfg = LogitProdConfig(lr=0.01, max_epochs=2, batch_size=4,
                              survival={"gradients": gradients})
        fit_logitprod(model, (z, tb, ev), None, None, cfg)
        assert (not torch.equal(model.gate.weight, before)) is moved


# -------------------------------------------------------------- LogitProd classification

def test_classification_gate_drop_last_and_patience():
    from fusedist.fusion.config import LogitProdConfig
    from fusedist.fusion.methods.logitprod import LogitProd, batch_starts, fit_logitprod

    assert list(batch_starts(35, 16, True)) == [0, 16]             # 32 used, 3 dropped
    assert list(batch_starts(35, 16, False)) == [0, 16, 32]
    assert list(batch_starts(10, 16, True)) == [0]                 # under a batch: all of it
    assert LogitProdConfig().drop_last and LogitProdConfig().patience == 100
    # One expert (a constant score every epoch). Validation: 16 samples at p_y = 1/2, then
    # 4 at p_y = 0.1. Released drops the tail: CE = log 2; with every sample:
    # (16 log 2 + 4 log 10) / 20.
    p = torch.tensor([[0.5, 0.5]] * 16 + [[0.9, 0.1]] * 4)
    z, y = p.log().unsqueeze(1), torch.tensor([0] * 16 + [1] * 4)
    cfg = LogitProdConfig(max_epochs=300)
    out = fit_logitprod(LogitProd(1, 2), (z, y), (z, y), None, cfg)
    assert out["best_val"] == pytest.approx(np.log(2), rel=1e-5)
    assert out["best_epoch"] == 0 and len(out["history"]) == 101   # patience 100
    # The training epoch used 16 samples: its loss is the first full batch's mean CE.
    assert out["settings"]["drop_last"] is True
    out = fit_logitprod(LogitProd(1, 2), (z, y), (z, y), None,
                        LogitProdConfig(max_epochs=300, drop_last=False, patience=50))
    assert out["best_val"] == pytest.approx((16 * np.log(2) + 4 * np.log(10)) / 20, rel=1e-5)
    assert len(out["history"]) == 51
    assert out["history"][0]["train_loss"] == pytest.approx(out["best_val"], rel=1e-5)


# ------------------------------------------------------------------ probabilities, logs

def test_clamped_logs_match_exact_ones_at_normal_scales():
    """The released logs (tests/test_fidelity_logs.py pins each site on saturated inputs)
    differ from the exact ones only where probabilities approach their eps."""
    from fusedist.fusion.methods.logitprod import LogitProd, LogitProdSurvival

    torch.manual_seed(0)
    z = torch.randn(5, 3, 4)
    a, b = LogitProd(3, 4)(z)[0], LogitProd(3, 4, logs="clamped")(z)[0]
    assert torch.equal(a, b)                    # the released product: exact log_softmax
    a, b = LogitProdSurvival(3, 4)(z), LogitProdSurvival(3, 4, logs="clamped")(z)
    assert torch.allclose(a["hazards"], b["hazards"], atol=1e-5)
    assert torch.allclose(a["hazard_logits"], b["hazard_logits"], atol=1e-4)
    with pytest.raises(ValueError, match="logs"):
        LogitProd(3, 4, logs="rounded")


def test_logitprod_card_records_the_log_mode():
    from fusedist.fusion.methods.logitprod import LogitProdFitted, _gate

    gate = _gate(2, 3, "linear", False, "clamped")
    fitted = LogitProdFitted(None, {}, gate, "linear", False)
    assert fitted.spec()["logs"] == "clamped"
    old_card = {k: v for k, v in fitted.spec().items() if k != "logs"}
    assert old_card.get("logs", "exact") == "exact"
    assert _gate(2, 3, "linear", True, "clamped").logs == "clamped"


# ------------------------------------------------------------------------ expert ABMIL

def test_released_expert_abmil_has_no_attention_bias_and_xavier_init():
    from fusedist.fusion.methods.experts import GatedABMIL

    torch.manual_seed(0)
    rel = GatedABMIL(512, 2, attention_bias=False, init="xavier_normal")
    for lin in (rel.pool.attention_a, rel.pool.attention_b, rel.pool.score):
        assert lin.bias is None
    assert torch.equal(rel.embed[0].bias, torch.zeros(512))
    assert torch.equal(rel.classifier.bias, torch.zeros(2))
    # Xavier-normal: std = sqrt(2 / (fan_in + fan_out)) = sqrt(2 / 1024) for 512 -> 512.
    assert rel.embed[0].weight.std().item() == pytest.approx((2 / 1024) ** 0.5, rel=0.02)
    assert rel.pool.attention_a.weight.std().item() == pytest.approx((2 / 640) ** 0.5, rel=0.05)
    old = GatedABMIL(512, 2)                    # fusedist's earlier head
    assert old.pool.attention_a.bias is None
    assert old.pool.attention_b.bias is not None and old.pool.score.bias is not None
    assert set(old.state_dict()) - set(rel.state_dict()) == {"pool.attention_b.bias",
                                                             "pool.score.bias"}
    with pytest.raises(ValueError, match="init"):
        GatedABMIL(8, 2, init="orthogonal")


def test_expert_spec_rebuilds_the_same_head_and_old_cards_still_load():
    from fusedist.fusion.config import ExpertConfig
    from fusedist.fusion.methods.experts import HeadFitted, build_head

    ex = ExpertConfig()
    assert (ex.attention_bias, ex.init, ex.schedule, ex.select_best) == (
        False, "xavier_normal", "warm_restarts", True)
    kw = {"dim": 8, "out": 2, "hidden": 16, "dropout": 0.0, "attention_bias": False,
          "init": "xavier_normal"}
    torch.manual_seed(0)
    head = build_head("abmil", kw)
    spec = {"arch": "abmil", "kw": kw, "encoders": ["e"], "view": "bags", "tile": False}
    loaded = HeadFitted.from_spec(spec, head.state_dict(), None)
    x = [torch.randn(5, 8)]
    assert torch.equal(head.eval()(x)["logits"], loaded.model(x)["logits"])
    # A card written before the switch (no attention_bias / init): the biased head.
    old_kw = {k: kw[k] for k in ("dim", "out", "hidden", "dropout")}
    old = build_head("abmil", old_kw)
    assert old.head.pool.score.bias is not None
    HeadFitted.from_spec({**spec, "kw": old_kw}, old.state_dict(), None)


def test_expert_warm_restarts_hand_values():
    from fusedist.fusion.training import expert_scheduler

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = expert_scheduler(opt, "warm_restarts")
    lrs = []
    for _ in range(31):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    mid = 1e-6 + (2e-4 - 1e-6) * 0.5          # halfway down a cycle: cos(pi/2) = 0
    assert lrs[0] == pytest.approx(2e-4) and lrs[5] == pytest.approx(mid)
    assert lrs[10] == pytest.approx(2e-4)     # restart after T0 = 10 epochs
    assert lrs[20] == pytest.approx(mid)      # the second cycle lasts 20
    assert lrs[30] == pytest.approx(2e-4)
    assert expert_scheduler(opt, "constant") is None
    with pytest.raises(ValueError, match="schedule"):
        expert_scheduler(opt, "step")


def test_expert_keeps_its_best_validation_epoch():
    """Training with a validation set ends on the weights of the epoch whose validation loss
    is the lowest: the same run stopped after each epoch (same seeds, no validation) gives
    each epoch's weights to compare."""
    from fusedist.fusion.methods.experts import GatedABMIL
    from fusedist.fusion.tasks import ClassTargets
    from fusedist.fusion.training import ViewsBag, predict_bags, train_bags

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 6)
    bags = [(rng.normal(0, 1, (int(rng.integers(3, 7)), 6)) + 0.8 * y[i]).astype(np.float32)
            for i in range(12)]
    y[[9, 10]] = 1 - y[[9, 10]]    # half the validation slides look like the other class
    task = ClassTargets(num_outputs=2, classes=["0", "1"], y=y)
    tr, va = np.arange(8), np.arange(8, 12)
    cpu = torch.device("cpu")

    def run(epochs, val=None):
        torch.manual_seed(1)
        m = ViewsBag(GatedABMIL(6, 2, hidden=8, dropout=0.0, attention_bias=False,
                                init="xavier_normal"))
        train_bags(m, [bags], tr, task, epochs, 0.05, 0.0, None, 3, cpu,
                   schedule="warm_restarts", val=val)
        return m

    losses, states = [], []
    for e in range(1, 7):
        m = run(e)
        out, _ = predict_bags(m, [bags], va, cpu)
        losses.append(float(task.loss(torch.as_tensor(out), task.targets(va, cpu))))
        states.append(m.state_dict())
    best = int(np.argmin(losses))
    assert best != len(losses) - 1, "pick a case whose best epoch is not the last"
    kept = run(6, val=va).state_dict()
    assert all(torch.equal(kept[k], states[best][k]) for k in kept)


# --------------------------------------------------------------------------- XMAG EMA

def test_ema_released_order_lags_one_step():
    """w0 = 1, SGD lr 1 on loss = w (gradient 1): w1 = 0, w2 = -1; EMA decay 0.5.
    After the step: ema = 0.5 * 1 + 0.5 * 0 = 0.5, then 0.5 * 0.5 + 0.5 * -1 = -0.25.
    Before the step (released): ema = 0.5 * 1 + 0.5 * 1 = 1, then 0.5 * 1 + 0.5 * 0 = 0.5."""
    from fusedist.distill.ema import EMA, step_with_ema

    for order, expected in (("after_step", [0.5, -0.25]), ("before_step", [1.0, 0.5])):
        model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema = EMA(model, decay=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        got = []
        for _ in range(2):
            opt.zero_grad()
            model.weight.sum().backward()
            step_with_ema(opt.step, ema, model, True, order)
            got.append(ema.module.weight.item())
        assert got == pytest.approx(expected), order
        assert model.weight.item() == pytest.approx(-1.0)
        # Inside gradient accumulation (not a boundary) the EMA does not move.
        step_with_ema(lambda: None, ema, model, False, order)
        assert ema.num_updates == 2
    with pytest.raises(ValueError, match="EMA update order"):
        step_with_ema(opt.step, ema, model, True, "during")


# ------------------------------------------------------------------- the fidelity preset

def _fuse(**kw):
    from fusedist.fusion.config import FuseConfig

    return FuseConfig(bags="b", labels="l.csv", **kw)


def test_fidelity_released_resolves_every_switch():
    from fusedist.distill.config import DistillConfig
    from fusedist.fidelity import DISTILL_RELEASED, FUSE_RELEASED, resolved

    # Every switch issue 12 names (and the earlier released-code switches) is in the preset.
    assert set(FUSE_RELEASED) == {
        "experts.attention_bias", "experts.init", "experts.schedule", "experts.select_best",
        "logitprod.gate_data", "logitprod.expert_fallback", "logitprod.drop_last",
        "logitprod.patience", "logitprod.logs", "logitprod.survival.penalty",
        "logitprod.survival.weight_decay", "logitprod.survival.min_lr",
        "logitprod.survival.stop_on", "logitprod.survival.patience",
        "logitprod.survival.gradients", "fusecpath.clustering", "fusecpath.subbag_rule",
        "fusecpath.topk_ties"}
    assert set(DISTILL_RELEASED) == {"ema_update", "optim.schedule", "augment.backend"}
    assert resolved(_fuse(fidelity="released"), "fuse") == FUSE_RELEASED
    dc = DistillConfig(tiles="t", features="f", fidelity="released")
    assert resolved(dc, "distill") == DISTILL_RELEASED
    # The default preset sets nothing: the corrections stay, the rest is released already.
    default = resolved(_fuse(), "fuse")
    corrections = {"logitprod.gate_data": "oof", "logitprod.expert_fallback": True,
                   "logitprod.logs": "exact", "logitprod.survival.gradients": True,
                   "fusecpath.clustering": "kmeans"}
    assert default == {**FUSE_RELEASED, **corrections}
    assert resolved(DistillConfig(tiles="t", features="f"), "distill") == {
        "ema_update": "after_step", "optim.schedule": "cosine", "augment.backend": "tensor"}


def test_fidelity_explicit_keys_win_and_the_dump_round_trips(tmp_path):
    from fusedist.config import ConfigError, load_config
    from fusedist.fidelity import resolved
    from fusedist.fusion.config import FuseConfig, LogitProdConfig

    p = tmp_path / "fuse.yaml"
    p.write_text("fidelity: released\nbags: b\nlabels: l.csv\n"
                 "logitprod:\n  lr: 0.001\n  survival:\n    gradients: true\n")
    cfg = load_config(FuseConfig, p, ["logitprod.logs=exact"])
    got = resolved(cfg, "fuse")
    assert got["logitprod.survival.gradients"] is True          # the YAML wins
    assert got["logitprod.logs"] == "exact"                     # --set wins
    assert got["logitprod.gate_data"] == "in_fold" and cfg.logitprod.lr == 0.001
    assert got["logitprod.survival.weight_decay"] == 1e-3       # the preset fills the rest
    # A built section keeps what it set; the preset fills the rest of it.
    cfg2 = _fuse(fidelity="released", logitprod=LogitProdConfig(logs="exact"))
    assert cfg2.logitprod.logs == "exact" and cfg2.logitprod.gate_data == "in_fold"
    # What a run records (its dump) loads back to the same config.
    assert FuseConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    # Assigning the preset on a built config resolves it too.
    cfg3 = _fuse()
    cfg3.fidelity = "released"
    assert resolved(cfg3, "fuse")["logitprod.survival.gradients"] is False
    with pytest.raises(ConfigError, match="fidelity"):
        load_config(FuseConfig, p, ["fidelity=paper"])


def test_fidelity_recipes_and_docs_name_every_switch():
    from pathlib import Path

    from fusedist.distill.config import DistillConfig
    from fusedist.fidelity import DISTILL_RELEASED, FUSE_RELEASED, resolved
    from fusedist.recipes import load_recipe

    repo = Path(__file__).resolve().parents[1]
    cfg = load_recipe(repo / "configs/fuse/released.yaml")
    assert cfg.fidelity == "released" and resolved(cfg, "fuse") == FUSE_RELEASED
    paper = load_recipe(repo / "configs/distill/xmag_paper.yaml")
    assert isinstance(paper, DistillConfig) and paper.fidelity == "default"
    doc = (repo / "docs/methods.md").read_text()
    for key in [*FUSE_RELEASED, *DISTILL_RELEASED]:
        leaf = key.split(".")[-1]
        assert f"{key}" in doc or f"{leaf}" in doc, key
    assert "fidelity: released" in doc


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_a_released_fused_model_saves_and_loads_the_same_predictions(tmp_path, task):
    """``fidelity: released`` end to end in-process (no Ray): bias-free experts with warm
    restarts and their best epoch, the in-fold clamped-log gate (the released survival
    gate); the saved model rebuilds every component."""
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import load_cohort
    from fusedist.fusion.fold import fold_context, prepare_methods, select_methods
    from fusedist.fusion.model import load_model, refit, write_model
    from fusedist.synth.cohort import synthetic_cohort

    from .test_fuse import TINY

    co = synthetic_cohort(str(tmp_path / "c"), num_slides=16, tiles=(12, 24), seed=5)
    tiny = {**TINY, "experts": {**TINY["experts"], "epochs": 2, "survival_epochs": 2},
            "logitprod": {"lr": 1e-3, "max_epochs": 5},
            "methods": ["logitprod", "best_expert"]}
    cfg = FuseConfig(bags=co.bags, labels=co.labels, task=task, output=str(tmp_path / "o"),
                     fidelity="released", **tiny)
    c = load_cohort(cfg)
    rows, _ = select_methods(cfg, c)
    prepared, _ = prepare_methods(rows, c, cfg, progress=False)
    fitted = refit(c, cfg, rows, prepared)
    model = load_model(write_model(str(tmp_path / "model"), c, cfg, fitted, {}))
    spec = model.card["components"]["logitprod"]["spec"]
    assert spec["logs"] == "clamped"
    assert all(e["kw"]["attention_bias"] is False for e in spec["experts"].values())
    ctx = fold_context(c, cfg, np.arange(c.num_samples), np.arange(0), -1, prepared)
    x = ctx.inputs(np.arange(c.num_samples))
    loaded = model.predict(x)
    for name, f in fitted.items():
        np.testing.assert_array_equal(f.predict(x).pred, loaded[name].pred, err_msg=name)
