"""Colour jitter: the released PIL backend against fusedist's tensor backend (issue 29, item 8).

Both backends get the same images and the same factors (``fusedist.distill.augment``); the
difference is printed in 8-bit levels (|pil - tensor| x 255): each op alone at the ends of
its range (brightness/contrast/saturation 0.95 and 1.05, hue -0.05 and +0.05), then the
whole jitter at PairAugment's draws — with the pil backend's ops in the tensor backend's
fixed order, and in the pil backend's own random order (what ``backend: pil`` runs).
Images: uniform noise, and synthetic H&E tiles (fusedist.synth). Then the time per jittered
image of each backend on one CPU thread.

    python benchmarks/jitter_backends.py            # 64 images of 224 px per kind
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusedist.distill import augment as A  # noqa: E402
from fusedist.distill.augment import AugParams, PairAugment  # noqa: E402

OPS = ("brightness", "contrast", "saturation", "hue")


def noise(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def he_tiles(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` crops of ``size`` px from tissue tiles of a synthetic slide."""
    from fusedist.synth.render import TileRenderer, build_scene

    scene = build_scene(4096, 4096, 0.5, {}, seed, tile=512, tissue_fraction=0.9)
    r = TileRenderer(scene)
    out, rng = [], np.random.default_rng(seed)
    for ty in range(8):
        for tx in range(8):
            t = r.render(ty, tx)
            if (t.mean(axis=2) < 220).mean() < 0.5:       # mostly background
                continue
            y, x = rng.integers(0, 512 - size, 2)
            out.append(torch.from_numpy(t[y:y + size, x:x + size].copy()).permute(2, 0, 1))
            if len(out) == n:
                return torch.stack(out)
    return torch.stack(out)


TENSOR_OPS = (A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue)


def one_op(u8: torch.Tensor, op: int, factor: float) -> np.ndarray:
    """|pil - tensor| in 8-bit levels of op ``op`` alone at ``factor``."""
    from PIL import Image

    f = A.pil_ops()[op]
    pil = np.stack([np.asarray(f(Image.fromarray(im.permute(1, 2, 0).numpy(), "RGB"), factor))
                    for im in u8]).transpose(0, 3, 1, 2).astype(np.float64)
    t = TENSOR_OPS[op](u8.float().div(255.0), torch.full((len(u8),), factor))
    return np.abs(pil - t.double().numpy() * 255)


def whole(u8: torch.Tensor, fixed_order: bool) -> np.ndarray:
    """|pil - tensor| in 8-bit levels of the whole jitter at PairAugment's draws."""
    n = len(u8)
    p = PairAugment(jitter_p=1.0, flip_p=0.0, backend="pil").sample(
        n, torch.Generator().manual_seed(1))
    if fixed_order:
        p = AugParams(**{**p.__dict__, "order": torch.arange(4).repeat(n, 1)})
    x, tiles = u8.float().div(255.0), torch.zeros(n, 16, 1)
    a, _ = PairAugment(backend="pil").apply(x, tiles, p)
    b, _ = PairAugment(backend="tensor").apply(x, tiles, p)
    return ((a - b).abs() * 255).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(1)
    kinds = {"noise": noise(args.n, args.size, 0), "H&E": he_tiles(args.n, args.size, 0)}
    print(f"{'images':6} {'op':10} {'factor':>7} {'max':>6} {'mean':>6} {'p99':>6}  (8-bit levels)")
    for name, u8 in kinds.items():
        rows = [(op, f, one_op(u8, i, f)) for i, op in enumerate(OPS)
                for f in ((-0.05, 0.05) if op == "hue" else (0.95, 1.05))]
        rows += [("all, fixed", "", whole(u8, True)), ("all, pil", "", whole(u8, False))]
        for op, f, d in rows:
            print(f"{name:6} {op:10} {f:>7} {d.max():6.2f} {d.mean():6.3f} "
                  f"{np.percentile(d, 99):6.2f}")
    u8 = kinds["H&E"]
    p = PairAugment(jitter_p=1.0, backend="pil").sample(len(u8), torch.Generator().manual_seed(2))
    x, tiles = u8.float().div(255.0), torch.zeros(len(u8), 16, 1)
    for backend in ("tensor", "pil"):
        aug = PairAugment(backend=backend)
        aug.apply(x, tiles, p)
        t0 = time.perf_counter()
        for _ in range(3):
            aug.apply(x, tiles, p)
        ms = (time.perf_counter() - t0) / (3 * len(u8)) * 1e3
        print(f"{backend}: {ms:.2f} ms per jittered {args.size} px image (1 CPU thread)")


if __name__ == "__main__":
    main()
