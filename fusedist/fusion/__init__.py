"""Fusion of several pathology FMs (methods.md §2–5) and the ``fusedist fuse`` stage.

Methods (model code, no training loops):
- ``heads``: expert heads trained on one frozen FM each (gated ABMIL, tile MLP).
- ``logitprod``: LogitProd gate over the experts' out-of-fold logits (+ survival variant).
- ``meta_encoder``: Meta-Encoder feature fusion strategies (+ per-tile MIL / tile heads).
- ``fusecpath``: FuseCPath sub-bags, RRT-MIL student, collaborative distillation.
- ``cluster``: multi-view clustering of a slide's tiles for FuseCPath (imports faiss lazily).

The stage:
- ``config``: ``FuseConfig`` and its sections; ``data``: the checked cohort and the folds;
  ``tasks``: the four tasks as objects (targets, per-fold prep, loss, columns, metrics,
  strata, plots); ``survival``: NLL-survival, risk, c-index;
  ``methods/``: the registered methods (``fit(FoldContext) -> Fitted``);
  ``train``: the head training loops; ``fold``: the loop over methods on one outer fold (a
  Ray task); ``evaluate``: metrics and tables; ``report``: files, plots, Markdown, MLflow;
  ``model``: the fused model (refit, safetensors + card, load); ``predict``: ``fusedist
  predict``; ``run``: ``run_fuse``.
- ``metrics``: per-task scores and fold summaries.
- ``synthetic``: a feature-level cohort whose encoders see different cues (tests, benchmark).

Kept import-light: importing the package imports no submodule; import the one you need.
"""
