"""Pieces shared by ``cache`` and ``embed``: inputs, encoders, resources, progress."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.features.config import EncoderRef, EngineConfig
from fusedist.runtime import Rate

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


def load_encoders(refs: list[EncoderRef]) -> list:
    """Build each encoder once on the CPU: bad names or weights fail here, before any work,
    and the weights digests that mark outputs come from the real loaded weights."""
    from fusedist.preflight import check_encoder_refs

    check_encoder_refs(refs)  # before torch is imported
    from fusedist.models import WeightsError, build_encoder, get_spec

    out = []
    for ref in refs:
        try:
            name = resolve_ref(ref.name)
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


def resolve_ref(name: str) -> str:
    """A registry name, or the folder/card.json of an exported model (registered here).

    Each Ray worker has its own registry, so actors call this too with the same reference.
    """
    from fusedist.distill.export import resolve_encoder

    try:
        return resolve_encoder(name)
    except FileNotFoundError as e:
        raise ConfigError(f"encoder {name!r}: {e}; give a registry name "
                          "(fusedist.models.list_encoders()) or an exported model folder") from None


def engine_resources(cfg: EngineConfig) -> tuple[str, int, float]:
    """(device, number of actors, GPUs per actor) for this Ray cluster."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    device = cfg.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise ConfigError("engine.device=cuda but the Ray cluster has no GPUs; use "
                          "engine.device=auto or cpu")
    per = cfg.gpus_per_actor if device == "cuda" else 0.0
    actors = cfg.num_actors or (max(1, int(gpus // per)) if per else 1)
    return device, actors, per


class _Bar:
    def __init__(self, bar):
        self.bar, self.rate = bar, Rate("tiles")

    def advance(self, tiles: int) -> None:
        self.rate.add(tiles)
        self.bar.set_postfix_str(str(self.rate), refresh=False)
        self.bar.update(1)


@contextlib.contextmanager
def shard_progress(total: int, desc: str, enabled: bool) -> Iterator[_Bar]:
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="shard", disable=not enabled,
              dynamic_ncols=True) as bar:
        yield _Bar(bar)
