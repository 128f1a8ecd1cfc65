"""Fusion of several pathology FMs (methods.md §2–5) and the ``fusedist fuse`` stage.

Methods (model code, no training loops):
- ``heads``: expert heads trained on one frozen FM each (gated ABMIL, tile MLP).
- ``logitprod``: LogitProd gate over the experts' out-of-fold logits (+ survival variant).
- ``meta_encoder``: Meta-Encoder feature fusion strategies (+ per-tile MIL / tile heads).
- ``fusecpath``: FuseCPath sub-bags, RRT-MIL student, collaborative distillation.
- ``cluster``: multi-view clustering of a slide's tiles for FuseCPath (imports faiss lazily).

The stage:
- ``config``: ``FuseConfig`` and its sections; ``data``: the checked cohort and the folds;
  ``train``: the head training loops; ``fold``: every method on one outer fold (a Ray task);
  ``evaluate``: metrics, tables, plots, MLflow; ``run``: ``run_fuse``.
- ``metrics`` and ``report``: metrics, the comparison table and the plots.
- ``synthetic``: a feature-level cohort whose encoders see different cues (tests, benchmark).

Kept import-light: importing the package imports no submodule; import the one you need.
"""
