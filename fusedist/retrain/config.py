"""Config of ``fusedist retrain`` (``configs/retrain/*.yaml``): the scheduled retraining job.

A recipe names the slide source, the stages that turn new slides into bags (each one the
stage's own config: ``tile``, ``cache``, ``embed``, keyed by a label so ``--set`` reaches
them), the fused model's recipe (``fuse``), optionally the XMAG student (``student``), where
the champion lives in the MLflow registry and when a challenger replaces it (``promotion``).

``ray``, ``storage`` and ``mlflow`` given at the top apply to every stage that does not set
its own; ``slides`` is every tile stage's ``input``, ``labels`` the fuse stage's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fusedist.config import RayConfig, StorageConfig, StrictModel
from fusedist.distill.config import DistillConfig
from fusedist.features.config import CacheConfig, EmbedConfig
from fusedist.fusion.config import FuseConfig
from fusedist.tiling.config import TileConfig
from fusedist.tracking import MlflowConfig

SHARED = ("ray", "storage", "mlflow")


class RegistrySection(StrictModel):
    """Where the fused champion lives in the MLflow registry."""

    fused_model: str = Field(min_length=1)
    """Registered-model name of the fused model (a new version per retrain run)."""

    alias: str = Field("champion", min_length=1)
    """The alias that marks the champion; promotion moves it (MLflow 3: aliases, not stages).
    ``latest`` is MLflow's own name for the newest version and cannot be used."""

    bootstrap: str | None = None
    """A fused model folder (``<fuse output>/model``) registered as the first champion when
    the registry has none, e.g. the demo's; ``null``: the first retrain run's challenger is
    promoted (there is nothing to compare it with)."""

    @model_validator(mode="after")
    def _alias(self) -> "RegistrySection":
        if self.alias.lower() == "latest":
            raise ValueError("registry.alias: 'latest' is MLflow's reserved name for the newest "
                             "version; use e.g. champion")
        return self


class PromotionConfig(StrictModel):
    """When the challenger replaces the champion."""

    metric: str | None = None
    """Cross-validated metric compared (mean over folds, higher is better: ``auc``,
    ``balanced_accuracy``, ``macro_f1``, ``c_index``, ``pearson``); default: the task's
    primary metric."""

    method: str | None = None
    """Result row compared (e.g. ``logitprod``), in both runs; default: each model's first
    component (the challenger's ``fuse.final.methods[0]``, else its CV best, which is chosen
    on these same folds and so flatters it a little; the champion's card ``methods[0]``)."""

    min_delta: float = Field(0.0, ge=0)
    """Promote only if challenger - champion >= this (and > 0: a tie keeps the champion)."""

    student_min_delta: float | None = None
    """With ``student.retrain``: also require the new student's validation CKA to beat the
    champion student's by at least this (may be negative to allow a small loss); ``null``:
    the student is judged by the downstream fused metric alone."""


class StudentSection(StrictModel):
    """The XMAG student: which one is the champion, how its bags are made, and (optionally)
    how a challenger is distilled."""

    registered_model: str = "xmag-student"
    """MLflow registered model of the student (``distill``'s ``export.registered_model``)."""

    alias: str = "champion"
    """Alias of the champion student."""

    embed: EmbedConfig
    """How the student's bags are made (``slides`` at the student's 5x, or ``tiles``), into
    ``output``; ``encoders`` is filled in by retrain (the champion's, the challenger's)."""

    retrain: bool = False
    """Distil a challenger student each run (``distill``) and judge it with the fused model."""

    warm_start: Literal["champion", "base"] = "champion"
    """Where the challenger starts: the champion student's weights, or ``distill.student``'s
    own (``base``: e.g. the DINOv2 weights)."""

    distill: DistillConfig | None = None
    """The distillation recipe (needed with ``retrain``); its ``run_name`` gets the retrain
    run id appended, and the export is registered without an alias (promotion moves it)."""

    validation_pairs: int = Field(256, gt=0)
    """Most pairs that score the two students (linear CKA to the teacher on the validation
    slides held out of both distillations: ``distill.validation``; docs/retrain.md)."""

    @model_validator(mode="after")
    def _needs_distill(self) -> "StudentSection":
        if self.retrain and self.distill is None:
            raise ValueError("student.retrain needs student.distill (the distillation recipe, "
                             "as in configs/distill/*.yaml)")
        return self


class RetrainConfig(StrictModel):
    """Ingest new slides, refit, evaluate the challenger against the champion, promote if
    better (``fusedist retrain``)."""

    slides: str | None = None
    """The slide source: a folder (local or ``s3://``), or a slide table (``slide_id``,
    ``path``, ...; docs/formats.md) that grows with the cohort, read every run (needed with
    ``tile``; a recipe without tile stages works on bags that appear by other means)."""

    labels: str
    """Labels CSV of the cohort, read fresh every run: keyed by ``slide_id``, or by
    ``patient_id`` (a clinical table; then ``fuse.slides`` must be the slide table that joins
    patients to slides, and samples, folds and both models' scores are per patient)."""

    output: str
    """Where retrain runs go: ``<output>/runs/<run_id>/`` (challenger, champion, promotion)."""

    tile: dict[str, TileConfig] = {}
    """Tile datasets to extend with new slides (``input`` = ``slides``), e.g. ``pairs`` and
    ``grid``; each must match the dataset's recorded config (else the tile stage refuses)."""

    cache: dict[str, CacheConfig] = {}
    """Teacher feature caches to extend (new shards only)."""

    embed: dict[str, EmbedConfig] = {}
    """Bag stages to extend (new slides only)."""

    student: StudentSection | None = None
    """The XMAG student whose bags the fused model reads; ``null``: none."""

    fuse: FuseConfig
    """The challenger's recipe (``labels`` = ``labels``; ``output`` is set per run)."""

    registry: RegistrySection
    """The fused model's registered name and champion alias."""

    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    """The promotion rule."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Where Ray runs (every stage's default)."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """S3 endpoint and retries (every stage's default)."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """Tracking and the registry (every stage's default)."""

    @model_validator(mode="before")
    @classmethod
    def _fill_stages(cls, data: Any) -> Any:
        """Give each stage section what the recipe says once: shared sections, the slides,
        the labels and a placeholder output (the run sets the real one)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("tile") and not data.get("slides"):
            raise ValueError("tile stages need `slides` (the slide source they tile)")
        shared = {k: data[k] for k in SHARED if k in data}

        def fill(section: Any, keys: tuple[str, ...] = SHARED, **extra: Any) -> Any:
            if not isinstance(section, dict):
                return section
            return {**{k: v for k, v in shared.items() if k in keys}, **extra, **section}

        for key, keys, extra in (("tile", ("ray", "storage"), {"input": data.get("slides")}),
                                 ("cache", SHARED, {}), ("embed", SHARED, {})):
            if isinstance(data.get(key), dict):
                data[key] = {name: fill(sec, keys, **extra) for name, sec in data[key].items()}
        if isinstance(data.get("fuse"), dict):
            data["fuse"] = fill(data["fuse"], SHARED, labels=data.get("labels"),
                                output=data.get("output"))
        st = data.get("student")
        if isinstance(st, dict):
            st = dict(st)
            st["embed"] = fill(st.get("embed", {}), SHARED, encoders=[])
            if isinstance(st.get("distill"), dict):
                st["distill"] = fill(st["distill"])
            data["student"] = st
        return data

    @model_validator(mode="after")
    def _check(self) -> "RetrainConfig":
        if self.fuse.train_slides is not None:
            raise ValueError("fuse.train_slides: retrain trains the challenger on every "
                             "labelled slide and sets train_slides for the champion itself; "
                             "leave it unset")
        if self.fuse.final.registered_model:
            raise ValueError("fuse.final.registered_model: retrain registers the challenger "
                             "itself (as registry.fused_model, without the alias until it is "
                             "promoted); leave it unset")
        if self.fuse.task == "tile_classification":
            raise ValueError("fuse.task: retrain compares slide-level models; "
                             "tile_classification is not supported")
        return self
