"""Learning-rate schedules as plain functions of the optimiser step (no torch state to save).

Kinds (methods.md §1):
- ``cosine`` (default): linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay
  reaching ``min_lr`` at ``step == total_steps``.
- ``paper``: the released XMAG config sets warm-up epochs == total epochs, i.e. a linear ramp
  from 0 to ``base_lr`` over the whole run (``warmup_steps`` is ignored).
- ``constant``: linear warm-up (if any), then ``base_lr``.
"""

from __future__ import annotations

import math

KINDS: tuple[str, ...] = ("cosine", "paper", "constant")


def _warmup(step: int, warmup_steps: int, base_lr: float) -> float:
    # (step + 1): the first update already moves, instead of one wasted step at lr 0.
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int,
          kind: str = "cosine", min_lr: float = 0.0) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of a ``total_steps`` run."""
    if kind not in KINDS:
        raise ValueError(f"unknown lr schedule '{kind}'; choose one of {', '.join(KINDS)}")
    if total_steps <= 0 or warmup_steps < 0 or step < 0:
        raise ValueError(f"need total_steps > 0, warmup_steps >= 0, step >= 0; got "
                         f"total_steps={total_steps}, warmup_steps={warmup_steps}, step={step}")
    if kind == "paper":
        return _warmup(step, total_steps, base_lr)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, base_lr)
    if kind == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
