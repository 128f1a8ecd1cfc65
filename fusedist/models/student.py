"""The XMAG student: a trainable ViT backbone plus global and local projection heads.

methods.md §1: the student sees a 5x (2.0 µm/px) 224x224 tile; its CLS feeds the global head
(matched to the mean teacher tile embedding) and its 16x16 patch-token grid, pooled into 4x4
blocks, feeds the local head (block j matched to teacher tile j, row-major). Pure torch: the
distributed runtime (Ray Train + DeepSpeed) wraps this module, nothing here knows about it.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from fusedist.models.arch import create_model
from fusedist.models.registry import RANDOM, build_encoder, get_spec
from fusedist.models.spec import EncoderSpec

log = logging.getLogger("fusedist.models")


def block_mean_tokens(tokens: Tensor, grid: int = 4) -> Tensor:
    """(B, N, D) patch tokens of a square sqrt(N) x sqrt(N) grid -> (B, grid*grid, D).

    Output j is the mean of block (j // grid, j % grid) of the token grid (row-major), i.e. the
    tokens that cover the same image area as teacher tile j.
    """
    if tokens.ndim != 3:
        raise ValueError(f"block_mean_tokens expects (B, N, D) tokens, got {tuple(tokens.shape)}")
    if grid <= 0:
        raise ValueError(f"grid must be positive, got {grid}")
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"block_mean_tokens: N={n} patch tokens are not a square grid "
                         "(prefix tokens such as CLS/registers must be removed first)")
    if side % grid:
        raise ValueError(f"block_mean_tokens: a {side}x{side} token grid cannot be cut into "
                         f"{grid}x{grid} equal blocks ({side} is not divisible by {grid})")
    k = side // grid
    # Token (i, j) with i = R*k + ii, j = C*k + jj lands at [R, ii, C, jj]: mean over ii, jj.
    blocks = tokens.reshape(b, grid, k, grid, k, d).mean(dim=(2, 4))
    return blocks.reshape(b, grid * grid, d)


class ProjectionHead(nn.Module):
    """Linear(d_in, d_out) -> BatchNorm1d(d_out) -> GELU -> Linear(d_out, d_out).

    Accepts (B, d_in) or (B, T, d_in); token inputs share one BatchNorm over all B*T rows.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.bn = nn.BatchNorm1d(d_out)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if x.ndim not in (2, 3):
            raise ValueError(f"ProjectionHead expects (B, d) or (B, T, d), got {tuple(x.shape)}")
        h = self.fc1(x.reshape(-1, x.shape[-1]))
        h = self.fc2(self.act(self.bn(h)))
        return h.reshape(*lead, h.shape[-1])


class XmagStudent(nn.Module):
    """Backbone ViT + global/local heads. ``forward`` -> ``{"cls", "global", "local"}``."""

    def __init__(self, backbone: nn.Module, teacher_dim: int, grid: int = 4,
                 spec: EncoderSpec | None = None, weights_source: str = "unknown") -> None:
        super().__init__()
        if getattr(backbone, "cls_token", None) is None or not hasattr(backbone,
                                                                        "forward_features"):
            raise ValueError("XmagStudent needs a timm ViT backbone with a class token")
        self.backbone = backbone
        self.grid = grid
        self.embed_dim = int(getattr(backbone, "embed_dim", None) or backbone.num_features)
        self.teacher_dim = int(teacher_dim)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))
        self.global_head = ProjectionHead(self.embed_dim, self.teacher_dim)
        self.local_head = ProjectionHead(self.embed_dim, self.teacher_dim)
        self.spec = spec
        """The backbone's registry entry (mean/std, input size, mpp); None if built by hand."""
        self.weights_source = weights_source
        """Where the backbone's initial weights came from: a file, ``hf-hub:...``, ``random``."""
        mean = spec.mean if spec else (0.485, 0.456, 0.406)
        std = spec.std if spec else (0.229, 0.224, 0.225)
        # Non-persistent: checkpoints and the export hold weights only.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def random_weights(self) -> bool:
        """True when the backbone started from random weights (tag the run with it)."""
        return self.weights_source.startswith(RANDOM)

    @classmethod
    def from_registry(cls, name: str = "dinov2-vitb14", teacher_dim: int = 1536,
                      weights: str | None = None, grid: int = 4) -> "XmagStudent":
        """A trainable student on the registry entry ``name``.

        ``weights``: a local file/folder or ``hf-hub:org/repo`` (loaded strictly, the 518-px
        DINOv2 position embedding resampled to 224 px); ``None``/``"random"``: seeded random
        init with a WARNING, because no machine here reaches a model hub.
        """
        spec = get_spec(name)
        if weights is None or str(weights) == RANDOM:
            seed = spec.seed if spec.seed is not None else 0
            log.warning("XMAG student %s: random init (seed=%d), no pretrained weights loaded",
                        name, seed)
            backbone, source = create_model(spec, "cpu", seed=seed), f"{RANDOM}(seed={seed})"
        else:
            # The registry's strict loader, then thaw: an Encoder is frozen by contract.
            backbone, source = build_encoder(spec, weights=weights).model, str(weights)
        for p in backbone.parameters():
            p.requires_grad_(True)
        student = cls(backbone, teacher_dim=teacher_dim, grid=grid, spec=spec,
                      weights_source=source)
        return student.train()

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) 0..255, or float already scaled to 0..1 -> ``(x - mean) / std``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}")
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Normalised (B, 3, 224, 224) -> cls (B, D), global (B, Dt), local (B, grid², Dt)."""
        # Under DeepSpeed bf16 the weights are bf16: feed the input in the weights' dtype.
        x = x.to(self.backbone.cls_token.dtype)
        tokens = self.backbone.forward_features(x)
        cls_tok = tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens:]
        return {"cls": cls_tok,
                "global": self.global_head(cls_tok),
                "local": self.local_head(block_mean_tokens(patches, self.grid))}
