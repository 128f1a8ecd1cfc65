"""Experts: one head per frozen encoder (methods.md §2), gated ABMIL over the encoder's own
tiles (the tile MLP for tile tasks). They always run: the logit-level methods combine them."""

from __future__ import annotations

from fusedist.fusion.methods.base import FoldContext, Method
from fusedist.fusion.methods.registry import register


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

    def fit(self, ctx: FoldContext):
        return ctx.expert(self.encoder)
