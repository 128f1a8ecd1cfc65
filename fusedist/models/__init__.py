"""Encoders: a registry of named pathology foundation models and tiny seeded test models.

    from fusedist.models import build_encoder
    enc = build_encoder("uni2-h", weights="/models/uni2-h/model.safetensors", device="cuda")
    feats = enc.embed(tiles_uint8)          # (B, 1536) float32
    mlflow.set_tag("random_weights", enc.random_weights)

Adding an encoder is one call: ``register_from_dict({...})`` (see ``EncoderSpec`` fields).
"""

import importlib
from typing import Any

# Names are imported on first use (PEP 562): the registry imports torch (~3 s), which a command
# that only checks an encoder name (fusedist.models.refs.check_encoder_refs) must not pay.
_WHERE = {
    "MissingDependencyError": "arch", "create_model": "arch", "Encoder": "encoder",
    "build_encoder": "registry", "build_meta": "registry", "check_weights": "registry",
    "get_spec": "registry", "list_encoders": "registry", "register": "registry",
    "register_from_dict": "registry", "register_from_yaml": "registry", "EncoderSpec": "spec",
    "WeightsError": "weights", "save_weights": "weights", "state_dict_digest": "weights",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fusedist.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fusedist.models.{_WHERE[name]}"), name)


__all__ = [
    "Encoder",
    "EncoderSpec",
    "MissingDependencyError",
    "WeightsError",
    "build_encoder",
    "build_meta",
    "check_weights",
    "create_model",
    "get_spec",
    "list_encoders",
    "register",
    "register_from_dict",
    "register_from_yaml",
    "save_weights",
    "state_dict_digest",
]
