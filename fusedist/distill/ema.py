"""Exponential moving average of the student (methods.md §1: decay 0.999).

The EMA copy is the model XMAG exports and evaluates. It is kept in fp32 whatever the training
weights are: under DeepSpeed bf16 the module's parameters are bf16, and a bf16 average would
round ``(1 - 0.999) * (new - old)`` away, freezing the EMA after a few steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


EMA_ORDERS = ("after_step", "before_step")

_WRAPPERS = frozenset({"DeepSpeedEngine", "DistributedDataParallel", "DataParallel"})


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DeepSpeed/DDP (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None),
                                                               nn.Module):
            model = model.module
        else:
            return model


def step_with_ema(step: Callable[[], object], ema: EMA, model: nn.Module, boundary: bool,
                  order: str = "after_step") -> None:
    """Run the optimiser ``step`` and, on a gradient-accumulation ``boundary`` (a real
    optimiser step), update ``ema`` from ``model`` after it (``after_step``: the EMA averages
    the weights each step produced) or before it (``before_step``, the released XMAG order:
    the EMA lags one step, and the last step never reaches it)."""
    if order not in EMA_ORDERS:
        raise ValueError(f"EMA update order must be one of {EMA_ORDERS}, got {order!r}")
    if boundary and order == "before_step":
        ema.update(model)
    step()
    if boundary and order == "after_step":
        ema.update(model)


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` at each optimiser step (``step_with_ema``
    says before or after it); buffers copied."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        src = unwrap(model)
        self._module = copy.deepcopy(src)
        for t in self._module.parameters():
            t.requires_grad_(False)
            if t.is_floating_point():
                t.data = t.data.float()
        for b in self._module.buffers():
            if b.is_floating_point():
                b.data = b.data.float()
        self._module.eval()
        self._names = [n for n, _ in self._module.named_parameters()]

    @property
    def module(self) -> nn.Module:
        """The EMA copy: eval mode, no gradients, fp32."""
        return self._module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        names, params = zip(*src.named_parameters()) if self._names else ((), ())
        if list(names) != self._names:
            raise ValueError("EMA.update: the model's parameters differ from the EMA copy's "
                             "(another architecture, or a wrapper that renames them)")
        ema = [p for p in self._module.parameters()]
        new = [p.detach().to(e.device, torch.float32) for p, e in zip(params, ema)]
        if ema:
            # One fused kernel over all tensors: ema += (1 - decay) * (new - ema).
            torch._foreach_lerp_(ema, new, 1.0 - self.decay)
        # Buffers (BatchNorm running stats, counters) are copied, not averaged.
        for e, b in zip(self._module.buffers(), src.buffers()):
            e.copy_(b.detach())
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "module": {k: v.detach().clone() for k, v in self._module.state_dict().items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.decay = float(sd["decay"])
        self.num_updates = int(sd["num_updates"])
        module_sd: dict[str, Tensor] = sd["module"]
        self._module.load_state_dict(module_sd, strict=True)
