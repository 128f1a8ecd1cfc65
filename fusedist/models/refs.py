"""Encoder references: a registry name, an export folder (or its ``card.json``, local or
``s3://``), or an MLflow model ``models:/<name>@<alias>`` / ``models:/<name>/<version>``.

One implementation for every stage: :func:`check_encoder_refs` (cheap, before torch loads),
:func:`resolve_ref` / :func:`resolve_encoder` (a reference -> a registry name, registering
exports), :func:`load_encoders` (build each once on the CPU), and the helpers that hand an
MLflow model's export to Ray actors (:func:`shared_export`, :func:`actor_refs`).
The registry itself (which imports torch) is imported only where an encoder is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from fusedist import mlmodels, storage
from fusedist.config import ConfigError
from fusedist.formats import export_card
from fusedist.formats.export_card import ARTIFACT, CARD
from fusedist.models.catalog import BUILTIN
from fusedist.models.spec import EncoderSpec, unknown_encoder_message
from fusedist.tracking import resolve_tracking_uri

log = logging.getLogger("fusedist.models")

# Card keys copied into the registry entry.
_SPEC_KEYS = ("name", "arch", "kwargs", "loader", "dim", "input_size", "mean", "std", "output",
              "precision", "mpp", "description", "license")

_EXPORTED: dict[str, str] = {}  # registry name -> local weights file, registered from a card


# -- cheap checks (no torch) ---------------------------------------------------------------
def known_encoder_names() -> set[str]:
    """Built-in encoder names, plus any registered in this process (without importing torch:
    the registry module is only consulted once something else has imported it)."""
    names = {s.name for s in BUILTIN}
    registry = sys.modules.get("fusedist.models.registry")
    if registry is not None:
        names |= set(registry._REGISTRY)
    return names


def is_export_ref(ref: str) -> bool:
    """A path or URL of an export folder or card (loaded later by :func:`resolve_encoder`)."""
    return (storage.is_s3(ref) or ref.startswith(("file://", mlmodels.SCHEME))
            or ref.endswith(".json") or Path(ref).expanduser().exists())


def check_encoder_refs(refs: Iterable[Any]) -> None:
    """Every encoder reference (an object with ``.name``) is a registered name or an export
    folder/card/``models:/`` URI."""
    names = known_encoder_names()
    for ref in refs:
        if ref.name not in names and not is_export_ref(ref.name):
            raise ConfigError(unknown_encoder_message(ref.name, names))


# -- exports -> registry names -------------------------------------------------------------
def spec_data(card: Mapping[str, Any], weights: Path) -> dict[str, Any]:
    """The registry entry (``register_from_dict`` mapping) an export card describes."""
    data = {k: card[k] for k in _SPEC_KEYS if k in card}
    # Forward compatible: once EncoderSpec has a default local weights field, fill it, so
    # build_encoder(name) needs no weights= argument.
    if "weights" in {f.name for f in dataclasses.fields(EncoderSpec)}:
        data["weights"] = str(weights)
    return data


def register_exported(path_or_url: str) -> str:
    """Register the export at ``path_or_url`` (its folder or card.json, local or s3://) and
    return its encoder name. Idempotent; re-registering a re-exported name replaces it."""
    # lazy: the registry imports torch, which check_encoder_refs' callers must not pay
    from fusedist.models.registry import register_from_dict

    card_url, card = export_card.read_card(path_or_url)
    weights = export_card.local_weights(card, card_url)
    name = str(card["name"])
    try:
        register_from_dict(spec_data(card, weights), overwrite=name in _EXPORTED)
    except ValueError as e:
        raise ValueError(f"cannot register export {card_url} as '{name}': {e}") from e
    _EXPORTED[name] = str(weights)
    return name


def exported_weights(name: str) -> str | None:
    """The local weights file of an encoder registered by :func:`register_exported`."""
    return _EXPORTED.get(name)


def resolve_encoder(name_or_path: str, tracking_uri: str | None = None) -> str:
    """A registry name as is; a path/URL to an export folder or its card -> its name; an
    MLflow model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, is downloaded
    (:func:`fetch_registered`, MLflow at ``tracking_uri``) and registered like a folder."""
    # lazy: the registry imports torch, which check_encoder_refs' callers must not pay
    from fusedist.models.registry import get_spec

    s = str(name_or_path)
    if mlmodels.is_registry_uri(s):
        return register_exported(fetch_registered(s, tracking_uri))
    try:
        get_spec(s)
        return s
    except KeyError:
        pass
    if (storage.is_s3(s) or s.startswith("file://") or s.endswith(".json")
            or Path(s).expanduser().exists()):
        return register_exported(s)
    get_spec(s)  # raises the registry's KeyError, with close names
    return s


def fetch_registered(uri: str, tracking_uri: str | None = None) -> str:
    """The local export folder of the MLflow model ``uri`` names (its ``export`` artifact),
    downloaded once per registry and version into ``<cache>/mlflow/`` (a version never
    changes; an alias is resolved to its version first)."""
    tracking_uri = tracking_uri or mlmodels.default_tracking_uri()
    r = mlmodels.resolve(uri, tracking_uri)
    registry = hashlib.sha256(mlmodels.registry_uri(tracking_uri).encode()).hexdigest()[:16]
    dest = storage.cache_dir() / "mlflow" / registry / r.model_uri[len(mlmodels.SCHEME):]
    marker = dest / "export-path"  # written last: the download is complete
    if not marker.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
            try:
                folder, _ = mlmodels.download(r.model_uri, tmp, tracking_uri, ARTIFACT)
            except ValueError as e:
                raise ValueError(f"{uri}: {e}") from None
            (Path(tmp) / marker.name).write_text(folder.relative_to(tmp).as_posix())
            try:
                os.replace(tmp, dest)  # atomic: another process may have finished first
            except OSError:
                if not marker.is_file():
                    raise
            Path(tmp).mkdir(exist_ok=True)  # for TemporaryDirectory's cleanup
    log.info("%s is %s (%s)", uri, r.model_uri, dest)
    return str(dest / marker.read_text().strip())


# -- stages' view: ConfigErrors, built encoders ---------------------------------------------
def resolve_ref(name: str, tracking_uri: str | None = None) -> str:
    """A registry name, the folder/card.json of an exported model, or an MLflow model
    ``models:/<name>@<alias>`` (the last two registered here; ``tracking_uri`` is the MLflow
    for ``models:/``, default ``MLFLOW_TRACKING_URI`` or the local store).

    Each Ray worker has its own registry, so actors call this too with the same reference.
    """
    try:
        return resolve_encoder(name, tracking_uri)
    except FileNotFoundError as e:
        raise ConfigError(f"encoder {name!r}: {e}; give a registry name "
                          "(fusedist.models.list_encoders()) or an exported model folder") from None
    except ValueError as e:
        if not name.startswith("models:/"):
            raise
        raise ConfigError(f"encoder {name!r}: {e}") from None


def stage_tracking_uri(mlflow_cfg) -> str:
    """The MLflow that resolves a stage's ``models:/`` encoders: the stage's own
    ``mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the local store (the URI the
    stage logs its run to, so one setting names one server)."""
    return resolve_tracking_uri(mlflow_cfg)[0]


def load_encoders(refs: list[Any], tracking_uri: str | None = None) -> list:
    """Build each encoder once on the CPU: bad names or weights fail here, before any work,
    and the weights digests that mark outputs come from the real loaded weights.
    ``refs``: ``EncoderRef``s (``.name``, ``.weights``); ``tracking_uri``: the MLflow that
    resolves ``models:/`` references."""
    check_encoder_refs(refs)  # before torch is imported
    # lazy: the registry imports torch; a bad reference fails above without it
    from fusedist.models.registry import build_encoder, get_spec
    from fusedist.models.weights import WeightsError

    out = []
    for ref in refs:
        try:
            name = resolve_ref(ref.name, tracking_uri)
            get_spec(name)
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"")) from None
        try:
            enc = build_encoder(name, weights=ref.weights, device="cpu")
        except WeightsError as e:
            raise ConfigError(str(e)) from None
        _check_exported_dim(enc, ref.name)
        out.append(enc)
    names = [e.spec.name for e in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"encoder listed twice: {names}")
    return out


def _check_exported_dim(enc, ref: str) -> None:
    """An exported model's card says its ``dim``; its weights decide what comes out. A card
    edited (or copied from another export) must fail here, not write bags of the wrong width."""
    import torch

    if exported_weights(enc.spec.name) is None:
        return  # registry encoders: their dim is checked by the registry's own tests
    s = int(enc.spec.input_size)
    with torch.inference_mode():
        got = int(enc.embed(torch.zeros(1, 3, s, s, dtype=torch.uint8)).shape[-1])
    if got != int(enc.spec.dim):
        raise ConfigError(f"export {ref}: card.json says dim={enc.spec.dim} but its weights "
                          f"give {got}-d features; fix the card's dim or re-export the model "
                          "(fusedist export)")


def shared_export(output: str, name: str) -> str:
    """``<output>/_state/models/<name>/``: the export folder of an encoder that came from
    ``models:/``, copied where every actor can read it. The driver downloaded it into its
    own cache, which workers on other nodes do not see, and which an actor could not refill
    itself: it may not reach the MLflow the driver was pointed at."""
    src = Path(exported_weights(name)).parent
    dest = storage.join(output, "_state", "models", name)
    card = storage.read_json(str(src / CARD))
    have = storage.join(dest, CARD)
    if not (storage.exists(have) and storage.read_json(have).get("weights_sha256")
            == card.get("weights_sha256")):
        storage.delete(have)  # no moment pairs the old card with the new weights
        for p in sorted(src.iterdir()):
            if p.name != CARD:
                storage.upload_file(p, storage.join(dest, p.name))
        storage.upload_file(src / CARD, have)  # last: marks the copy complete
    return dest


def actor_refs(refs: list[Any], encoders: list, tracking_uri: str, output: str
               ) -> list[tuple[str, str | None]]:
    """The (reference, weights) pairs the engine's actors build ``encoders`` (built by
    :func:`load_encoders` from ``refs``) from, in their own processes: as the user gave them,
    but an MLflow model's reference is its export copied under ``output``
    (:func:`shared_export`), so no actor needs to reach MLflow."""
    names = {e.spec.name for e in encoders}
    out = []
    for r in refs:
        name = resolve_ref(r.name, tracking_uri)
        if name in names:
            out.append((shared_export(output, name) if mlmodels.is_registry_uri(r.name)
                        else r.name, r.weights))
    return out
