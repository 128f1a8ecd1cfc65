"""The MLflow registry operations of ``fusedist retrain``, in one place.

Register the challenger as a new version *without* an alias, find the version an alias points
at (and download its model folder), find the newest version (or one by tag), move the alias.
Models are fusedist's MLflow pyfunc models (:mod:`fusedist.mlmodels`): a fused model version is
logged on the retrain run by :func:`fusedist.fusion.pyfunc.log_fused_model` (its artifact
``model`` is the folder ``fusedist fuse`` writes); a student version is what ``distill``'s
export registers (artifact ``export``). Lookups and alias moves go through ``MlflowClient`` on
the tracking server's registry (or ``MLFLOW_REGISTRY_URI``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusedist import mlmodels, storage
from fusedist.tracking import (MlflowConfig, TrackingError, check_reachable, mask_text,
                               resolve_tracking_uri)

log = logging.getLogger("fusedist.retrain")

FUSED_ARTIFACT = "model"  # fusedist.fusion.pyfunc.ARTIFACT
STUDENT_ARTIFACT = "export"  # fusedist.formats.export_card.ARTIFACT


@dataclass(frozen=True)
class Version:
    """One registered model version, as retrain needs it."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _version(mv: Any) -> Version:
    return Version(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}),
                   tuple(getattr(mv, "aliases", ()) or ()))


def _missing(e: Exception) -> bool:
    code = getattr(e, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


class Registry:
    """The registry of one tracking store."""

    def __init__(self, cfg: MlflowConfig):
        from mlflow import MlflowClient

        if not cfg.enabled:
            raise TrackingError("retrain needs the MLflow registry (it finds the champion by "
                                "alias and registers the challenger): set mlflow.enabled=true")
        self.tracking_uri, source = resolve_tracking_uri(cfg)
        if self.tracking_uri.startswith(("http://", "https://")):
            check_reachable(self.tracking_uri, source)
        self.client = MlflowClient(tracking_uri=self.tracking_uri,
                                   registry_uri=os.environ.get("MLFLOW_REGISTRY_URI")
                                   or self.tracking_uri)

    # ------------------------------------------------------------------ reading
    def by_alias(self, name: str, alias: str) -> Version | None:
        """The version ``alias`` points at; None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return _version(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as e:
            if _missing(e):
                return None
            raise

    def _newest(self, name: str, condition: str = "") -> Version | None:
        """The newest version of ``name`` matching ``condition``; None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name = '{name}'{condition}",
                                                      max_results=1,
                                                      order_by=["version_number DESC"])
        except MlflowException as e:
            if _missing(e):
                return None
            raise
        return _version(found[0]) if found else None

    def latest(self, name: str) -> Version | None:
        """The newest version of ``name`` (alias or not); None when it has none."""
        return self._newest(name)

    def get(self, name: str, version: str) -> Version:
        return _version(self.client.get_model_version(name, version))

    def find(self, name: str, tag: str, value: str) -> Version | None:
        """The newest version of ``name`` whose tag ``tag`` is ``value`` (a resumed run's)."""
        return self._newest(name, f" and tag.`{tag}` = '{value}'")

    def download(self, v: Version, dest: str, artifact: str) -> str:
        """The model folder of ``v`` (its pyfunc artifact ``artifact``: ``model`` for a fused
        model, ``export`` for a student) copied to ``dest`` (folder or s3://)."""
        # MLflow draws a progress bar per download unless told not to.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with tempfile.TemporaryDirectory(prefix="fusedist-registry-") as tmp:
            local, _ = mlmodels.download(v.uri, tmp, self.tracking_uri, artifact=artifact)
            files = [p for p in sorted(Path(local).rglob("*")) if p.is_file()]
            if not files:
                raise TrackingError(f"{v.uri} ({mask_text(v.source)}) has no files; register "
                                    "the model again")
            for p in files:
                storage.upload_file(p, storage.join(dest, p.relative_to(local).as_posix()))
        return dest

    # ------------------------------------------------------------------ writing
    def register_fused(self, tracker: Any, folder: str, name: str, alias: str | None = None,
                       tags: dict[str, str] | None = None) -> Version:
        """Log the fused model ``folder`` (local or s3://) as a pyfunc model of ``tracker``'s
        run and register it as a new version of ``name``, with ``alias`` (None: none; the
        promotion moves one separately)."""
        # lazy: the fused model's pyfunc imports mlflow and torch, only to register
        from fusedist.fusion.pyfunc import log_fused_model

        if not getattr(tracker, "active", False):
            raise TrackingError("registering a model needs an active MLflow run")
        out = log_fused_model(tracker, folder, name, alias)
        v = self.get(name, str(out["version"]))
        if tags:
            self.set_tags(v, tags)
            v = self.get(name, v.version)
        return v

    def set_tags(self, v: Version, tags: dict[str, Any]) -> None:
        for k, val in tags.items():
            self.client.set_model_version_tag(v.name, v.version, k, str(val))

    def promote(self, v: Version, alias: str) -> None:
        """Move ``alias`` to ``v`` (the champion is now ``v``)."""
        self.client.set_registered_model_alias(v.name, alias, v.version)
        log.info("alias %s of %s -> version %s", alias, v.name, v.version)
