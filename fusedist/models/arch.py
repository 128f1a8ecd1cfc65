"""Instantiate an encoder's architecture (no weights loading here).

``device="meta"`` builds shapes only: no memory, no init cost, which is how the giant models
are checked on a CPU machine and how weights files are validated before any heavy work.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator

import torch
from torch import nn

from fusedist.models.spec import EncoderSpec, resolve_kwargs


class MissingDependencyError(ImportError):
    """An optional package an encoder needs is not installed; the message says what to install."""


def require_transformers(spec: EncoderSpec) -> Any:
    """Import transformers lazily: it is optional, only transformers-format entries need it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise MissingDependencyError(
            f"encoder '{spec.name}' is published in Hugging Face transformers format "
            f"(loader='transformers') and needs the optional package 'transformers', which is "
            f"not installed ({e}). Fix: pip install transformers, or choose a timm encoder "
            "(see fusedist.models.list_encoders())."
        ) from e


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed init for reproducible random weights without disturbing the caller's RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def create_model(spec: EncoderSpec, device: str | torch.device = "cpu",
                 seed: int | None = None) -> nn.Module:
    """Build the bare architecture of ``spec`` on ``device`` (``"meta"``: shapes only).

    Weights are randomly initialised (seeded when ``seed`` is given) unless on meta.
    """
    device = torch.device(device)
    with _seeded(seed), torch.device(device):
        if spec.loader == "transformers":
            model = _create_transformers(spec)
        else:
            model = _create_timm(spec)
    return model.eval()


def _create_timm(spec: EncoderSpec) -> nn.Module:
    import timm

    # pretrained=False: weights always come through fusedist.models.weights, which checks
    # them against this architecture and gives a clear error (timm would fetch silently).
    return timm.create_model(spec.arch, pretrained=False, **resolve_kwargs(spec.kwargs))


def _create_transformers(spec: EncoderSpec) -> nn.Module:
    transformers = require_transformers(spec)
    kwargs = dict(spec.kwargs)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"encoder '{spec.name}': transformers kwargs need a 'model_type'")
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    return transformers.AutoModel.from_config(config)


def load_transformers_pretrained(spec: EncoderSpec, source: str, local_only: bool) -> nn.Module:
    """``from_pretrained`` on a hub repo id or a ``save_pretrained`` directory."""
    transformers = require_transformers(spec)
    return transformers.AutoModel.from_pretrained(source, local_files_only=local_only).eval()
