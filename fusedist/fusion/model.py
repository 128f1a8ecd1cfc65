"""The fused model: after cross-validation, the methods of ``final.methods`` are refitted on
every labelled sample with the fold's recipe and saved as ``<output>/model/``:

    card.json               task, targets (classes / time bins / normalisation), encoders
                            (name, dim, weights digest, mpp, tile size), each component's
                            spec and file digest, the CV metrics, the fusedist version, the
                            refit (epochs the folds chose, the spread of its training-slide
                            predictions and which components are ``flat``)
    <method>.safetensors    one per component (tensors only; rebuilt from the card's spec)

``load_model`` rebuilds it; ``FusedModel.unit_inputs`` turns a new slide's (or patient's)
bags into the components' ``Inputs`` and ``FusedModel.predict(inputs)`` gives each component's
outputs; ``FusedModel.predict_unit`` does both for one unit (a patient's slides pooled in
slide-id order); ``prediction_columns`` are the columns of ``predictions.csv`` and of the
pyfunc's table. ``fusedist predict`` and the pyfunc model (:mod:`fusedist.fusion.pyfunc`)
share them, so a slide or a patient gets the same numbers from either.
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
from fusedist.formats.bags import Bag, fusedist_version
from fusedist.config import ConfigError
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import Cohort, align_picks, restrict_training
from fusedist.fusion.fold import fold_context
from fusedist.fusion.methods.base import Fitted, Inputs, Method, Outputs, load_fitted
from fusedist.fusion.tasks import (ClassTargets, RegressionTargets, SurvivalTargets, Targets,
                                   targets_from_card)
from fusedist.fusion.units import Pooled, pool_bags

CARD = "card.json"


def final_methods(cfg: FuseConfig, methods: list[Method], best: str) -> list[Method]:
    """The rows to refit: ``final.methods``, or the CV's best plus LogitProd when it ran."""
    names = cfg.final.methods
    if names is None:
        names = [best] + (["logitprod"] if any(m.name == "logitprod" for m in methods) else [])
    by_name = {m.name: m for m in methods}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"final.methods: {unknown} did not run in this fuse (ran: "
                          f"{sorted(by_name)}); pick from those")
    return [by_name[n] for n in dict.fromkeys(n for n in names if n)]


def _refit_context(c: Cohort, cfg: FuseConfig, prepared: dict,
                   epochs: dict[str, int] | None = None):
    """A fold context whose training samples are every labelled one and whose test is none."""
    everything = np.arange(c.num_samples)
    return fold_context(c, cfg, restrict_training(c, cfg, everything), everything[:0], -1,
                        prepared, epochs)


def refit(c: Cohort, cfg: FuseConfig, rows: list[Method], prepared: dict,
          epochs: dict[str, int] | None = None) -> dict[str, Fitted]:
    """Fit ``rows`` on every sample with the fold's recipe. ``epochs`` (head name -> epochs,
    ``fold.refit_epochs`` of the folds' choices) replaces the validation split of
    ``select_best`` heads: those train that many epochs on every sample."""
    # lazy: training imports torch; fuse's driver imports this module without it
    from fusedist.fusion.training import eager_optim

    with eager_optim():
        ctx = _refit_context(c, cfg, prepared, epochs)
        return {m.name: m.fit(ctx) for m in rows}


def spread_checks(c: Cohort, cfg: FuseConfig, fitted: dict[str, Fitted],
                  prepared: dict) -> dict[str, dict]:
    """Component -> ``{"spread", "flat", "reason"}``: how much its predictions vary over the
    slides it was refitted on (``final.min_spread``). A refit that gives every training slide
    about the same output learnt nothing it can apply to a new slide, whatever the folds
    scored."""
    ctx = _refit_context(c, cfg, prepared)
    x = ctx.inputs(ctx.train)
    out = {}
    for name, f in fitted.items():
        pred = np.asarray(f.predict(x, ctx.device).pred, np.float64)
        ok = np.isfinite(pred).all(axis=tuple(range(1, pred.ndim)))
        pred, t = pred[ok], f.targets
        if isinstance(t, SurvivalTargets):  # risk = -sum_t S(t): on [-T, 0]
            spread, what = float(pred.std() / t.num_outputs), "std of risk / time bins"
        elif isinstance(t, RegressionTargets):
            spread = float(np.mean(pred.std(0) / np.asarray(t.std, np.float64)))
            what = "std of the predictions / the targets' std"
        else:
            spread, what = float(pred.std(0).mean()), "std of the class probabilities"
        reason = None
        if spread < cfg.final.min_spread:
            reason = (f"{what} over its {len(pred)} training samples is {spread:.4f} < "
                      f"final.min_spread {cfg.final.min_spread:g}")
        elif isinstance(t, ClassTargets) and cfg.final.min_spread > 0 and len(pred):
            labels = np.unique(np.asarray(t.y)[ctx.train[ok]])
            called = np.unique(pred.argmax(1))
            if len(called) == 1 and len(labels) > 1:
                reason = (f"it predicts class {t.classes[int(called[0])]} for all "
                          f"{len(pred)} of its training samples ({len(labels)} classes)")
        out[name] = {"spread": spread, "flat": reason is not None, "reason": reason}
    return out


def flat_reason(card: dict) -> str | None:
    """Why the card's refit is flat (``<component>: <reason>; ...``), or None when no
    component is (or the card predates the check)."""
    refit = card.get("refit") or {}
    flat = refit.get("flat") or []
    return "; ".join(f"{m}: {refit['checks'][m]['reason']}" for m in flat) or None


# Fields of a FuseConfig that say where and how a run executes, not what the model learns;
# the card's recipe leaves them out (and the data paths, which the card's reader supplies).
_NOT_RECIPE = {"bags", "labels", "slides", "output", "thumbnails", "heatmaps", "overwrite",
               "ray", "storage", "mlflow", "device", "fold_cpus", "fold_gpus", "train_slides",
               "executor"}


def recipe_of(cfg: FuseConfig) -> dict:
    """The training recipe of ``cfg`` as plain data (``FuseConfig.model_validate`` takes it
    back once ``bags``/``labels`` are given)."""
    return cfg.model_dump(mode="json", exclude=_NOT_RECIPE)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model(url: str, c: Cohort, cfg: FuseConfig, fitted: dict[str, Fitted],
                cv: dict[str, dict[str, list[float]]], refit_info: dict | None = None) -> str:
    """Save ``fitted`` to ``url`` (folder or s3://): one safetensors per component, and the
    card. ``refit_info``: the card's ``refit`` (``epochs`` the folds chose, ``checks`` of
    :func:`spread_checks`, ``flat`` components). Returns ``url``."""
    from safetensors.torch import save_file

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
            "format": "fusedist-fused-model/1", "fusedist_version": fusedist_version(),
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
        if refit_info is not None:
            card["refit"] = refit_info
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

    def slide_inputs(self, bags: dict[str, Bag], slide_id: str, urls: dict[str, str]
                     ) -> Inputs:
        """One slide's ``Inputs``: each encoder's bag, the feature group aligned on shared
        tiles, tile matrices (tile tasks), and what each component prepares for a slide
        (``Fitted.prepare_unit``: FuseCPath's sub-bag plan). ``urls``: where each bag came
        from, for the messages."""
        return self.unit_inputs([bags], slide_id, [urls])[0]

    def unit_inputs(self, per_slide: list[dict[str, Bag]], unit_id: str,
                    urls: list[dict[str, str]]) -> tuple[Inputs, Pooled]:
        """One unit's ``Inputs`` (a slide, or a patient: its slides' bags pooled as ``fuse``
        pools them, :func:`fusedist.fusion.units.pool_bags`) and the pooled bags. A bag the
        model cannot take is a :class:`SlideError`."""
        card = self.card
        for bags, where in zip(per_slide, urls):
            for e, b in bags.items():
                dim = (card["encoders"].get(e) or {}).get("dim")
                if dim and b.dim != dim:
                    raise SlideError(f"{where[e]}: {b.dim}-d features, the model's {e!r} takes "
                                     f"{dim}; this folder holds another encoder's bags")
        group = [e for e in card["feature_group"] if e in per_slide[0]]
        pooled = pool_bags(per_slide, group, align_picks)
        bags = pooled.bags
        aligned: dict[str, list[np.ndarray]] = {}
        if group:
            if len(pooled.aligned_coords) == 0:
                raise SlideError(f"{unit_id}: encoders {group} share no tile coordinates")
            aligned = {e: [(bags[e].features if p is None else bags[e].features[p])
                           .astype(np.float32)] for e, p in zip(group, pooled.picks)}
        tile = card["task"] == "tile_classification"
        tiles = {e: aligned[e][0] for e in group} if tile else None
        n = len(next(iter(tiles.values()))) if tile else 1
        x = Inputs(idx=np.arange(n), bags={e: [b.features.astype(np.float32)]
                                           for e, b in bags.items()},
                   aligned=aligned, tiles=tiles, attention_for=() if tile else (0,))
        for f in self.components.values():
            x = f.prepare_unit(x, unit_id, card)
        return x, pooled

    def predict_unit(self, per_slide: dict[str, dict[str, Bag]], unit_id: str,
                     urls: dict[str, dict[str, str]], device=None, patient: bool = False
                     ) -> "UnitPrediction":
        """Every component's prediction for one unit: a slide, or (``patient``) a patient
        whose slides (``per_slide``: slide -> encoder -> Bag) are pooled in slide-id order,
        as ``fuse`` pools them. ``fusedist predict`` and the pyfunc model both call this, so
        a patient gets the same numbers from either."""
        order = sorted(per_slide) if patient else list(per_slide)
        x, pooled = self.unit_inputs([per_slide[s] for s in order], unit_id,
                                     [urls[s] for s in order])
        tile = self.card["task"] == "tile_classification"
        methods = {}
        for name, o in self.predict(x, device).items():
            pred = np.asarray(o.pred.mean(0) if tile else o.pred[0], np.float64)
            weights = None if o.weights is None else np.asarray(o.weights, np.float64).mean(0)
            methods[name] = (pred, weights)
        return UnitPrediction(order, methods, x, pooled)


@dataclass
class UnitPrediction:
    """One unit's predictions: its slides (pooling order), component -> (prediction,
    LogitProd's mean per-expert weights or None), and the inputs and pooled bags (for the
    attention heatmaps)."""

    slides: list[str]
    methods: dict[str, tuple[np.ndarray, np.ndarray | None]]
    inputs: Inputs
    pooled: Pooled


class SlideError(Exception):
    """One slide (or patient) cannot be predicted; the message says why and how to fix it."""


# ------------------------------------------------------------------- prediction table

def task_columns(card: dict) -> list[str]:
    """The task's prediction columns: ``risk`` (survival), ``pred_<target>`` (regression),
    else ``prob_<class>`` and ``predicted``."""
    t = card["targets"]
    if card["task"] == "survival":
        return ["risk"]
    if card["task"] == "regression":
        return [f"pred_{n}" for n in t["targets"]]
    return [f"prob_{k}" for k in t["classes"]] + ["predicted"]


def weight_experts(card: dict) -> list[str]:
    """LogitProd's experts (its ``weight_<encoder>`` columns), in its order; none without
    LogitProd."""
    lp = [c for c in card["components"].values() if c["spec"]["kind"] == "logitprod"]
    return list(lp[0]["spec"]["experts"]) if lp else []


def is_patient_model(card: dict) -> bool:
    """Whether the model was fused with ``unit: patient`` (it predicts patients)."""
    return card.get("unit") == "patient"


def prediction_columns(card: dict) -> list[str]:
    """(a patient model) ``patient_id``, then ``slide_id`` (a patient's slides joined by
    ``;``), ``method``, the task's columns, LogitProd's weights: one row per slide (or
    patient) per method, in ``predictions.csv`` and the pyfunc model's output."""
    return ((["patient_id"] if is_patient_model(card) else []) + ["slide_id", "method"]
            + task_columns(card) + [f"weight_{e}" for e in weight_experts(card)])


def model_files(url: str) -> dict[str, bytes]:
    """The files of the model folder at ``url`` (``card.json`` and each component's
    safetensors), read as they are: what is logged to MLflow and digested."""
    card_text = storage.read_text(storage.join(url, CARD))
    files = {CARD: card_text.encode()}
    for comp in json.loads(card_text)["components"].values():
        files[comp["file"]] = storage.read_bytes(storage.join(url, comp["file"]))
    return files


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
