"""Experts: one head per frozen encoder (methods.md §2), gated ABMIL over the encoder's own
tiles (the tile MLP for tile tasks). They always run: the logit-level methods combine them,
and the fold (``fusion.fold.FoldContext``) trains each once and shares it.

This module holds the head modules, ``HeadFitted`` (a trained head over bags or tiles, which
concat and the Meta-Encoder strategies return too) with its builders by architecture, and
the ``experts`` method; the heads train with the bag / tile loops of ``fusion.training``.

Head modules (methods.md §2 "Expert heads"):

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

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedist.fusion.methods.base import FitInfo, Fitted, Inputs, Method, Outputs
from fusedist.fusion.methods.registry import head_builder, register, register_fitted, register_head
from fusedist.fusion.training import ViewsBag, ViewsTile, predict_bags, predict_tiles

if TYPE_CHECKING:
    from fusedist.fusion.tasks import Targets


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


# ------------------------------------------------------------------------ trained heads

@register_head("abmil")
def _abmil(kw: dict) -> nn.Module:
    # Specs written before the released-code switches: biased attention, torch init.
    return ViewsBag(GatedABMIL(kw["dim"], kw["out"], hidden=kw["hidden"], dropout=kw["dropout"],
                               attention_bias=kw.get("attention_bias", True),
                               init=kw.get("init", "torch")))


@register_head("tile_mlp")
def _tile_mlp(kw: dict) -> nn.Module:
    return ViewsTile(TileMLP(kw["dim"], kw["out"]))


def build_head(arch: str, kw: dict) -> nn.Module:
    """The modules a ``HeadFitted`` wraps, from their JSON description (the builder its
    family registered with ``register_head``: ``abmil``, ``tile_mlp`` here, ``meta_mil``,
    ``meta_tile`` in ``methods.meta``)."""
    return head_builder(arch)(kw)


@register_fitted
class HeadFitted(Fitted):
    """One trained head over bags (one slide per call) or tiles (batches): the experts,
    concat and the Meta-Encoder strategies."""

    kind = "head"

    def __init__(self, targets: Targets, model: nn.Module, arch: str, kw: dict,
                 encoders: list[str], view: str, tile: bool, info: FitInfo | None = None
                 ) -> None:
        super().__init__(targets, info)
        self.model, self.arch, self.kw = model, arch, kw
        self.encoders_, self.view, self.tile = list(encoders), view, tile

    def encoders(self) -> list[str]:
        return self.encoders_

    def raw(self, x: Inputs, device=None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        device = device or torch.device("cpu")
        if self.tile:
            xs = [x.tiles[e] for e in self.encoders_]
            return predict_tiles(self.model, xs, x.idx, device), {}
        src = x.bags if self.view == "bags" else x.aligned
        return predict_bags(self.model, [src[e] for e in self.encoders_], x.idx, device,
                            x.attention_for)

    def predict(self, x, device=None):
        raw, attn = self.raw(x, device)
        return Outputs(self.targets.predict(raw), raw=raw, attention=attn)

    def state_dict(self):
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def spec(self):
        return {"kind": self.kind, "arch": self.arch, "kw": self.kw,
                "encoders": self.encoders_, "view": self.view, "tile": self.tile}

    @classmethod
    def from_spec(cls, spec, state, targets):
        model = build_head(spec["arch"], spec["kw"])
        model.load_state_dict(state)
        model.eval()
        return cls(targets, model, spec["arch"], spec["kw"], spec["encoders"], spec["view"],
                   spec["tile"])


@register
class Expert(Method):
    key = "experts"
    order = 0
    heatmaps = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.encoder = name[len("expert."):]

    @classmethod
    def expand(cls, cfg, c):
        return [cls(f"expert.{e}") for e in sorted(c.encoders)]

    def label(self, task):
        return f"expert {self.encoder}"

    def fit(self, ctx):
        return ctx.expert(self.encoder)
