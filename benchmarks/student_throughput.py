"""XMAG student training step: DeepSpeed img/s against a plain compiled torch step, same run.

Both steps train the same student (backbone + global/local heads) on the same batch with the
same loss, paired augmentation, precision and clipping, in one process on one device:

- plain: ``torch.compile(student)`` + ``torch.optim.AdamW(fused=True)`` (bf16 autocast on CUDA
  with ``--bf16``), ``clip_grad_norm_``;
- deepspeed: ``deepspeed.initialize`` with the config ``fusedist distill`` builds (ZeRO stage,
  bf16 on CUDA, clipping, ``torch_adam``), world size 1; ``--ds-compile`` adds
  ``engine.compile()``.

Printed as img/s each (median over interleaved blocks of steps) and the ratio deepspeed /
plain. Then the data path alone: synthetic
pairs shards (224 px ``lo.jpg`` + (16, D) float16 teacher features) -> ShardReader zip ->
JPEG decode in DataLoader workers -> batches/s.

    python benchmarks/student_throughput.py                             # CPU: test-vit, fp32
    python benchmarks/student_throughput.py --student dinov2-vitb14 --teacher-dim 1536 \\
        --batch 48 --bf16 --zero 2 --ds-compile --loader-workers 8      # GPU figures
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _block_rates(steps: dict, batch: int, warmup: int, seconds: float, block: int,
                 cuda: bool) -> dict[str, float]:
    """Median img/s over blocks of ``block`` steps, the contenders' blocks interleaved, so
    drifting background load (a shared 2-core VM here) hits them alike."""
    import statistics

    import torch

    for step in steps.values():
        for _ in range(warmup):
            step()
    rates: dict[str, list[float]] = {k: [] for k in steps}
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or min(len(v) for v in rates.values()) < 3:
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(block):
                step()
            if cuda:
                torch.cuda.synchronize()
            rates[name].append(block * batch / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def train_steps(args) -> dict[str, float]:
    import torch

    from fusedist.config import load_config
    from fusedist.distill.augment import PairAugment
    from fusedist.distill.config import DistillConfig
    from fusedist.distill.losses import XmagObjective
    from fusedist.distill.train import ds_config, param_groups
    from fusedist.models.student import XmagStudent

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = args.bf16 and cuda
    objective, augment = XmagObjective(), PairAugment()
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8, device=device)
    targets = torch.randn(args.batch, 16, args.teacher_dim, device=device)

    def inputs(model):
        x, t = augment(images.float().div(255.0), targets, gen)
        return model.normalize(x), t

    steps = {}
    # -- plain torch: compiled module, fused AdamW, autocast
    torch.manual_seed(0)
    student = XmagStudent.from_registry(args.student, args.teacher_dim).to(device)
    opt = torch.optim.AdamW(param_groups(student, 0.05), lr=5e-4, fused=True)
    fwd = torch.compile(student) if args.compile else student

    def plain_step():
        x, t = inputs(student)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = objective(fwd(x), t)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps["plain" + ("+compile" if args.compile else "")] = plain_step
    # -- DeepSpeed engine, one rank
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    cfg = load_config(DistillConfig, None, [f"zero_stage={args.zero}", f"bf16={bf16}",
                                            f"batch.micro_batch={args.batch}"],
                      tiles="-", features="-")

    def ds_step_fn(compile_: bool):
        torch.manual_seed(0)
        student = XmagStudent.from_registry(args.student, args.teacher_dim)
        engine, *_ = deepspeed.initialize(model=student,
                                          model_parameters=param_groups(student, 0.05),
                                          config=ds_config(cfg, cuda))
        if compile_:
            engine.compile()

        def ds_step():
            x, t = inputs(engine.module)
            out = objective(engine(x), t)
            engine.backward(out["loss"])
            engine.step()
        return ds_step

    steps["deepspeed"] = ds_step_fn(False)
    if args.ds_compile:
        steps["deepspeed+compile"] = ds_step_fn(True)
    return _block_rates(steps, args.batch, args.warmup, args.seconds, args.block, cuda)


def write_pairs(root: Path, shards: int, per_shard: int, dim: int, teacher: str) -> tuple:
    """Synthetic pairs + feature shards (smooth colour noise JPEGs, like tissue in size)."""
    import numpy as np
    from PIL import Image

    from fusedist.features.cache import npy_bytes
    from fusedist.shards import write_shard
    from fusedist.storage import write_json

    rng = np.random.default_rng(0)
    tiles, feats = root / "tiles", root / "feats"
    rows = []
    for s in range(shards):
        name = f"shard-{s:06d}.tar"
        lo, ft = [], []
        for i in range(per_shard):
            small = rng.integers(120, 255, (28, 28, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(small).resize((224, 224), Image.Resampling.BICUBIC).save(
                buf, "JPEG", quality=90)
            key = f"slide{s}/{i * 896}_0"
            lo.append((key, {"lo.jpg": buf.getvalue()}))
            ft.append((key, {f"{teacher}.npy": npy_bytes(
                rng.standard_normal((16, dim)).astype(np.float16))}))
        write_shard(str(tiles / name), lo)
        write_shard(str(feats / name), ft)
        rows.append({"name": name, "samples": per_shard})
    for d in (tiles, feats):
        write_json(str(d / "manifest.json"), {"shards": rows})
    return str(tiles), str(feats)


def data_path(args) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    from fusedist.data import ShardReader
    from fusedist.distill.data import PairDecoder

    with tempfile.TemporaryDirectory(prefix="fusedist-student-bench-") as tmp:
        tiles, feats = write_pairs(Path(tmp), args.shards, args.per_shard, args.teacher_dim,
                                   "teacher")
        reader = ShardReader([tiles, feats], equal=True, rank=0, world_size=1,
                             decode=PairDecoder("teacher"))
        loader = DataLoader(reader, batch_size=args.batch, num_workers=args.loader_workers,
                            drop_last=True, pin_memory=torch.cuda.is_available())
        it = iter(loader)
        next(it)  # workers started, first shards opened
        n, t0 = 0, time.perf_counter()
        for _ in it:
            n += 1
        dt = time.perf_counter() - t0
    return {"batches_per_s": n / dt, "img_per_s": n * args.batch / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="test-vit")
    ap.add_argument("--teacher-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="bf16 (CUDA only; CPU stays fp32)")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2])
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="plain step without torch.compile")
    ap.add_argument("--ds-compile", action="store_true", help="also time engine.compile()")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0, help="timing window (all contenders)")
    ap.add_argument("--block", type=int, default=5, help="steps per timed block")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--loader-workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    print(f"# student {args.student} (teacher dim {args.teacher_dim}), batch {args.batch}, "
          f"{'bf16' if args.bf16 and torch.cuda.is_available() else 'fp32'}, ZeRO-{args.zero}, "
          f"torch {torch.__version__}, {dev or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    if not args.skip_train:
        rates = train_steps(args)
        base = next(iter(rates))
        for k, v in rates.items():
            print(f"train step {k:>18}: {v:9.1f} img/s (median of {args.block}-step blocks)")
        for k in list(rates)[1:]:
            print(f"ratio {k} / {base}: {rates[k] / rates[base]:.2f}")
    d = data_path(args)
    print(f"data path (shards -> decoded batches, {args.loader_workers} loader workers): "
          f"{d['batches_per_s']:.1f} batches/s = {d['img_per_s']:.0f} img/s")


if __name__ == "__main__":
    main()
