"""Which fusion methods exist, by the name ``FuseConfig.methods`` uses.

A leaf (it imports no fusedist module and no torch): the config validates names here.
Built-in families are imported on first use; ``register`` adds one from anywhere (a plugin,
a test file). Head architectures (``register_head``) are looked up the same way, so a saved
head of any family rebuilds without its loader importing every family. Which methods a fold
runs (``select_methods``) and their once-per-cohort work (``prepare_methods``) are the fold
engine's, in ``fusion/fold.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# name in `methods` -> module that registers it. "experts" always runs.
BUILTIN: dict[str, str] = {
    "experts": "fusedist.fusion.methods.experts",
    "best_expert": "fusedist.fusion.methods.baselines",
    "mean_ensemble": "fusedist.fusion.methods.baselines",
    "concat": "fusedist.fusion.methods.meta",
    "logitprod": "fusedist.fusion.methods.logitprod",
    "meta": "fusedist.fusion.methods.meta",
    "fusecpath": "fusedist.fusion.methods.fusecpath",
}
DEFAULT = ("best_expert", "mean_ensemble", "concat", "logitprod", "meta", "fusecpath")

_METHODS: dict[str, type] = {}
"""key -> ``Method`` subclass."""
_FITTED: dict[str, type] = {}
"""kind -> ``Fitted`` subclass."""
_HEADS: dict[str, Callable] = {}
"""head architecture -> ``build(kw) -> nn.Module``."""


def load_builtins() -> None:
    """Import every built-in family (each registers what it defines)."""
    for mod in dict.fromkeys(BUILTIN.values()):
        importlib.import_module(mod)


def register(cls: type) -> type:
    """Class decorator: make a ``Method`` family selectable as ``methods: [<cls.key>]``."""
    _METHODS[cls.key] = cls
    return cls


def register_fitted(cls: type) -> type:
    """Class decorator: let ``load_fitted`` rebuild a saved ``Fitted`` of ``cls.kind``."""
    _FITTED[cls.kind] = cls
    return cls


def register_head(arch: str) -> Callable[[Callable], Callable]:
    """Decorator: ``build(kw) -> nn.Module`` rebuilds a head of architecture ``arch`` from
    its JSON description (what ``HeadFitted.spec`` records)."""
    def deco(build: Callable) -> Callable:
        _HEADS[arch] = build
        return build
    return deco


def head_builder(arch: str) -> Callable:
    if arch not in _HEADS:
        load_builtins()
    if arch not in _HEADS:
        raise KeyError(f"unknown head architecture {arch!r}")
    return _HEADS[arch]


def names() -> list[str]:
    """Every selectable method name (built-in and registered)."""
    return [n for n in BUILTIN if n != "experts"] + [n for n in _METHODS if n not in BUILTIN]


def get(name: str) -> type:
    if name not in _METHODS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _METHODS:
        raise KeyError(f"unknown fusion method {name!r}; known: {names()}")
    return _METHODS[name]


def fitted_kind(kind: str) -> type:
    if kind not in _FITTED:
        load_builtins()
    if kind not in _FITTED:
        raise KeyError(f"no Fitted of kind {kind!r} is registered (known: {sorted(_FITTED)})")
    return _FITTED[kind]
