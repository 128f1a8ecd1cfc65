"""XMAG objective (methods.md §1): negative cosine between student heads and teacher tiles.

    L = gw * negcos(global_head(CLS), mean_j teacher_tiles[:, j])
      + lw * negcos(local_head(block_j), teacher_tiles[:, j])      (mean over all B x 16 pairs)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# Cosine of bf16 activations against fp16 cached features: compute in fp32, or the 1536-d
# dot products lose the small differences the loss is trying to close.
_EPS = 1e-8


def _cos(a: Tensor, b: Tensor) -> Tensor:
    if a.shape != b.shape:
        raise ValueError(f"cosine needs equal shapes, got {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=_EPS)


def negcos(a: Tensor, b: Tensor) -> Tensor:
    """``-mean`` cosine similarity over the last dim (all leading dims averaged)."""
    return -_cos(a, b).mean()


def xmag_loss(student_global: Tensor, student_local: Tensor, teacher_tiles: Tensor,
              global_weight: float = 1.0, local_weight: float = 0.5) -> Tensor:
    """Scalar XMAG loss.

    student_global (B, Dt), student_local (B, T, Dt), teacher_tiles (B, T, Dt) with T = 16.
    """
    if teacher_tiles.ndim != 3:
        raise ValueError(f"teacher_tiles must be (B, T, D), got {tuple(teacher_tiles.shape)}")
    target_global = teacher_tiles.float().mean(dim=1)
    return (global_weight * negcos(student_global, target_global)
            + local_weight * negcos(student_local, teacher_tiles))


class XmagObjective(nn.Module):
    """``forward(student_out, teacher_tiles)`` -> ``{"loss", "global_cos", "local_cos"}``.

    ``loss`` carries the gradient; the cosines are detached positive means for logging.
    """

    def __init__(self, global_weight: float = 1.0, local_weight: float = 0.5) -> None:
        super().__init__()
        self.global_weight = float(global_weight)
        self.local_weight = float(local_weight)

    def forward(self, out: dict[str, Tensor], teacher_tiles: Tensor) -> dict[str, Tensor]:
        g = -negcos(out["global"], teacher_tiles.float().mean(dim=1))
        loc = -negcos(out["local"], teacher_tiles)
        # Same arithmetic as xmag_loss (one pass, the cosines reused for logging).
        loss = -(self.global_weight * g + self.local_weight * loc)
        return {"loss": loss, "global_cos": g.detach(), "local_cos": loc.detach()}

    def extra_repr(self) -> str:
        return f"global_weight={self.global_weight}, local_weight={self.local_weight}"


__all__ = ["negcos", "xmag_loss", "XmagObjective"]

