"""A frozen encoder: normalisation, the output rule and precision policy around a backbone."""

from __future__ import annotations

import torch
from torch import nn

from fusedist.models.spec import EncoderSpec
from fusedist.models.weights import state_dict_digest

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Encoder(nn.Module):
    """``embed(uint8 tiles) -> (B, spec.dim)``; frozen (eval mode, no gradients)."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, weights_source: str) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_source = weights_source
        """``hf-hub:...``, a file path, or ``random(seed=N)``."""
        # Non-persistent: the state dict (and its digest) holds only the backbone's weights.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self._digest: tuple[tuple, str] | None = None
        self.num_prefix_tokens = _prefix_tokens(spec, model)
        """Tokens before the patch tokens (CLS + registers), excluded from the patch mean."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # -- identity -------------------------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        """True when the weights are random (test-* or ``allow_random``): tag runs with it."""
        return self.weights_source.startswith("random")

    @property
    def weights_digest(self) -> str:
        """sha256 of the backbone state dict (sorted keys, dtype, shape, bytes).

        Hashing a 1B-parameter model takes seconds, so the result is reused until a tensor is
        replaced or modified in place (tracked by storage pointer + autograd version counter).
        """
        sd = self.model.state_dict()
        key = tuple((k, v.data_ptr(), v._version) for k, v in sd.items())
        if self._digest is None or self._digest[0] != key:
            self._digest = (key, state_dict_digest(sd))
        return self._digest[1]

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "Encoder":
        # Frozen by contract: a parent module's .train() must not switch on dropout/drop-path.
        return super().train(False)

    # -- compute --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) already-normalised float -> (B, dim) by the spec's output rule."""
        if self.spec.output == "pooled":
            return self.model(x)
        tokens = self._tokens(x)
        cls = tokens[:, 0]
        if self.spec.output == "cls":
            return cls
        patches = tokens[:, self.num_prefix_tokens:]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 ``(x / 255 - mean) / std`` on x's device."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder '{self.spec.name}' expects uint8 (B, 3, H, W) tiles, got "
                             f"{x.dtype} {tuple(x.shape)}")
        mean = self.mean.to(x.device)
        std = self.std.to(x.device)
        return (x.float().div_(255.0) - mean) / std

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 tiles -> float32 (B, dim): normalise on the model's device (moving uint8 is 4x
        cheaper than float) and autocast to the spec's precision on CUDA; fp32 elsewhere."""
        x = self.normalize(x.to(self.device, non_blocking=True))
        dtype = _AUTOCAST.get(self.spec.precision)
        if x.device.type == "cuda" and dtype is not None:
            with torch.autocast("cuda", dtype=dtype):
                return self(x).float()
        return self(x).float()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.loader == "transformers":
            return self.model(pixel_values=x).last_hidden_state
        return self.model.forward_features(x)

    def extra_repr(self) -> str:
        return (f"name={self.spec.name}, dim={self.spec.dim}, output={self.spec.output}, "
                f"weights={self.weights_source}")


def _prefix_tokens(spec: EncoderSpec, model: nn.Module) -> int:
    """Number of CLS + register tokens; fail early if the output rule needs a CLS token."""
    if spec.output == "pooled":
        if spec.loader == "transformers":
            raise ValueError(f"encoder '{spec.name}': output 'pooled' is for timm models; "
                             "use 'cls' or 'cls+mean' for transformers ViTs")
        return 0
    if spec.loader == "transformers":
        return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"encoder '{spec.name}': output '{spec.output}' needs a ViT with a class "
                         f"token, but {spec.arch} has none; use output 'pooled'")
    return int(model.num_prefix_tokens)
