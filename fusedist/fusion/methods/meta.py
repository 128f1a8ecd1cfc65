"""Feature-level fusion over the encoders that share tiles: the concatenated-feature head
(``concat``) and the Meta-Encoder strategies (methods.md §3, ``meta.<strategy>``), fused per
tile before a gated-ABMIL head (or the tile MLP for tile tasks)."""

from __future__ import annotations

from fusedist.fusion.methods.base import FoldContext, Method, Skipped
from fusedist.fusion.methods.registry import register


class _FeatureFusion(Method):
    strategy: str

    def fit(self, ctx: FoldContext):
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
class MetaEncoder(_FeatureFusion):
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
