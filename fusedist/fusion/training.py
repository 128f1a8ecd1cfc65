"""What the fusion methods' training shares: stable seeds, the device, parameter counts, a
stratified hold-out split, and the generic head loops the experts, concat and the
Meta-Encoder train with: bags (one slide per step, as CLAM/ABMIL train) and tiles
(mini-batches). A method with a loop of its own (the LogitProd gate, FuseCPath's sub-bags)
keeps it in its module under ``fusion/methods/``.

What a task changes (the loss, the targets, how outputs become predictions) lives in the
fold's ``tasks.Targets``; the loops never look at the task name.
"""

from __future__ import annotations

import copy
import importlib
import sys
import time
import types
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from fusedist.fusion.tasks import Targets


def seed_for(*parts: object) -> int:
    """A stable 31-bit seed from (run seed, fold, method, ...): every model and shuffle is
    reproducible no matter which Ray worker runs the fold, or in which order."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def holdout_split(n: int, strat: np.ndarray, val_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, validation) of an ``n``-sample set, stratified by ``strat`` when
    every stratum allows it; both sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed,
                                  stratify=strat)
    except ValueError:  # a stratum with a single member
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed)
    return np.sort(tr), np.sort(va)


class _EagerDynamo(types.ModuleType):
    """A stand-in for ``torch._dynamo`` with the two calls eager ``torch.optim`` makes on it:
    ``graph_break()`` (in every ``step``) and ``disable(fn)`` (``add_param_group``,
    ``zero_grad``, ``state_dict``...: the first call of each imports ``torch._dynamo`` to wrap
    the method). Outside a compiled frame both are no-ops, and nothing is compiled while
    :func:`eager_optim` holds: the same steps, the same numbers. Anything else asked of it
    (another torch's optimiser, a method that compiles) steps aside for the real module,
    which is imported then and answers: slower, never wrong."""

    def __init__(self) -> None:
        super().__init__("torch._dynamo")
        self.disabled: list = []

    def graph_break(self) -> None:
        pass

    def disable(self, fn=None, recursive: bool = True, *, wrapping: bool = True):
        if fn is None:
            return self.disable
        self.disabled.append(fn)  # torch caches the result on fn: dropped on exit
        return fn

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self.retire()
        return getattr(importlib.import_module("torch._dynamo"), name)

    def retire(self) -> None:
        """Out of ``sys.modules`` and ``torch``: the next import finds the real module."""
        if sys.modules.get("torch._dynamo") is self:
            del sys.modules["torch._dynamo"]
        if vars(torch).get("_dynamo") is self:
            delattr(torch, "_dynamo")


@contextmanager
def eager_optim() -> Iterator[None]:
    """Train with ``torch.optim`` without importing ``torch._dynamo``. Its first optimiser
    imports it (torch 2.x: ``add_param_group`` and ``step`` are wrapped for
    ``torch.compile``), and that import costs more than a small cohort's folds take to train
    (1-1.4 s of a 2-core machine; issue 27). The fold heads are never compiled, so a
    stand-in with the two no-ops eager code calls (:class:`_EagerDynamo`) sits in
    ``sys.modules`` while the block runs, and is taken out after it, with what torch cached
    from it. A process that has ``torch._dynamo`` already (a local fold worker, Ray) uses it."""
    if "torch._dynamo" in sys.modules:
        yield
        return
    stub = _EagerDynamo()
    sys.modules["torch._dynamo"] = stub
    try:
        yield
    finally:
        stub.retire()
        for fn in stub.disabled:  # torch._compile caches disable(fn) as fn.__dynamo_disable
            if getattr(fn, "__dynamo_disable", None) is fn:
                delattr(fn, "__dynamo_disable")


def _aux(model: nn.Module, like: Tensor) -> Tensor:
    fn = getattr(model, "aux_loss", None)
    return fn().to(like.device) if fn is not None else like.new_zeros(())


def _start(model: nn.Module, lr: float, weight_decay: float, seed: int,
           device: torch.device) -> tuple[np.random.Generator, torch.optim.Optimizer]:
    """Seed, move to ``device``, train mode, Adam: the preamble of every head's loop."""
    torch.manual_seed(seed)
    model.to(device).train()
    return (np.random.default_rng(seed),
            torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay))


def _step(model: nn.Module, opt: torch.optim.Optimizer, task: Targets, out: Tensor,
          idx: np.ndarray, device: torch.device) -> None:
    """One optimiser step on the task loss of samples ``idx`` plus the model's aux loss."""
    loss = task.loss(out, task.targets(idx, device))
    loss = loss + _aux(model, loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# The expert heads' warm restarts (methods.md §2's schedule): T0 = 10 epochs, x2, to 1e-6.
EXPERT_T0, EXPERT_T_MULT, EXPERT_MIN_LR = 10, 2, 1e-6


def expert_scheduler(opt: torch.optim.Optimizer, schedule: str
                     ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``warm_restarts`` (released experts): cosine warm restarts stepped once per epoch;
    ``constant``: none."""
    if schedule == "constant":
        return None
    if schedule == "warm_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=EXPERT_T0, T_mult=EXPERT_T_MULT, eta_min=EXPERT_MIN_LR)
    raise ValueError(f"schedule must be 'constant' or 'warm_restarts', got {schedule!r}")


def train_bags(model: nn.Module, views: Sequence[Sequence[np.ndarray]], idx: np.ndarray,
               task: Targets, epochs: int, lr: float, weight_decay: float,
               max_tiles: int | None, seed: int, device: torch.device,
               schedule: str = "constant", val: np.ndarray | None = None
               ) -> tuple[float, int]:
    """Adam, one slide per step; a bag above ``max_tiles`` is subsampled afresh each epoch.
    ``views[v][slide]`` are the per-view features; the model takes the list of views.
    ``schedule``: see ``expert_scheduler``. ``val``: slides scored (task loss, every tile)
    after each epoch; the best epoch's weights are restored (the first on ties). Returns
    (wall time in seconds, epochs the kept weights trained: the best epoch's number with
    ``val``, else ``epochs``)."""
    t0 = time.perf_counter()
    gen, opt = _start(model, lr, weight_decay, seed, device)
    sched = expert_scheduler(opt, schedule)
    best: tuple[float, dict | None] = (float("inf"), None)
    kept = epochs
    for epoch in range(epochs):
        for i in gen.permutation(idx):
            n = views[0][i].shape[0]
            rows = np.sort(gen.choice(n, max_tiles, replace=False)) if max_tiles and \
                n > max_tiles else slice(None)
            # A copy: arrays from Ray's object store are read-only.
            xs = [torch.tensor(v[i][rows], device=device) for v in views]
            _step(model, opt, task, model(xs)["logits"], np.array([i]), device)
        if sched is not None:
            sched.step()
        if val is not None and len(val):
            out, _ = predict_bags(model, views, val, device)
            with torch.no_grad():
                v = float(task.loss(torch.as_tensor(out, device=device),
                                    task.targets(val, device)))
            if best[1] is None or v < best[0]:
                best, kept = (v, copy.deepcopy(model.state_dict())), epoch + 1
            model.train()
    if best[1] is not None:
        model.load_state_dict(best[1])
    return time.perf_counter() - t0, kept


@torch.no_grad()
def predict_bags(model: nn.Module, views: Sequence[Sequence[np.ndarray]], idx: np.ndarray,
                 device: torch.device, attention_for: Sequence[int] = ()
                 ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Raw outputs (len(idx), out) on every tile, and the attention of the slides in
    ``attention_for`` (slide index -> (N,))."""
    model.to(device).eval()
    outs, attn = [], {}
    for i in idx:
        r = model([torch.tensor(v[i], device=device) for v in views])
        outs.append(r["logits"].float().cpu().numpy()[0])
        if i in attention_for:
            attn[int(i)] = r["attention"].float().cpu().numpy()[0]
    return np.stack(outs), attn


def train_tiles(model: nn.Module, xs: Sequence[np.ndarray], idx: np.ndarray, task: Targets,
                epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int,
                device: torch.device) -> float:
    """Adam on tile features (one (S, d_v) array per view); returns seconds."""
    t0 = time.perf_counter()
    gen, opt = _start(model, lr, weight_decay, seed, device)
    for _ in range(epochs):
        order = gen.permutation(idx)
        for s in range(0, len(order), batch_size):
            b = np.sort(order[s:s + batch_size])
            out = model([torch.as_tensor(x[b], device=device) for x in xs])
            _step(model, opt, task, out, b, device)
    return time.perf_counter() - t0


@torch.no_grad()
def predict_tiles(model: nn.Module, xs: Sequence[np.ndarray], idx: np.ndarray,
                  device: torch.device, batch_size: int = 4096) -> np.ndarray:
    model.to(device).eval()
    outs = [model([torch.as_tensor(x[idx[s:s + batch_size]], device=device) for x in xs])
            .float().cpu().numpy() for s in range(0, len(idx), batch_size)]
    return np.concatenate(outs)


class ViewsTile(nn.Module):
    """Adapts a one-view tile head (TileMLP) to the list-of-views calling convention."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        return self.head(xs[0])


class ViewsBag(nn.Module):
    """Adapts a one-view bag head (GatedABMIL) to the list-of-views calling convention."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, xs: Sequence[Tensor]) -> dict[str, Tensor]:
        return self.head(xs[0])
