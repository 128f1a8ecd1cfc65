"""The fused model: after cross-validation, the methods of ``final.methods`` are refitted on
every labelled sample with the fold's recipe and saved as ``<output>/model/``:

    card.json               task, targets (classes / time bins / normalisation), encoders
                            (name, dim, weights digest, mpp, tile size), each component's
                            spec and file digest, the CV metrics, the fusedist version
    <method>.safetensors    one per component (tensors only; rebuilt from the card's spec)

``load_model`` rebuilds it; ``FusedModel.predict(inputs)`` gives each component's outputs.
``fuse`` also logs the folder as an ``mlflow.pyfunc`` model (:mod:`fusedist.fusion.pyfunc`)
and, with ``final.registered_model``, registers it under ``final.alias``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusedist import storage
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import Cohort
from fusedist.fusion.methods.base import Fitted, Inputs, Method, Outputs, load_fitted
from fusedist.fusion.tasks import Targets, targets_from_card

CARD = "card.json"


def final_methods(cfg: FuseConfig, methods: list[Method], best: str) -> list[Method]:
    """The rows to refit: ``final.methods``, or the CV's best plus LogitProd when it ran."""
    names = cfg.final.methods
    if names is None:
        names = [best] + (["logitprod"] if any(m.name == "logitprod" for m in methods) else [])
    by_name = {m.name: m for m in methods}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        from fusedist.config import ConfigError

        raise ConfigError(f"final.methods: {unknown} did not run in this fuse (ran: "
                          f"{sorted(by_name)}); pick from those")
    return [by_name[n] for n in dict.fromkeys(n for n in names if n)]


def refit(c: Cohort, cfg: FuseConfig, rows: list[Method], prepared: dict) -> dict[str, Fitted]:
    """Fit ``rows`` on every sample, exactly as a fold fits them on its training folds."""
    from fusedist.fusion.fold import fold_context

    from fusedist.fusion.data import restrict_training

    everything = np.arange(c.num_samples)
    ctx = fold_context(c, cfg, restrict_training(c, cfg, everything), everything[:0], -1,
                       prepared)
    return {m.name: m.fit(ctx) for m in rows}


# Fields of a FuseConfig that say where and how a run executes, not what the model learns;
# the card's recipe leaves them out (and the data paths, which the card's reader supplies).
_NOT_RECIPE = {"bags", "labels", "slides", "output", "thumbnails", "heatmaps", "overwrite",
               "ray", "storage", "mlflow", "device", "fold_cpus", "fold_gpus", "train_slides"}


def recipe_of(cfg: FuseConfig) -> dict:
    """The training recipe of ``cfg`` as plain data (``FuseConfig.model_validate`` takes it
    back once ``bags``/``labels`` are given)."""
    return cfg.model_dump(mode="json", exclude=_NOT_RECIPE)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model(url: str, c: Cohort, cfg: FuseConfig, fitted: dict[str, Fitted],
                cv: dict[str, dict[str, list[float]]]) -> str:
    """Save ``fitted`` to ``url`` (folder or s3://): one safetensors per component, and the
    card. Returns ``url``."""
    from safetensors.torch import save_file

    from fusedist.bags import _version
    from fusedist.fusion.data import restrict_training

    targets = next(iter(fitted.values())).targets
    trained = restrict_training(c, cfg, np.arange(c.num_samples))
    keep = None if cfg.train_slides is None else set(cfg.train_slides)
    slides = [s for s in c.slide_ids if keep is None or s in keep]
    units = trained.tolist()  # patient units are samples (no tile task pools patients)
    if c.unit == "patient":
        slides = [s for i in units for s in c.unit_slides(i)]
    n_samples = len(trained)
    used = sorted({e for f in fitted.values() for e in f.encoders()})
    components = {}
    with tempfile.TemporaryDirectory(prefix="fusedist-model-") as tmp:
        out = Path(tmp)
        for name, f in fitted.items():
            path = out / f"{name}.safetensors"
            save_file({k: v.contiguous() for k, v in f.state_dict().items()}, str(path))
            components[name] = {"file": path.name, "sha256": _sha256(path), "spec": f.spec()}
        card = {
            "format": "fusedist-fused-model/1", "fusedist_version": _version(),
            "task": c.task, "unit": c.unit, "targets": targets.card(),
            "methods": list(fitted),
            "encoders": {e: c.encoder_info.get(e, {}) for e in used},
            "feature_group": c.feature_group, "components": components,
            "fusecpath": cfg.fusecpath.model_dump() if any(
                f.spec()["kind"] == "fusecpath" for f in fitted.values()) else None,
            "seed": cfg.seed, "cv_metrics": {m: cv[m] for m in fitted if m in cv},
            "trained_on": {"slides": len(slides), "samples": n_samples,
                           **({"patients": len(units)} if c.unit == "patient" else {})},
            # What `fusedist retrain` needs to score this model's recipe against a challenger
            # on the same folds: the slides it was fitted on and the recipe that fitted it.
            "trained_slides": slides, "recipe": recipe_of(cfg)}
        (out / CARD).write_text(json.dumps(card, indent=2, sort_keys=True, default=float))
        for p in sorted(out.iterdir()):
            storage.upload_file(p, storage.join(url, p.name))
    return url


@dataclass
class FusedModel:
    """A loaded fused model: the card and each component."""

    card: dict
    targets: Targets
    components: dict[str, Fitted]

    def predict(self, x: Inputs, device=None) -> dict[str, Outputs]:
        return {name: f.predict(x, device) for name, f in self.components.items()}


def load_model(url: str) -> FusedModel:
    """Rebuild a model written by ``write_model``; a component file whose digest differs
    from the card's is refused."""
    from safetensors.torch import load

    card = json.loads(storage.read_text(storage.join(url, CARD)))
    targets = targets_from_card(card["task"], card["targets"])
    comps = {}
    for name, comp in card["components"].items():
        data = storage.read_bytes(storage.join(url, comp["file"]))
        got = hashlib.sha256(data).hexdigest()
        if got != comp["sha256"]:
            raise ValueError(f"{storage.join(url, comp['file'])}: sha256 {got} but the card "
                             f"says {comp['sha256']}; the model folder is damaged, re-run "
                             "`fusedist fuse` to write it again")
        comps[name] = load_fitted(comp["spec"], load(data), targets)
    return FusedModel(card, targets, comps)
