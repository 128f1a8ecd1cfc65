"""Fusion of several pathology FMs (methods.md §2–5) and the ``fusedist fuse`` stage.

It reads one way: config -> cohort and tasks -> methods -> fold -> evaluate / report -> run.

- ``config``: ``FuseConfig`` and its sections.
- ``cohort``: the ``Cohort`` every fold reads; ``data``: loading and checking it, the folds;
  ``units``: slide or patient units; ``store``: bags packed on disk past memory.
- ``tasks``: the four tasks as objects (targets, per-fold prep, loss, columns, metrics,
  strata, plots); ``survival``: NLL-survival, risk, c-index; ``metrics``: per-task scores
  and fold summaries; ``logs``: LogitProd's log modes (exact or as released).
- ``methods/``: one module per method family, each with its nn modules, its training loop
  and its ``Method`` / ``Fitted`` (``experts``, ``baselines``, ``logitprod``, ``meta``,
  ``fusecpath``), on the protocol (``methods.base``) and the registry (``methods.registry``).
- ``training``: what the methods' training shares (seeds, device, the heads' bag and tile
  loops).
- ``fold``: the fold engine: which methods run, ``FoldContext`` (the fold's targets, seeds,
  experts trained once, inner CV) and the loop over the methods on one outer fold.
- ``evaluate``: metrics and tables; ``report``: files, plots, Markdown, MLflow.
- ``model``: the fused model (refit, safetensors + card, load); ``predict``: ``fusedist
  predict``; ``run``: ``run_fuse``.
- ``synthetic``: a feature-level cohort whose encoders see different cues (tests, benchmark).

Kept import-light: importing the package imports no submodule; import the one you need.
"""
