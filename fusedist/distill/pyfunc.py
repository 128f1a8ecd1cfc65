"""The exported XMAG student as an ``mlflow.pyfunc`` model.

``mlflow.pyfunc.load_model("models:/xmag-student@champion").predict(tiles)``: ``tiles`` uint8
RGB ``(N, 3, S, S)`` with ``S`` the card's ``input_size`` (224), the same tiles
``fusedist embed`` feeds; the result is float32 ``(N, D)`` embeddings (the CLS token, D the
card's ``dim``), equal to ``fusedist embed -e <export>``'s. Float images are not accepted:
MLflow checks tensor dtypes exactly and the encoder normalises 0..255 pixels itself, so cast
with ``np.clip(x, 0, 255).astype(np.uint8)`` (pixels on 0..255) first.

The model's one artifact, ``export``, is the export folder (``model.safetensors`` +
``card.json``), so ``fusedist embed -e models:/...`` and any tool that reads export folders
use the very same files; the card is also the model's ``metadata`` (``fusedist_card``).
``model_config`` ``{"device": "cuda", "batch_size": 256}`` picks where and how it runs
(default CPU, 64 tiles per forward).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from fusedist import mlmodels
from fusedist.formats.export_card import ARTIFACT, CARD, WEIGHTS, verify_sha
from fusedist.models.refs import spec_data
from fusedist.models.spec import spec_from_dict


class StudentPyfunc(mlflow.pyfunc.PythonModel):
    """uint8 tiles (N, 3, S, S) -> float32 embeddings (N, D); state lives in the artifact."""

    def load_context(self, context) -> None:
        # lazy: the registry imports torch, which logging the model does not need
        from fusedist.models.registry import build_encoder

        folder = Path(context.artifacts[ARTIFACT])
        card = json.loads((folder / CARD).read_text())
        weights = folder / str(card.get("weights_file", WEIGHTS))
        verify_sha(weights, card, str(folder / CARD))
        cfg = dict(context.model_config or {})
        self.batch_size = int(cfg.get("batch_size", 64))
        # Built from the card's spec, not registered: loading a model must not change which
        # encoder a registry name means in the caller's process.
        self.encoder = build_encoder(spec_from_dict(spec_data(card, weights)), weights=weights,
                                     device=str(cfg.get("device", "cpu")))

    # np.ndarray: a hint MLflow 3 infers no schema from, so the logged signature is the one
    # that checks inputs (and no "add type hints" warning at every log).
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        x = np.asarray(model_input)
        if x.dtype != np.uint8:
            raise TypeError(f"expects uint8 tiles, got {x.dtype}; cast pixels on 0..255 with "
                            "np.clip(x, 0, 255).astype(np.uint8)")
        if len(x) == 0:
            return np.zeros((0, self.encoder.dim), np.float32)
        out = [self.encoder.embed(torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size])))
               .cpu().numpy() for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out).astype(np.float32)


def signature(card: dict[str, Any]):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    s, d = int(card["input_size"]), int(card["dim"])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, s, s))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, d))]))


def log_student(tracker: Any, folder: Path, card: dict[str, Any], name: str) -> Any:
    """Log the local export ``folder`` as a pyfunc model of ``tracker``'s run."""
    return mlmodels.log_pyfunc(tracker, name, StudentPyfunc(), {ARTIFACT: str(folder)},
                               signature(card), metadata={"fusedist_card": card},
                               tags={"fusedist.kind": "xmag-student",
                                     "fusedist.encoder": str(card.get("name"))})
