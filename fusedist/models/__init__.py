"""Encoders: a registry of named pathology foundation models and tiny seeded test models.

    from fusedist.models import build_encoder
    enc = build_encoder("uni2-h", weights="/models/uni2-h/model.safetensors", device="cuda")
    feats = enc.embed(tiles_uint8)          # (B, 1536) float32
    mlflow.set_tag("random_weights", enc.random_weights)

Adding an encoder is one call: ``register_from_dict({...})`` (see ``EncoderSpec`` fields).
"""

from fusedist.models.arch import MissingDependencyError, create_model
from fusedist.models.encoder import Encoder
from fusedist.models.registry import (
    build_encoder,
    build_meta,
    check_weights,
    get_spec,
    list_encoders,
    register,
    register_from_dict,
    register_from_yaml,
)
from fusedist.models.spec import EncoderSpec
from fusedist.models.weights import WeightsError, save_weights, state_dict_digest

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
