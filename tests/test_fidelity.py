"""Released-code behaviours (issue 12), pinned on small hand-computed cases.

Each test names the released behaviour it pins and, where fusedist keeps a correction as an
option, checks that the option still gives the corrected behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedist.fusion.fusecpath import (FuseCPathModel, SparseAttention, cluster_subbags,
                                       topk_keep_mask)


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
