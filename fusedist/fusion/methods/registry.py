"""Which fusion methods exist, by the name ``FuseConfig.methods`` uses.

Import-light on purpose (no torch): the config validates names here. Built-in families are
imported on first use; ``register`` adds one from anywhere (a plugin, a test file).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import Cohort
    from fusedist.fusion.methods.base import Fitted, Method

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

_METHODS: dict[str, type[Method]] = {}
_FITTED: dict[str, type[Fitted]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a ``Method`` family selectable as ``methods: [<cls.key>]``."""
    _METHODS[cls.key] = cls
    return cls


def register_fitted(cls: type[Fitted]) -> type[Fitted]:
    """Class decorator: let ``load_fitted`` rebuild a saved ``Fitted`` of ``cls.kind``."""
    _FITTED[cls.kind] = cls
    return cls


def names() -> list[str]:
    """Every selectable method name (built-in and registered)."""
    return [n for n in BUILTIN if n != "experts"] + [n for n in _METHODS if n not in BUILTIN]


def get(name: str) -> type[Method]:
    if name not in _METHODS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _METHODS:
        raise KeyError(f"unknown fusion method {name!r}; known: {names()}")
    return _METHODS[name]


def fitted_kind(kind: str) -> type[Fitted]:
    if kind not in _FITTED:
        for mod in set(BUILTIN.values()):
            importlib.import_module(mod)
    if kind not in _FITTED:
        raise KeyError(f"no Fitted of kind {kind!r} is registered (known: {sorted(_FITTED)})")
    return _FITTED[kind]


def select_methods(cfg: FuseConfig, c: Cohort) -> tuple[list[Method], dict[str, str]]:
    """The rows to run, in table order (the experts, then ``cfg.methods`` that apply to the
    task), and {method: why it is skipped} for the others."""
    families, skipped = [get("experts")], {}
    for name in dict.fromkeys(cfg.methods):
        fam = get(name)
        if cfg.task in fam.tasks:
            families.append(fam)
        else:
            skipped[name] = f"not defined for {cfg.task} (methods.md)"
    rows = [m for fam in families for m in fam.expand(cfg, c)]
    return sorted(rows, key=lambda m: (m.order, m.name)), skipped


def prepare_methods(methods: list[Method], c: Cohort, cfg: FuseConfig, progress: bool
                    ) -> tuple[dict[str, object], dict[str, str]]:
    """Each family's once-per-cohort work (``Method.prepare``): (key -> result, notes)."""
    prepared, notes = {}, {}
    for m in methods:
        if m.key in prepared:
            continue
        obj, n = type(m).prepare(c, cfg, progress)
        prepared[m.key] = obj
        notes.update(n)
    return prepared, notes
