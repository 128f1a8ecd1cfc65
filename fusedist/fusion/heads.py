"""Expert heads trained on one frozen FM each (methods.md §2 "Expert heads").

- ``GatedABMIL`` for slides: Linear(D, 512) + ReLU + Dropout(0.25); gated attention
  ``a = ReLU(Linear(512, 128, no bias))``, ``b = sigmoid(Linear(512, 128))``,
  ``score = Linear(128, 1)(a * b)``, softmax over tiles; classifier Linear(512, K).
- ``TileMLP`` for tiles: D -> 128 -> 128 -> K with LayerNorm and GELU.

Survival experts are the same heads with K = T hazard logits (T = 4 bins). The released
experts (``attention_bias=False, init="xavier_normal"``, the fuse config's default) have no
bias anywhere in the attention and start from Xavier-normal weights with zero biases.
``AttentionPool`` is shared with the FuseCPath student (which pools with the ungated
RRT-MIL variant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` that gives padded positions (``mask == False``) exactly zero.

    Padded bags (variable tile counts batched together) must not leak attention into the
    zero-filled padding, so invalid scores are set to the dtype's most negative value
    rather than -inf (a fully masked row then stays finite instead of becoming NaN).
    """
    if mask is not None:
        scores = scores.masked_fill(~mask.bool(), torch.finfo(scores.dtype).min)
    out = scores.softmax(dim=dim)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out


class AttentionPool(nn.Module):
    """ABMIL attention pooling: (B, N, D) tiles -> (B, D) bag embedding + (B, N) weights.

    ``gated=True`` is the gated form of methods.md §2 (ReLU branch without bias; sigmoid
    branch and scorer with a bias when ``bias``, without one as released when not).
    ``gated=False, bias=False`` is RRT-MIL's default
    ``DAttention`` (Linear(D, 128, no bias) -> ReLU -> Linear(128, 1, no bias)), which the
    FuseCPath student uses.
    """

    def __init__(self, dim: int, attn_dim: int = 128, gated: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        self.gated = gated
        self.attention_a = nn.Linear(dim, attn_dim, bias=False if gated else bias)
        self.attention_b = nn.Linear(dim, attn_dim, bias=bias) if gated else None
        self.score = nn.Linear(attn_dim, 1, bias=bias)

    def scores(self, x: Tensor) -> Tensor:
        """Unnormalised attention scores (B, N)."""
        h = torch.relu(self.attention_a(x))
        if self.attention_b is not None:
            h = h * torch.sigmoid(self.attention_b(x))
        return self.score(h).squeeze(-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        attn = masked_softmax(self.scores(x), mask, dim=-1)  # softmax over tiles
        return torch.einsum("bn,bnd->bd", attn, x), attn


def _as_bag(x: Tensor) -> tuple[Tensor, bool]:
    if x.ndim == 2:  # one bag (N, D), as CLAM/TRIDENT feed it
        return x.unsqueeze(0), True
    if x.ndim != 3:
        raise ValueError(f"bag features must be (N, D) or (B, N, D), got {tuple(x.shape)}")
    return x, False


class GatedABMIL(nn.Module):
    """Gated-attention ABMIL expert head.

    ``forward(x, mask=None)`` with x (B, N, D) (or one bag (N, D)) and an optional (B, N)
    validity mask -> ``{"logits": (B, K), "attention": (B, N), "embedding": (B, 512)}``.
    ``attention_bias=False`` drops the biases of the sigmoid branch and the scorer (the
    released experts); ``init="xavier_normal"`` re-initialises every Linear Xavier-normal
    with zero biases (released), ``"torch"`` keeps PyTorch's default.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 512,
                 attn_dim: int = 128, dropout: float = 0.25, attention_bias: bool = True,
                 init: str = "torch") -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.pool = AttentionPool(hidden, attn_dim, gated=True, bias=attention_bias)
        self.classifier = nn.Linear(hidden, num_classes)
        if init == "xavier_normal":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        elif init != "torch":
            raise ValueError(f"init must be 'xavier_normal' or 'torch', got {init!r}")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        x, single = _as_bag(x)
        if mask is not None and single:
            mask = mask.unsqueeze(0)
        h = self.embed(x.float())
        z, attn = self.pool(h, mask)
        return {"logits": self.classifier(z), "attention": attn, "embedding": z}


class TileMLP(nn.Module):
    """Tile-level expert: Linear(D, 128) -> LayerNorm -> GELU -> Linear(128, 128) ->
    LayerNorm -> GELU -> Linear(128, K). (B, D) -> (B, K) logits."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())


def expert_optimizer(model: nn.Module, lr: float = 2e-4,
                     weight_decay: float = 1e-5) -> torch.optim.Optimizer:
    """The expert heads' optimiser (methods.md §2: Adam lr 2e-4, wd 1e-5; 20 epochs for
    classification, 50 for survival — the epoch count is the caller's)."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def mean_probability_ensemble(logits: Tensor) -> Tensor:
    """Baseline (methods.md §5): mean of the experts' probabilities. (B, M, K) -> (B, K)."""
    return F.softmax(logits.float(), dim=-1).mean(dim=1)


__all__ = ["masked_softmax", "AttentionPool", "GatedABMIL", "TileMLP", "expert_optimizer",
           "mean_probability_ensemble"]
