"""Feature-level fusion over the encoders that share tiles: the concatenated-feature head
(``concat``) and the Meta-Encoder strategies (methods.md §3, ``meta.<strategy>``), fused per
tile before a gated-ABMIL head (or the tile MLP for tile tasks).

The module holds the Meta-Encoder modules, their head builders (``meta_mil``, ``meta_tile``:
a saved head of either rebuilds through ``methods.experts.build_head``) and the methods;
the heads train with the fold's bag / tile loops (``FoldContext.fit_head``).

Meta-Encoder (methods.md §3): fuse several FMs' feature vectors into one representation.

``MetaEncoder(dims, strategy, out_dim)`` takes a list of per-FM tensors (..., d_m) — one
vector per sample (B, d_m), or per tile (B, N, d_m) for bags, fused tile by tile before a
MIL head — and returns (..., out_dim): the strategy's fused vector (width ``fused_dim``)
through a final Linear(fused_dim, out_dim) (``out_dim=None``: the fused vector itself).

Strategies:
- ``concat``: concatenation.
- ``self_attention`` (as released): multi-head attention (1024, 8 heads) over the
  concatenated vector as a sequence of length 1. Softmax over one key is 1, so the block
  is exactly out_proj(v_proj(concat)); the query/key projections exist but get no gradient.
- ``cross_attention`` (as released): FM 1 is key/value, each other FM a query (one
  attention block per query FM), outputs concatenated. With length-1 sequences only FM 1's
  value projection reaches the output: the other FMs do not influence it at all.
- ``token_attention``: each FM through its own MLP to a common width plus a learned FM
  embedding, the M tokens through Transformer encoder layers, mean-pooled, LayerNorm —
  the version in which FMs actually attend to each other.
- ``contrastive``: per-FM linear maps to a common width, concatenated; auxiliary loss
  w * mean over FM pairs of symmetric InfoNCE (cosine / tau, tau = 0.5), available from
  ``aux_loss()`` after a forward or ``forward(xs, return_aux=True)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedist.fusion.methods.base import Method, Skipped
from fusedist.fusion.methods.experts import GatedABMIL, HeadFitted, TileMLP
from fusedist.fusion.methods.registry import register, register_head

if TYPE_CHECKING:
    from fusedist.fusion.fold import FoldContext

STRATEGIES = ("concat", "self_attention", "cross_attention", "token_attention", "contrastive")


class ProjectedAttention(nn.Module):
    """Multi-head attention whose query and key/value inputs may have any widths
    (separate q/k/v projections into ``embed_dim``, then an output projection)."""

    def __init__(self, q_dim: int, kv_dim: int, embed_dim: int = 1024, num_heads: int = 8,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(q_dim, embed_dim)
        self.k_proj = nn.Linear(kv_dim, embed_dim)
        self.v_proj = nn.Linear(kv_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, e = x.shape
        return x.view(b, n, self.num_heads, e // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, kv: Tensor) -> Tensor:
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(kv)), \
            self._heads(self.v_proj(kv))
        o = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.dropout if self.training else 0.0)
        b, _, n, _ = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


def symmetric_infonce(a: Tensor, b: Tensor, tau: float = 0.5) -> Tensor:
    """Symmetric InfoNCE between paired rows of a and b (R, D): row i of a and row i of b
    are positives, all other rows negatives; cosine similarity / tau, CE both directions."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / tau
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class MetaEncoder(nn.Module):
    def __init__(self, dims: Sequence[int], strategy: str, out_dim: int | None, *,
                 embed_dim: int = 1024, num_heads: int = 8, token_dim: int = 256,
                 token_layers: int = 2, token_heads: int = 8, proj_dim: int = 256,
                 contrastive_weight: float = 0.1, contrastive_tau: float = 0.5,
                 max_contrastive_rows: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        self.dims = [int(d) for d in dims]
        if not self.dims:
            raise ValueError("need at least one FM")
        self.strategy = strategy
        self.contrastive_weight, self.contrastive_tau = contrastive_weight, contrastive_tau
        self.max_contrastive_rows = max_contrastive_rows
        m, total = len(self.dims), sum(self.dims)
        if strategy == "concat":
            fused = total
        elif strategy == "self_attention":
            self.attn = ProjectedAttention(total, total, embed_dim, num_heads, dropout)
            fused = embed_dim
        elif strategy == "cross_attention":
            if m < 2:
                raise ValueError("cross_attention needs at least two FMs")
            self.attns = nn.ModuleList(ProjectedAttention(d, self.dims[0], embed_dim, num_heads,
                                                          dropout) for d in self.dims[1:])
            fused = (m - 1) * embed_dim
        elif strategy == "token_attention":
            self.tokenizers = nn.ModuleList(
                nn.Sequential(nn.Linear(d, token_dim), nn.GELU(), nn.Linear(token_dim, token_dim))
                for d in self.dims)
            # Which FM a token came from; without it the encoder is blind to FM identity.
            self.fm_embed = nn.Parameter(torch.zeros(m, token_dim))
            nn.init.trunc_normal_(self.fm_embed, std=0.02)
            layer = nn.TransformerEncoderLayer(token_dim, token_heads, 2 * token_dim, dropout,
                                               activation="gelu", batch_first=True,
                                               norm_first=True)
            self.token_encoder = nn.TransformerEncoder(layer, token_layers,
                                                       enable_nested_tensor=False)
            self.token_norm = nn.LayerNorm(token_dim)
            fused = token_dim
        else:  # contrastive
            if m < 2:
                raise ValueError("contrastive needs at least two FMs")
            self.projs = nn.ModuleList(nn.Linear(d, proj_dim) for d in self.dims)
            fused = m * proj_dim
        self.fused_dim = fused
        self.out_dim = fused if out_dim is None else int(out_dim)
        self.head: nn.Module = nn.Identity() if out_dim is None else nn.Linear(fused, out_dim)
        self._aux: dict[str, Tensor] = {}

    def _rows(self, xs: Sequence[Tensor]) -> tuple[list[Tensor], tuple[int, ...]]:
        if len(xs) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} FM inputs, got {len(xs)}")
        lead = tuple(xs[0].shape[:-1])
        rows = []
        for i, (x, d) in enumerate(zip(xs, self.dims)):
            if x.shape[-1] != d or tuple(x.shape[:-1]) != lead:
                raise ValueError(f"FM {i}: expected (*{lead}, {d}), got {tuple(x.shape)}")
            rows.append(x.reshape(-1, d).float())
        return rows, lead

    def _contrastive(self, zs: list[Tensor]) -> Tensor:
        r = zs[0].shape[0]
        if r < 2:
            return zs[0].new_zeros(())
        if r > self.max_contrastive_rows:  # bags: bound the (rows x rows) similarity matrix
            idx = torch.randperm(r, device=zs[0].device)[: self.max_contrastive_rows]
            zs = [z[idx] for z in zs]
        pairs = [symmetric_infonce(a, b, self.contrastive_tau)
                 for a, b in itertools.combinations(zs, 2)]
        return torch.stack(pairs).mean()

    def fuse(self, xs: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Fused vector (..., fused_dim) before the output layer, and named aux losses."""
        rows, lead = self._rows(xs)
        aux: dict[str, Tensor] = {}
        if self.strategy == "concat":
            fused = torch.cat(rows, dim=-1)
        elif self.strategy == "self_attention":
            x = torch.cat(rows, dim=-1).unsqueeze(1)          # a sequence of length 1
            fused = self.attn(x, x).squeeze(1)
        elif self.strategy == "cross_attention":
            kv = rows[0].unsqueeze(1)
            fused = torch.cat([a(q.unsqueeze(1), kv).squeeze(1)
                               for a, q in zip(self.attns, rows[1:])], dim=-1)
        elif self.strategy == "token_attention":
            tokens = torch.stack([t(x) for t, x in zip(self.tokenizers, rows)], dim=1)
            fused = self.token_norm(self.token_encoder(tokens + self.fm_embed).mean(dim=1))
        else:
            zs = [p(x) for p, x in zip(self.projs, rows)]
            fused = torch.cat(zs, dim=-1)
            aux["contrastive"] = self.contrastive_weight * self._contrastive(zs)
        return fused.reshape(*lead, self.fused_dim), aux

    def forward(self, xs: Sequence[Tensor],
                return_aux: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        fused, aux = self.fuse(xs)
        self._aux = aux
        out = self.head(fused)
        return (out, aux) if return_aux else out

    def aux_loss(self) -> Tensor:
        """Weighted auxiliary loss of the last forward (0 for strategies without one);
        add it to the task loss."""
        if not self._aux:
            return torch.zeros(())
        return torch.stack(list(self._aux.values())).sum()


class MetaEncoderMIL(nn.Module):
    """Meta-Encoder fused per tile, then a gated-ABMIL head (methods.md §3: "for bags, fuse
    per tile before the MIL head"). ``forward(xs)`` with one (B, N, d_i) or (N, d_i) tensor
    per FM -> the ABMIL dict (``logits``, ``attention``, ``embedding``); ``aux_loss()`` as
    MetaEncoder. ``strategy="concat"`` is the concatenated-feature ABMIL baseline."""

    def __init__(self, dims: Sequence[int], strategy: str, num_outputs: int, *,
                 hidden: int = 512, dropout: float = 0.25, **meta_kwargs: float) -> None:
        super().__init__()
        self.meta = MetaEncoder(dims, strategy, None, **meta_kwargs)
        self.mil = GatedABMIL(self.meta.fused_dim, num_outputs, hidden=hidden, dropout=dropout)

    def forward(self, xs: Sequence[Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        return self.mil(self.meta(xs), mask)

    def aux_loss(self) -> Tensor:
        return self.meta.aux_loss()


class MetaEncoderTile(nn.Module):
    """Meta-Encoder on tile features, then the tile MLP: one (B, d_i) per FM -> (B, K)."""

    def __init__(self, dims: Sequence[int], strategy: str, num_outputs: int,
                 **meta_kwargs: float) -> None:
        super().__init__()
        self.meta = MetaEncoder(dims, strategy, None, **meta_kwargs)
        self.mlp = TileMLP(self.meta.fused_dim, num_outputs)

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        return self.mlp(self.meta(xs))

    def aux_loss(self) -> Tensor:
        return self.meta.aux_loss()


@register_head("meta_mil")
def _meta_mil(kw: dict) -> nn.Module:
    return MetaEncoderMIL(kw["dims"], kw["strategy"], kw["out"], hidden=kw["hidden"],
                          dropout=kw["dropout"], **kw["meta"])


@register_head("meta_tile")
def _meta_tile(kw: dict) -> nn.Module:
    return MetaEncoderTile(kw["dims"], kw["strategy"], kw["out"], **kw["meta"])


# --------------------------------------------------------------------------- the methods

class _FeatureFusion(Method):
    strategy: str

    def fit(self, ctx: FoldContext) -> HeadFitted:
        g, me, ex = ctx.c.feature_group, ctx.cfg.meta, ctx.cfg.experts
        need = 2 if self.strategy in ("concat", "cross_attention", "contrastive") else 1
        if len(g) < need:
            raise Skipped(f"skipped: needs {need}+ encoders that share tiles, has {g}")
        kw = {"dims": [ctx.c.dims[e] for e in g], "strategy": self.strategy,
              "out": ctx.num_outputs,
              "meta": {"embed_dim": me.embed_dim, "token_dim": me.token_dim,
                       "proj_dim": me.token_dim, "contrastive_weight": me.contrastive_weight}}
        arch = "meta_tile" if ctx.task.tile else "meta_mil"
        if not ctx.task.tile:
            kw.update(hidden=ex.hidden, dropout=ex.dropout)
        return ctx.fit_head(self.name, arch, kw, list(g), "aligned", ctx.train,
                            me.epochs or ctx.expert_epochs(), me.lr or ex.lr,
                            select_best=me.select_best)


@register
class Concat(_FeatureFusion):
    key = "concat"
    order = 40
    strategy = "concat"

    def label(self, task):
        return f"concat-feature {'MLP' if task.tile else 'ABMIL'}"


@register
class MetaEncoderMethod(_FeatureFusion):
    key = "meta"
    order = 50

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.strategy = name[len("meta."):]

    @classmethod
    def expand(cls, cfg, c):
        return [cls(f"meta.{s}") for s in sorted(dict.fromkeys(cfg.meta.strategies))]

    def label(self, task):
        return f"Meta-Encoder {self.strategy}"
