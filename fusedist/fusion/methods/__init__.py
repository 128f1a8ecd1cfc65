"""Fusion methods as registered objects, one module per family.

- ``registry``: names -> method families (import-light: the config validates names with it);
- ``base``: ``Method`` (``fit(FoldContext) -> Fitted``), ``Fitted`` (``predict(inputs)``,
  ``state_dict()``, ``spec()``; ``load_fitted`` rebuilds one), ``FoldContext``, ``Inputs``;
- ``experts``: one head per encoder; ``baselines``: best single expert, mean ensemble;
  ``logitprod``; ``meta``: concatenated features and the Meta-Encoder strategies;
  ``fusecpath``.

A new method is one module with a ``@register``-ed ``Method`` subclass (and, if it saves
something other than heads, a ``@register_fitted`` ``Fitted``); nothing else changes.
"""
