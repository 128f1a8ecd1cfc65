"""Challenger vs champion on the same cohort and the same folds, and the promotion rule.

Both fused models are scored by cross-validation on the *current* labelled cohort with one
fold assignment (the recipe's ``folds`` and ``seed``, ``fusion.data.make_folds``). In each fold
the challenger's recipe trains on the fold's training slides; the champion's recipe (from its
card) trains on those of them that the champion was trained on (``FuseConfig.train_slides``);
both predict the same held-out fold. The question answered is "do the new slides (and the new
recipe, and the new student) make a better model", and no test slide is ever trained on.

With ``unit: patient`` (labels keyed by ``patient_id``, ``fuse.slides`` the slide table) the
samples and folds are patients: both runs read today's slide table, and the champion's
recipe trains on the fold's training patients that have a slide among its trained slides
(``fusion.data.restrict_training``), pooling each such patient's slides of today.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.metrics import METRICS
from fusedist.fusion.model import recipe_of
from fusedist.retrain.config import PromotionConfig


def families(components: list[str]) -> tuple[list[str], list[str]]:
    """(``methods`` families, Meta-Encoder strategies) that produce these result rows."""
    fams: list[str] = []
    strategies: list[str] = []
    for name in components:
        head, _, rest = name.partition(".")
        if head == "expert":
            continue  # the experts always run
        if head == "meta":
            strategies.append(rest)
            head = "meta"
        if head not in fams:
            fams.append(head)
    return fams, strategies


def champion_config(card: dict, base: FuseConfig, output: str, rows: list[str]) -> FuseConfig:
    """The champion's recipe (its card's, else ``base``'s), on today's bags and labels and
    the challenger's folds (and slide table), trained only on the champion's slides, without
    a refit."""
    if not card.get("trained_slides"):
        raise ConfigError("the champion's card.json lists no trained_slides (it was written by "
                          "an older fusedist); re-run `fusedist fuse` to write it again, or "
                          "run `fusedist retrain --force-promote` once to replace it")
    recipe = dict(card.get("recipe") or recipe_of(base))
    fams, strategies = families(rows)
    data = {**recipe,
            "bags": base.bags, "labels": base.labels, "slides": base.slides, "output": output,
            "encoders": sorted(card["encoders"]), "methods": fams,
            "meta": {**recipe.get("meta", {}), **({"strategies": strategies} if strategies
                                                  else {})},
            "final": {"enabled": False},
            # The same folds as the challenger: same count and seed on the same cohort.
            "folds": base.folds, "seed": base.seed,
            "train_slides": list(card["trained_slides"]),
            "thumbnails": None, "heatmaps": 0, "overwrite": base.overwrite,
            "device": base.device, "fold_cpus": base.fold_cpus, "fold_gpus": base.fold_gpus,
            "ray": base.ray.model_dump(), "storage": base.storage.model_dump(),
            "mlflow": base.mlflow.model_dump()}
    try:
        return FuseConfig.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"the champion's recorded recipe no longer validates ({e}); "
                          "run `fusedist retrain --force-promote` once to replace it") from None


def read_folds(output: str) -> dict[str, int]:
    rows = csv.DictReader(io.StringIO(storage.read_text(storage.join(output, "folds.csv"))))
    return {r["slide_id"]: int(r["fold"]) for r in rows}


def check_same_folds(challenger: str, champion: str) -> None:
    a, b = read_folds(challenger), read_folds(champion)
    if a != b:
        only = sorted(set(a) ^ set(b))[:5]
        raise ConfigError(
            "challenger and champion were not scored on the same folds"
            + (f" (slides in one cohort only, e.g. {only}: a bag is missing for one of the "
               "champion's encoders)" if only else "")
            + "; embed the champion's encoders for every labelled slide")


@dataclass
class Score:
    """One model's cross-validated score on the shared folds."""

    method: str
    metric: str
    folds: list[float]
    version: str | None = None
    trained_slides: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        vals = [v for v in self.folds if math.isfinite(v)]
        return float(np.mean(vals)) if len(vals) == len(self.folds) and vals else float("nan")

    def to_dict(self) -> dict:
        return {"method": self.method, "metric": self.metric, "mean": self.mean,
                "folds": self.folds, "version": self.version,
                "trained_slides": self.trained_slides, **self.extra}


def score_of(res, method: str, metric: str) -> Score:
    if method not in res.fold_metrics:
        raise ConfigError(f"promotion.method: {method!r} did not run in {res.output} (ran: "
                          f"{sorted(res.fold_metrics)}); pick one of those")
    return Score(method, metric, [float(m.get(metric, float("nan")))
                                  for m in res.fold_metrics[method]])


def check_metric(metric: str, task: str) -> None:
    if metric not in METRICS[task]:
        raise ConfigError(f"promotion.metric: {metric!r} is not a {task} metric (one of "
                          f"{list(METRICS[task])})")


@dataclass
class Decision:
    promote: bool
    reason: str
    delta: float | None = None


def decide(rule: PromotionConfig, challenger: Score, champion: Score | None,
           force: bool = False, student: dict | None = None,
           flat: str | None = None) -> Decision:
    """The promotion rule: beat the champion by ``min_delta`` (a tie keeps it). A challenger
    whose refit is ``flat`` (why; ``fusion.model.flat_reason``) is never promoted, champion
    or not, unless forced: its folds may score well while the model it registers gives
    every slide about the same answer."""
    if flat and not force:
        return Decision(False, f"the challenger's refit is flat ({flat}): registered, not "
                               "promoted; train longer or with a higher lr (the fuse "
                               "recipe's epochs / lr), or --force-promote")
    if champion is None:
        return Decision(True, "no champion yet: the first model is promoted")
    delta = challenger.mean - champion.mean
    vs = (f"{challenger.metric} {challenger.mean:.4f} ({challenger.method}) vs champion "
          f"{champion.mean:.4f} ({champion.method}), delta {delta:+.4f}")
    if force:
        return Decision(True, f"--force-promote: {vs}", delta)
    if not math.isfinite(delta):
        return Decision(False, f"a score is missing (NaN in some fold): {vs}", delta)
    if delta <= 0 or delta < rule.min_delta:
        return Decision(False, f"challenger does not beat the champion by min_delta "
                               f"{rule.min_delta:g}: {vs}", delta)
    if student is not None and rule.student_min_delta is not None:
        d = student.get("delta")
        if d is None or not math.isfinite(d) or d < rule.student_min_delta:
            return Decision(False, f"{vs}, but the new student's validation CKA changed by "
                                   f"{d} (< student_min_delta {rule.student_min_delta:g})", delta)
    return Decision(True, f"challenger beats the champion: {vs} >= min_delta "
                          f"{rule.min_delta:g}", delta)
