"""The encoder registry: names -> specs, and building frozen encoders with verified weights.

Weights source, first that applies: ``weights=`` (a local file/directory, or ``hf-hub:org/repo``)
> the entry's ``hub_id`` > seeded random weights (``test-*`` entries, or ``allow_random=True``,
which logs a WARNING; callers tag runs with ``Encoder.random_weights``).
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml
from torch import nn

from fusedist.models import weights as W
from fusedist.models.arch import create_model, load_transformers_pretrained, require_transformers
from fusedist.models.catalog import BUILTIN
from fusedist.models.encoder import Encoder
from fusedist.models.spec import EncoderSpec, spec_from_dict, unknown_encoder_message
from fusedist.models.weights import WeightsError

log = logging.getLogger("fusedist.models")

_REGISTRY: dict[str, EncoderSpec] = {}


# -- names ----------------------------------------------------------------------------------
def register(spec: EncoderSpec, *, overwrite: bool = False) -> EncoderSpec:
    """Add ``spec`` under ``spec.name``; re-registering a name needs ``overwrite=True``."""
    if spec.name in _REGISTRY and not overwrite and _REGISTRY[spec.name] != spec:
        raise ValueError(f"encoder '{spec.name}' is already registered; pass overwrite=True to "
                         "replace it, or choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def register_from_dict(data: Mapping[str, Any], *, overwrite: bool = False) -> EncoderSpec:
    """Register an encoder from plain data, e.g. a YAML mapping::

        register_from_dict({"name": "my-vit", "arch": "vit_small_patch16_224", "dim": 384,
                            "kwargs": {"num_classes": 0}, "hub_id": "hf-hub:me/my-vit"})
    """
    spec = spec_from_dict(data)
    if spec.loader == "timm":
        _check_timm_arch(spec.arch)
    return register(spec, overwrite=overwrite)


def _check_timm_arch(arch: str) -> None:
    """Catch a misspelt architecture at registration, not at the first build on a cluster."""
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"'{arch}' is not a timm architecture.{hint} "
                         "(timm.list_models() lists them.)")


def register_from_yaml(path: str | os.PathLike, *, overwrite: bool = False) -> list[EncoderSpec]:
    """Register every encoder in a YAML file: one mapping, a list, or ``{encoders: [...]}``."""
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, Mapping) and "encoders" in data:
        data = data["encoders"]
    items: Iterable[Any] = [data] if isinstance(data, Mapping) else (data or [])
    try:
        return [register_from_dict(item, overwrite=overwrite) for item in items]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def get_spec(name: str) -> EncoderSpec:
    """The spec registered as ``name``; an unknown name raises KeyError with close names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    raise KeyError(unknown_encoder_message(name, _REGISTRY))


def list_encoders(include_test: bool = True) -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(n for n, s in _REGISTRY.items() if include_test or not s.is_test)


def resolve(name_or_spec: str | EncoderSpec) -> EncoderSpec:
    return name_or_spec if isinstance(name_or_spec, EncoderSpec) else get_spec(name_or_spec)


# -- building -------------------------------------------------------------------------------
def build_meta(name_or_spec: str | EncoderSpec) -> Encoder:
    """The architecture on the meta device: shapes and output dims, no memory, no weights."""
    spec = resolve(name_or_spec)
    return Encoder(spec, create_model(spec, "meta"), weights_source="none (meta)")


RANDOM = "random"
"""``weights="random"``: seeded random weights for any entry, flagged as such (benchmarks)."""


def build_encoder(name_or_spec: str | EncoderSpec, weights: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", *, allow_random: bool = False) -> Encoder:
    """A frozen encoder (eval mode, no gradients) with verified weights, on ``device``."""
    spec = resolve(name_or_spec)
    if torch.device(device).type == "meta":
        return build_meta(spec)
    if spec.loader == "transformers":
        require_transformers(spec)  # fail before any download
    source = str(weights) if weights is not None else (spec.weights or spec.hub_id)
    if source == RANDOM:  # an explicit request (benchmarks of the real architectures)
        model, source = _random_model(spec, True)
    elif source is None:
        model, source = _random_model(spec, allow_random)
    elif source.startswith("hf-hub:"):
        model = _from_hub(spec, source)
    else:
        model = _from_local(spec, Path(source).expanduser())
    log.info("encoder %s: weights from %s", spec.name, source)
    return Encoder(spec, model, weights_source=source).to(device)


def _random_model(spec: EncoderSpec, allow_random: bool) -> tuple[nn.Module, str]:
    if not (spec.is_test or allow_random):
        raise WeightsError(
            f"encoder '{spec.name}' has no weights source: pass weights=/path/model.safetensors "
            "(or an hf-hub: id); random weights are only for test-* entries or allow_random=True")
    seed = spec.seed if spec.seed is not None else 0
    log.warning("encoder %s: random weights (seed=%d); embeddings carry no pathology signal",
                spec.name, seed)
    return create_model(spec, "cpu", seed=seed), f"random(seed={seed})"


def _from_hub(spec: EncoderSpec, source: str) -> nn.Module:
    if spec.loader == "transformers":
        try:
            return load_transformers_pretrained(spec, source.removeprefix("hf-hub:"),
                                                local_only=W.hub_offline())
        except OSError as e:  # transformers reports hub/network/gating failures as OSError
            raise W.hub_error(source, spec.name, f"{type(e).__name__}: {e}") from e
    return _load_file(spec, W.download_hub_weights(source, spec.name), source)


def _from_local(spec: EncoderSpec, path: Path) -> nn.Module:
    if spec.loader == "transformers" and path.is_dir() and (path / "config.json").is_file():
        return load_transformers_pretrained(spec, str(path), local_only=True)
    return _load_file(spec, W.find_weights_file(path), str(path))


def _load_file(spec: EncoderSpec, path: Path, source: str) -> nn.Module:
    """Strictly load a weights file, building on meta first so init costs nothing."""
    sd = W.read_state_dict(path)
    model = create_model(spec, "meta")
    sd = W.adapt_to_model(sd, model)
    expected = model.state_dict()
    mismatch = W.compare(W.shapes_of(expected), W.shapes_of(sd))
    if mismatch:
        raise WeightsError(W.mismatch_message(mismatch, _describe(path, source), spec.name,
                                              spec.arch, spec.hub_id))
    # Compute in fp32 whatever the file holds (bf16/fp16 checkpoints); autocast does the rest.
    sd = {k: v.to(expected[k].dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in _tensors(model)):
        # Non-persistent buffers are not in the file: rebuild for real and copy the weights in.
        model = create_model(spec, "cpu")
        model.load_state_dict(sd, strict=True)
    return model.eval()


def _tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _describe(path: Path, source: str) -> str:
    return f"file {path}" if str(path) == source else f"file {path} (from {source})"


# -- validation before heavy work -----------------------------------------------------------
def check_weights(name_or_spec: str | EncoderSpec, weights_path: str | os.PathLike) -> None:
    """Raise WeightsError if the file does not fit the architecture; reads no tensor data.

    ``weights_path`` may also be ``hf-hub:org/repo`` (checked from the local cache, or after a
    download when online).
    """
    spec = resolve(name_or_spec)
    source = str(weights_path)
    path = (W.download_hub_weights(source, spec.name) if source.startswith("hf-hub:")
            else W.find_weights_file(source))
    model = create_model(spec, "meta")
    file_sd = W.adapt_to_model(W.meta_tensors(W.read_shapes(path)), model)
    mismatch = W.compare(W.shapes_of(model.state_dict()), W.shapes_of(file_sd))
    if mismatch:
        raise WeightsError(W.mismatch_message(mismatch, _describe(path, source), spec.name,
                                              spec.arch, spec.hub_id))


for _spec in BUILTIN:
    register(_spec)
