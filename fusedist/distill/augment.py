"""Paired augmentation for XMAG (methods.md §1), batched on the images' device.

The student image and its cached 4x4 teacher-target grid must stay aligned: a horizontal flip
of the image swaps its columns, so target tile (r, c) moves to (r, grid-1-c) (vertical: rows).
The teacher embedding of a flipped tile is approximated by the unflipped one (cached features).
Colour jitter touches only the image. No crops: they would break the tile alignment.

Random numbers are drawn on the generator's device in one call, so a run is reproducible from
the generator alone whatever device the images are on.

Two jitter backends (``augment.backend``): ``tensor`` (default) jitters the batch's float
tensors on their device; ``pil`` (the released code, ``fidelity: released``) runs Pillow's
8-bit ops per image on the CPU, as torchvision's ``ColorJitter`` on PIL images: each op
rounds to uint8 (Pillow's blend truncates), the hue moves in whole steps of 1/255 of a turn
through Pillow's 8-bit HSV, and the four ops run in a random order per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
BACKENDS = ("tensor", "pil")


def flip_grid(tiles: Tensor, hflip: Tensor, vflip: Tensor, grid: int = 4) -> Tensor:
    """Permute (B, grid*grid, D) row-major targets as their images flip, per sample.

    ``hflip`` (B,) bool: column c -> grid-1-c; ``vflip`` (B,) bool: row r -> grid-1-r.
    """
    b, t = tiles.shape[:2]
    if t != grid * grid:
        raise ValueError(f"flip_grid: {t} tiles is not a {grid}x{grid} grid")
    g = tiles.reshape(b, grid, grid, *tiles.shape[2:])
    extra = (1,) * (g.ndim - 1)
    h = hflip.to(tiles.device, torch.bool).view(b, *extra)
    v = vflip.to(tiles.device, torch.bool).view(b, *extra)
    g = torch.where(h, g.flip(2), g)  # dim 2: columns
    g = torch.where(v, g.flip(1), g)  # dim 1: rows
    return g.reshape(tiles.shape)


@dataclass(frozen=True)
class AugParams:
    """Per-sample draws ((B,) tensors; ``order`` (B, 4), the ``pil`` backend's op order:
    0 brightness, 1 contrast, 2 saturation, 3 hue). Identity factors where ``jitter`` is
    False."""

    hflip: Tensor
    vflip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor | None = None


def _gray(img: Tensor) -> Tensor:
    r, g, b = img.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(img: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``_blend``: ``factor * img + (1 - factor) * other``, clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * img + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(img: Tensor, factor: Tensor) -> Tensor:
    return _blend(img, torch.zeros_like(img), factor)


def adjust_contrast(img: Tensor, factor: Tensor) -> Tensor:
    # Blend towards the image's mean grey level (one scalar per image).
    mean = _gray(img).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(img, mean, factor)


def adjust_saturation(img: Tensor, factor: Tensor) -> Tensor:
    return _blend(img, _gray(img), factor)


def rgb_to_hsv(img: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with h in [0, 1)."""
    r, g, b = img.unbind(dim=1)
    maxc, _ = img.max(dim=1)
    minc, _ = img.min(dim=1)
    delta = maxc - minc
    grey = delta == 0
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(grey, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n in (R=5, G=3, B=1) is
    ``v - v*s*clamp(min(k, 4-k), 0, 1)`` with ``k = (n + 6h) mod 6``."""
    h, s, v = hsv.unbind(dim=1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * h, 6.0)
        out.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=1)


def adjust_hue(img: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample)."""
    hsv = rgb_to_hsv(img)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1)).clamp_(0.0, 1.0)


# --------------------------------------------------------------- the released (PIL) jitter

def pil_hue(img, shift: float):
    """torchvision's PIL ``adjust_hue``: Pillow's 8-bit HSV, H moved by ``int(shift*255)``
    steps (truncated towards 0; wrapping around the uint8 circle)."""
    from PIL import Image

    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(int(shift * 255), dtype=np.int32).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert(img.mode)


def pil_ops():
    """The four ops of torchvision's ``ColorJitter`` on PIL images, by index (AugParams.order):
    Pillow's ImageEnhance Brightness, Contrast, Color (= saturation), and ``pil_hue``."""
    from PIL import ImageEnhance

    return (lambda im, f: ImageEnhance.Brightness(im).enhance(f),
            lambda im, f: ImageEnhance.Contrast(im).enhance(f),
            lambda im, f: ImageEnhance.Color(im).enhance(f),
            pil_hue)


def pil_jitter(images: Tensor, p: AugParams) -> Tensor:
    """Jitter each sample with ``p.jitter`` set on a uint8 PIL image, its ops in ``p.order``;
    the rest are returned untouched. ``images`` (B, 3, H, W) float in [0, 1] are taken as the
    8-bit images they came from (``round(255 x)``: exact for uint8 / 255)."""
    from PIL import Image

    idx = p.jitter.nonzero().view(-1).tolist()
    if not idx:
        return images
    ops = pil_ops()
    u8 = images[idx].mul(255.0).round_().clamp_(0, 255).to("cpu", torch.uint8)
    u8 = u8.permute(0, 2, 3, 1).numpy()
    factors = torch.stack((p.brightness, p.contrast, p.saturation, p.hue), 1)[idx].tolist()
    order = p.order[idx].tolist()
    done = []
    for img, f, o in zip(u8, factors, order):
        im = Image.fromarray(img, "RGB")
        for op in o:
            im = ops[op](im, f[op])
        done.append(torch.from_numpy(np.asarray(im).copy()))
    out = images.clone()
    jittered = torch.stack(done).permute(0, 3, 1, 2).to(images.device, images.dtype)
    out[idx] = jittered.div_(255.0)
    return out


class PairAugment:
    """Same random h/v flips on the image and its target grid; mild colour jitter on the image.

    Jitter (with probability ``jitter_p`` per sample): brightness, contrast, saturation factors
    uniform in [1-x, 1+x], hue shift uniform in [-hue, hue]. ``backend="tensor"``: applied in
    that fixed order on the float batch (torchvision shuffles the order; with factors this
    close to 1 the order hardly matters, and a fixed order keeps the batch one set of tensor
    ops). ``backend="pil"`` (released): per image on uint8 PIL images, in a random order
    (``pil_jitter``), on the CPU.
    """

    def __init__(self, flip_p: float = 0.5, jitter_p: float = 0.5, brightness: float = 0.05,
                 contrast: float = 0.05, saturation: float = 0.05, hue: float = 0.05,
                 grid: int = 4, backend: str = "tensor") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"augment backend must be one of {BACKENDS}, got {backend!r}")
        for name, v in (("flip_p", flip_p), ("jitter_p", jitter_p)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability, got {v}")
        if not (0 <= brightness < 1 and 0 <= contrast < 1 and 0 <= saturation < 1
                and 0 <= hue <= 0.5):
            raise ValueError("jitter strengths: brightness/contrast/saturation in [0, 1), "
                             "hue in [0, 0.5]")
        self.flip_p, self.jitter_p = flip_p, jitter_p
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness, contrast, saturation, hue)
        self.grid, self.backend = grid, backend

    def sample(self, batch: int, generator: torch.Generator) -> AugParams:
        """Draw every random number of one batch in a single call (device: the generator's)."""
        u = torch.rand(batch, 7, generator=generator, device=generator.device)
        jitter = u[:, 2] < self.jitter_p

        def factor(col: int, strength: float, centre: float) -> Tensor:
            f = centre + strength * (2.0 * u[:, col] - 1.0)
            return torch.where(jitter, f, torch.full_like(f, centre))

        # The pil backend's op order: a second draw, so the tensor backend's stay as they were.
        order = (torch.rand(batch, 4, generator=generator, device=generator.device)
                 .argsort(dim=1) if self.backend == "pil" else None)
        return AugParams(hflip=u[:, 0] < self.flip_p, vflip=u[:, 1] < self.flip_p,
                         jitter=jitter,
                         brightness=factor(3, self.brightness, 1.0),
                         contrast=factor(4, self.contrast, 1.0),
                         saturation=factor(5, self.saturation, 1.0),
                         hue=factor(6, self.hue, 0.0), order=order)

    def apply(self, images: Tensor, tiles: Tensor, p: AugParams) -> tuple[Tensor, Tensor]:
        """Apply drawn params ``p`` to a batch (``images`` (B, 3, H, W) float in [0, 1])."""
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("PairAugment expects float (B, 3, H, W) images in [0, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")
        if tiles.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {tiles.shape[0]} target grids")
        dev = images.device
        p = AugParams(**{k: None if getattr(p, k) is None else getattr(p, k).to(dev)
                         for k in AugParams.__dataclass_fields__})
        b = images.shape[0]
        out = torch.where(p.hflip.view(b, 1, 1, 1), images.flip(-1), images)
        out = torch.where(p.vflip.view(b, 1, 1, 1), out.flip(-2), out)
        if self.backend == "pil":
            if p.order is None:
                raise ValueError("the pil backend needs AugParams.order (PairAugment.sample "
                                 "with backend='pil' draws it)")
            out = pil_jitter(out, p)
        elif self.jitter_p > 0:  # no .any(): that would sync the GPU every batch
            jittered = adjust_brightness(out, p.brightness)
            jittered = adjust_contrast(jittered, p.contrast)
            jittered = adjust_saturation(jittered, p.saturation)
            jittered = adjust_hue(jittered, p.hue)
            # Samples not jittered stay bit-identical (hue round trips are not exact).
            out = torch.where(p.jitter.view(b, 1, 1, 1), jittered, out)
        return out, flip_grid(tiles, p.hflip, p.vflip, self.grid)

    def __call__(self, images: Tensor, tiles: Tensor,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.apply(images, tiles, self.sample(images.shape[0], generator))
