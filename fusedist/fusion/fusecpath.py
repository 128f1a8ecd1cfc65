"""FuseCPath (methods.md §4): cluster sub-bags, an RRT-MIL student over concatenated patch
FMs, slide-FM teachers through their own projectors into the student's classifier, and
collaborative distillation.

Student: Linear(sum d, 512) + ReLU + Dropout(0.25) -> re-embedding encoder -> ABMIL pool
-> Linear(512, K). The encoder follows RRT-MIL (Tang et al., CVPR 2024) as FuseCPath
releases it: one region-MSA layer (the sequence squared and padded to an 8 x 8 grid of
regions, 8 heads inside each region, plus EPEG: a depthwise (15, 1) convolution added to
the attention scores), one cross-region layer (tokens dispatched to 3 representatives per
region, attention across regions, combined back), then LayerNorm. FuseCPath's change is
sparse attention: in every attention map, scores below each row's 16th largest are masked
out (ties with it kept, as released; ``topk_ties="exact"`` keeps exactly 16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedist.fusion.heads import AttentionPool


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


__all__ = [
    "collaborative_kd_terms", "collaborative_kd_loss", "EmptyClusterError", "cluster_subbags",
    "slide_probabilities", "topk_keep_mask", "SUBBAG_RULES", "TOPK_TIES", "SparseAttention", "RegionAttention",
    "CrossRegionAttention", "RRTEncoder", "FuseCPathModel", "fusecpath_optimizer",
]
