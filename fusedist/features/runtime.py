"""Pieces shared by ``cache`` and ``embed``: inputs, encoders, resources, progress."""

from __future__ import annotations

import logging

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.features.config import EncoderRef

log = logging.getLogger("fusedist.features")


def read_tile_manifest(url: str) -> dict:
    """The tile dataset's manifest, or a clear error saying to run ``fusedist tile``."""
    murl = storage.join(url.rstrip("/"), "manifest.json")
    if not storage.exists(murl):
        raise ConfigError(f"no tile dataset at {url} (no manifest.json); make one with "
                          "`fusedist tile`, or point --tiles at <tiles>/<dataset>")
    m = storage.read_json(murl)
    if not str(m.get("format", "")).startswith("fusedist.tiles/"):
        raise ConfigError(f"{murl} is not a fusedist tile manifest (format "
                          f"{m.get('format')!r})")
    return m


def load_encoders(refs: list[EncoderRef], tracking_uri: str | None = None) -> list:
    """Build each encoder once on the CPU: bad names or weights fail here, before any work,
    and the weights digests that mark outputs come from the real loaded weights.
    ``tracking_uri``: the MLflow that resolves ``models:/`` references."""
    from fusedist.preflight import check_encoder_refs

    check_encoder_refs(refs)  # before torch is imported
    from fusedist.models import WeightsError, build_encoder, get_spec

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

    from fusedist.distill.export import exported_weights

    if exported_weights(enc.spec.name) is None:
        return  # registry encoders: their dim is checked by the registry's own tests
    s = int(enc.spec.input_size)
    with torch.inference_mode():
        got = int(enc.embed(torch.zeros(1, 3, s, s, dtype=torch.uint8)).shape[-1])
    if got != int(enc.spec.dim):
        raise ConfigError(f"export {ref}: card.json says dim={enc.spec.dim} but its weights "
                          f"give {got}-d features; fix the card's dim or re-export the model "
                          "(fusedist export)")


def resolve_ref(name: str, tracking_uri: str | None = None) -> str:
    """A registry name, the folder/card.json of an exported model, or an MLflow model
    ``models:/<name>@<alias>`` (the last two registered here; ``tracking_uri`` is the MLflow
    for ``models:/``, default ``MLFLOW_TRACKING_URI`` or the local store).

    Each Ray worker has its own registry, so actors call this too with the same reference.
    """
    from fusedist.distill.export import resolve_encoder

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
    from fusedist.tracking import resolve_tracking_uri

    return resolve_tracking_uri(mlflow_cfg)[0]


def shared_export(output: str, name: str) -> str:
    """``<output>/_state/models/<name>/``: the export folder of an encoder that came from
    ``models:/``, copied where every actor can read it. The driver downloaded it into its
    own cache, which workers on other nodes do not see, and which an actor could not refill
    itself: it may not reach the MLflow the driver was pointed at."""
    from pathlib import Path

    from fusedist.distill.export import CARD, exported_weights

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


def actor_refs(refs: list[EncoderRef], encoders: list, tracking_uri: str, output: str
               ) -> list[tuple[str, str | None]]:
    """The (reference, weights) pairs the engine's actors build ``encoders`` (built by
    :func:`load_encoders` from ``refs``) from, in their own processes: as the user gave them,
    but an MLflow model's reference is its export copied under ``output``
    (:func:`shared_export`), so no actor needs to reach MLflow."""
    from fusedist import mlmodels

    names = {e.spec.name for e in encoders}
    out = []
    for r in refs:
        name = resolve_ref(r.name, tracking_uri)
        if name in names:
            out.append((shared_export(output, name) if mlmodels.is_registry_uri(r.name)
                        else r.name, r.weights))
    return out
