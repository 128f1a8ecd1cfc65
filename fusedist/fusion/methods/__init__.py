"""Fusion methods as registered objects, one module per family, each holding its nn
modules, its training loop and its ``Method`` / ``Fitted`` classes.

- ``registry``: names -> method families, ``Fitted`` kinds, head architectures (a leaf: the
  config validates names with it);
- ``base``: the protocol: ``Method`` (``fit(FoldContext) -> Fitted``), ``Fitted``
  (``predict(inputs)``, ``state_dict()``, ``spec()``; ``load_fitted`` rebuilds one),
  ``Inputs``, ``Outputs``, ``FitInfo``, ``Skipped``;
- ``experts``: one head per encoder (gated ABMIL, tile MLP) and ``HeadFitted``;
  ``baselines``: best single expert, mean ensemble; ``logitprod``: the gate and its loop;
  ``meta``: concatenated features and the Meta-Encoder strategies; ``fusecpath``:
  clustering, sub-bags, the RRT student and its distillation loop.

The fold a method trains in (``FoldContext``) is the fold engine's, ``fusion.fold``. A new
method is one module with a ``@register``-ed ``Method`` subclass (and, if it saves something
other than heads, a ``@register_fitted`` ``Fitted``); nothing else changes.
"""
