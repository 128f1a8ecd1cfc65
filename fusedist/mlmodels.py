"""MLflow models: the models fusedist produces, as ``mlflow.pyfunc`` models in the registry.

A fusedist MLflow model is a pyfunc whose Python class lives in fusedist
(:mod:`fusedist.fusion.pyfunc`, :mod:`fusedist.distill.pyfunc`) and whose one artifact is the
model folder exactly as fusedist writes it (safetensors + ``card.json``). The pickled
``python_model`` is only a reference to that class (cloudpickle pickles importable classes by
name), so loading needs fusedist importable and no code of the run that logged it.

- :func:`log_pyfunc` logs such a model on a stage's run (a :class:`~fusedist.tracking.Tracker`)
  as an MLflow 3 LoggedModel, in the run's experiment.
- :func:`register` makes it a new version of a registered model and moves an alias to it
  (aliases, not stages; ``latest`` is MLflow's own and is never set).
- :func:`publish` does both, idempotently: the version records the digest of the model's
  files (tag ``fusedist.files_sha256``), and a model whose files a version already holds
  reuses that version (nothing logged, nothing registered, the alias left where it is).
- :func:`download` turns ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
  ``models:/<name>/latest`` or ``models:/m-<id>`` back into the local model folder.

The registry is the tracking server's unless ``MLFLOW_REGISTRY_URI`` names another one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from fusedist.tracking import (MlflowConfig, _sqlite_path, check_reachable, mask_text,
                               resolve_tracking_uri)

log = logging.getLogger("fusedist")

SCHEME = "models:/"
LATEST = "latest"  # MLflow's reserved alias: models:/<name>/latest is the newest version
PYFUNC = "python_function"
FILES_DIGEST_TAG = "fusedist.files_sha256"  # version tag: what files the version holds


def is_registry_uri(ref: str) -> bool:
    """``models:/...``: a registered model (or a LoggedModel id) rather than a path."""
    return str(ref).startswith(SCHEME)


def registry_uri(tracking_uri: str) -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri


def default_tracking_uri() -> str:
    """Where ``models:/`` resolves when nothing names a server: ``MLFLOW_TRACKING_URI``, else
    the local store every stage logs to by default (``./mlruns/mlflow.db``)."""
    return resolve_tracking_uri(MlflowConfig())[0]


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block, then restore it.

    ``Model.log`` and the ``mlflow-artifacts:`` repository read the global URI, not a client's.
    ``mlflow.set_tracking_uri`` also writes (and on reset deletes) ``MLFLOW_TRACKING_URI``, so
    that variable is restored by hand: a user's own setting must survive."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = tracking_utils._tracking_uri  # None unless someone called set_tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def pip_requirements() -> list[str]:
    """What a pyfunc of fusedist needs, pinned to this environment. Given explicitly: MLflow's
    inference would load the model in a subprocess at every log (seconds), and could not find
    fusedist on an index anyway (install it from its repository)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("fusedist", "mlflow", "torch", "numpy", "pandas", "safetensors", "timm"):
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


class _DropAdvice(logging.Filter):
    """MLflow's advice that does not apply here: the pickle holds only a reference to a
    fusedist class (the state is the artifact), and the signature is given, so an input
    example (a bag, a batch of tiles) would add megabytes and a model load to every log."""

    ADVICE = ("Passing a Python object as `python_model`", "An input example was not provided")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.ADVICE)


@contextlib.contextmanager
def _quiet_model_log() -> Iterator[None]:
    import warnings

    logger, drop = logging.getLogger("mlflow.pyfunc"), _DropAdvice()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            yield
    finally:
        logger.removeFilter(drop)


def log_pyfunc(tracker: Any, name: str, python_model: Any, artifacts: dict[str, str],
               signature: Any, metadata: dict[str, Any] | None = None,
               tags: dict[str, str] | None = None) -> Any:
    """Log ``python_model`` + ``artifacts`` as a pyfunc LoggedModel of ``tracker``'s run (in
    its experiment, listed among the run's outputs). Returns MLflow's ``ModelInfo``; ``None``
    for an inactive tracker (rank != 0, tracking disabled)."""
    if not getattr(tracker, "active", False):
        return None
    import mlflow
    from mlflow.models import Model

    client = tracker._client
    exp = client.get_run(tracker.run_id).info.experiment_id
    with using_tracking_uri(tracker.tracking_uri):
        # The LoggedModel is made here, with the run's experiment: left to itself, Model.log
        # would file it under the fluent "current" experiment (Default), not this run's.
        lm = client.create_logged_model(experiment_id=exp, name=name,
                                        source_run_id=tracker.run_id, tags=tags)
        with _quiet_model_log():
            info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc,
                             run_id=tracker.run_id, model_id=lm.model_id,
                             python_model=python_model, artifacts=artifacts,
                             signature=signature, metadata=metadata,
                             pip_requirements=pip_requirements())
    log.info("logged MLflow model %s (%s) on run %s", info.model_uri, name, tracker.run_id)
    return info


def digest_files(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 of a model's files: each relative path (sorted) and its bytes, length-prefixed
    so that no two different folders hash alike."""
    h = hashlib.sha256()
    for rel, data in sorted(files):
        for part in (rel.encode(), data):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return h.hexdigest()


def files_digest(folder: str | Path) -> str:
    """:func:`digest_files` of every file under a local ``folder``."""
    root = Path(folder)
    return digest_files((p.relative_to(root).as_posix(), p.read_bytes())
                        for p in root.rglob("*") if p.is_file())


def _registry_client(tracker: Any) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.tracking_uri,
                        registry_uri=registry_uri(tracker.tracking_uri))


def _sets_alias(alias: str | None) -> bool:
    return bool(alias) and alias.lower() != LATEST


def version_with_files(tracker: Any, model_name: str, digest: str) -> Any | None:
    """The newest version of ``model_name`` tagged with files digest ``digest``, or None."""
    found = _registry_client(tracker).search_model_versions(
        f"name = '{model_name}' and tag.`{FILES_DIGEST_TAG}` = '{digest}'", max_results=1,
        order_by=["version_number DESC"])
    return found[0] if found else None


@dataclass(frozen=True)
class Published:
    """Where :func:`publish` left a model."""

    model_uri: str
    """The LoggedModel (``models:/m-<id>``): logged now, or the reused version's source."""
    model_id: str | None
    version: str | None
    """The registered version; ``None`` when not registered."""
    reused: bool
    """An existing version already held these files: nothing was logged or registered."""
    aliased: bool = False
    """The alias asked for points at ``version`` (not so for a reused version whose alias
    was moved to another one since)."""


def publish(tracker: Any, folder: str | Path, log_model: Callable[[], Any],
            model_name: str | None, alias: str | None, tags: dict[str, str] | None = None,
            description: str | None = None) -> Published | None:
    """Log the model in the local ``folder`` (``log_model()`` returns MLflow's ``ModelInfo``)
    and register it as a version of ``model_name`` with ``alias``; ``model_name=None`` only
    logs it. A re-run that changes nothing registers nothing: when a version of
    ``model_name`` already holds exactly these files (its :data:`FILES_DIGEST_TAG`), that
    version is returned, and ``alias`` is set on it only if the model has no such alias yet
    (an alias someone moved since, e.g. a retrain's promotion, stays where it is).
    ``None`` for an inactive tracker."""
    if not getattr(tracker, "active", False):
        return None
    digest = files_digest(folder)
    if model_name and (mv := version_with_files(tracker, model_name, digest)) is not None:
        client = _registry_client(tracker)
        aliased = False
        if _sets_alias(alias):
            aliases = client.get_registered_model(model_name).aliases or {}
            if alias not in aliases:  # e.g. a run that died between registering and aliasing
                client.set_registered_model_alias(model_name, alias, mv.version)
            aliased = str(aliases.get(alias, mv.version)) == str(mv.version)
        log.info("%s version %s already holds these files (sha256 %s...): reused, nothing "
                 "registered", model_name, mv.version, digest[:12])
        return Published(mv.source, getattr(mv, "model_id", None), str(mv.version), True,
                         aliased)
    info = log_model()
    version = None
    if model_name:
        version = register(tracker, info, model_name, alias,
                           tags={**(tags or {}), FILES_DIGEST_TAG: digest},
                           description=description)
    return Published(info.model_uri, info.model_id, version, False,
                     version is not None and _sets_alias(alias))


def register(tracker: Any, model_info: Any, model_name: str, alias: str | None,
             tags: dict[str, str] | None = None, description: str | None = None) -> str:
    """A new version of ``model_name`` (created if new) from a logged model, with ``alias``
    moved to it. ``alias`` ``latest`` (any case) or ``None`` sets none: ``models:/<name>/latest``
    already resolves to the newest version. Returns the version. Stages call :func:`publish`,
    which reuses the version of an unchanged model instead."""
    from mlflow.exceptions import MlflowException

    client = _registry_client(tracker)
    try:
        client.create_registered_model(model_name, description=description)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    with using_tracking_uri(tracker.tracking_uri):
        mv = client.create_model_version(model_name, source=model_info.model_uri,
                                         run_id=tracker.run_id, tags=tags,
                                         description=description,
                                         model_id=model_info.model_id)
    if _sets_alias(alias):
        client.set_registered_model_alias(model_name, alias, mv.version)
    log.info("registered %s version %s%s from run %s", model_name, mv.version,
             f" (alias {alias})" if _sets_alias(alias) else "", tracker.run_id)
    return str(mv.version)


# ------------------------------------------------------------------------------- resolving

@dataclass(frozen=True)
class Resolved:
    """What a ``models:/`` URI named when it was resolved (an alias can move later)."""

    uri: str
    """As given."""
    name: str | None
    """Registered model name; ``None`` for a ``models:/m-<id>`` LoggedModel."""
    version: str | None
    model_uri: str
    """The immutable URI of what was downloaded: ``models:/<name>/<version>`` or
    ``models:/m-<id>``."""



def _error(uri: str, why: str, tracking_uri: str) -> ValueError:
    return ValueError(f"{uri}: {why} in the MLflow registry at {mask_text(tracking_uri)}; "
                      "register one (fuse with final.registered_model, or distill/export with "
                      "export.registered_model), or point MLFLOW_TRACKING_URI (or the stage's "
                      "mlflow.tracking_uri) at the server that has it")


def resolve(uri: str, tracking_uri: str | None = None) -> Resolved:
    """The version a ``models:/`` URI names now: ``<name>@<alias>``, ``<name>/<version>``,
    ``<name>/latest`` (the newest version) or ``m-<id>`` (a LoggedModel, no registry)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException


    body = uri[len(SCHEME):].strip("/")
    if not body:
        raise ValueError(f"{uri}: give models:/<name>@<alias> or models:/<name>/<version>")
    if "@" not in body and "/" not in body:
        if body.startswith("m-"):
            return Resolved(uri, None, None, f"{SCHEME}{body}")
        raise ValueError(f"{uri}: no version or alias; give models:/{body}@<alias> (e.g. "
                         f"@champion) or models:/{body}/<version> (or /latest)")
    tracking_uri = tracking_uri or default_tracking_uri()
    if tracking_uri.startswith(("http://", "https://")):
        check_reachable(tracking_uri)  # seconds, not MLflow's minutes of retries
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.exists():  # MLflow would create an empty store there
        raise _error(uri, f"no MLflow store ({db} does not exist)", tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri(tracking_uri))
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, ver = body.rsplit("/", 1)
            if ver.lower() == LATEST:
                found = client.search_model_versions(f"name = '{name}'", max_results=1,
                                                     order_by=["version_number DESC"])
                if not found:
                    raise _error(uri, f"registered model {name!r} has no versions", tracking_uri)
                mv = found[0]
            elif ver.isdigit():
                mv = client.get_model_version(name, ver)
            else:
                raise ValueError(f"{uri}: version {ver!r} is not a number; use "
                                 f"models:/{name}@{ver} for an alias")
    except MlflowException as e:
        raise _error(uri, f"not found ({e.message.splitlines()[0][:200]})",
                     tracking_uri) from None
    return Resolved(uri, name, str(mv.version), f"{SCHEME}{name}/{mv.version}")


def download(uri: str, dst: str | Path, tracking_uri: str | None = None,
             artifact: str | None = None) -> tuple[Path, Resolved]:
    """Download the model ``uri`` names into ``dst``; returns the folder of its pyfunc
    artifact ``artifact`` (e.g. ``model``), or the MLflow model folder itself when ``None``,
    and what ``uri`` resolved to."""
    import mlflow
    from mlflow.models import Model

    tracking_uri = tracking_uri or default_tracking_uri()
    r = resolve(uri, tracking_uri)
    # The global URI too: MLflow's models:/ repository looks the version up through
    # mlflow.get_registry_uri(), whatever download_artifacts is given.
    with using_tracking_uri(tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=r.model_uri, dst_path=str(dst), tracking_uri=tracking_uri,
            registry_uri=registry_uri(tracking_uri)))
    if artifact is None:
        return local, r
    if not (local / "MLmodel").is_file():
        raise ValueError(f"{uri} ({r.model_uri}) is not an MLflow model (no MLmodel file): "
                         "it was registered from loose files by an older fusedist; "
                         "re-run the stage that registered it")
    arts = Model.load(str(local)).flavors.get(PYFUNC, {}).get("artifacts", {})
    if artifact not in arts:
        raise ValueError(f"{uri} ({r.model_uri}) has no {artifact!r} artifact (it has "
                         f"{sorted(arts)}): it is not the kind of fusedist model expected here")
    return local / arts[artifact]["path"], r
