"""Fusion of several pathology FMs (methods.md §2–5).

- ``heads``: expert heads trained on one frozen FM each (gated ABMIL, tile MLP).
- ``logitprod``: LogitProd gate over the experts' out-of-fold logits (+ survival variant).
- ``meta_encoder``: Meta-Encoder feature fusion strategies.
- ``fusecpath``: FuseCPath sub-bags, RRT-MIL student, collaborative distillation.
- ``cluster``: multi-view clustering of a slide's tiles for FuseCPath (imports faiss lazily).

Kept import-light: importing the package imports no submodule; import the one you need.
"""
