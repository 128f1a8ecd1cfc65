"""``fidelity: default | released``: one key that selects every released-code behaviour.

fusedist follows the authors' released code by default, except where the released behaviour
is a bug or loses information; those corrections are switchable keys (docs/methods.md,
"divergences"). ``fidelity: released`` in the fuse or the distill config sets every such key
to the released behaviour at once, for reproducing the papers' numbers; ``default`` sets
nothing and leaves each key at its own default.

Precedence: a key written in the YAML or given with ``--set`` wins over the preset, and the
preset wins over the key's default. The preset is applied when the config is built (from a
file, overrides or keyword fields) or ``fidelity`` is assigned; the resolved values are what
the config holds, dumps and digests, so a run's ``config.yaml`` shows every switch as it ran
(and loading that dump again gives the same config).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

Fidelity = Literal["default", "released"]

# The released behaviour of every switch; dotted paths into the config.
FUSE_RELEASED: dict[str, Any] = {
    # Expert ABMIL (methods.md §2 experts): bias-free attention, Xavier-normal init, warm
    # restarts, the best validation checkpoint. (Also fusedist's defaults.)
    "experts.attention_bias": False,
    "experts.init": "xavier_normal",
    "experts.schedule": "warm_restarts",
    "experts.select_best": True,
    # LogitProd gate (classification): in-fold gate data, no expert fallback, drop_last,
    # patience 100, probabilities clamped before logs.
    "logitprod.gate_data": "in_fold",
    "logitprod.expert_fallback": False,
    "logitprod.drop_last": True,
    "logitprod.patience": 100,
    "logitprod.logs": "clamped",
    # LogitProd gate (survival).
    "logitprod.survival.penalty": "mean_weight",
    "logitprod.survival.weight_decay": 1e-3,
    "logitprod.survival.min_lr": 1e-7,
    "logitprod.survival.stop_on": "c_index",
    "logitprod.survival.patience": 100,
    "logitprod.survival.gradients": False,
    # FuseCPath (methods.md §4).
    "fusecpath.clustering": "spectral",
    "fusecpath.subbag_rule": "released",
    "fusecpath.topk_ties": "keep",
}

DISTILL_RELEASED: dict[str, Any] = {
    "ema_update": "before_step",
    "optim.schedule": "paper",
    # Colour jitter on uint8 PIL images (torchvision's ColorJitter), not on float tensors.
    "augment.backend": "pil",
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "fuse": {"default": {}, "released": FUSE_RELEASED},
    "distill": {"default": {}, "released": DISTILL_RELEASED},
}


def _tree(preset: dict[str, Any]) -> dict[str, Any]:
    """Dotted paths -> nested sections."""
    out: dict[str, Any] = {}
    for path, value in preset.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _fill(node: Any, tree: dict[str, Any]) -> Any:
    """``node`` (a mapping or a built section) with the keys of ``tree`` it does not set."""
    if isinstance(node, BaseModel):
        # A built section: what it set explicitly, filled, validated again (so assigning
        # ``fidelity`` on a built config fills its sections too, still as models).
        return type(node).model_validate(_fill(node.model_dump(exclude_unset=True), tree))
    if not isinstance(node, dict):  # a bad value: leave it to validation
        return node
    out = dict(node)
    for key, sub in tree.items():
        if isinstance(sub, dict):
            out[key] = _fill(out.get(key, {}), sub)
        else:
            out.setdefault(key, sub)
    return out


def apply_preset(data: Any, stage: str) -> Any:
    """Fill the keys of ``data['fidelity']``'s preset that ``data`` does not set.

    ``data`` is the raw input of a config model (a mapping); anything else, and an unknown
    preset name (which the ``fidelity`` field then rejects with the choices), pass through."""
    if not isinstance(data, dict):
        return data
    preset = PRESETS[stage].get(data.get("fidelity", "default"))
    return _fill(data, _tree(preset)) if preset else data


def resolved(cfg: BaseModel, stage: str) -> dict[str, Any]:
    """The value ``cfg`` holds for every switch of the presets (path -> value)."""
    out = {}
    for path in PRESETS[stage]["released"]:
        node: Any = cfg
        for p in path.split("."):
            node = getattr(node, p)
        out[path] = node
    return out


__all__ = ["DISTILL_RELEASED", "FUSE_RELEASED", "Fidelity", "PRESETS", "apply_preset",
           "resolved"]
