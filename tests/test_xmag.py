"""XMAG model pieces: token mapping, loss, paired augmentation, EMA, schedules, student, export.

Expected values are computed by hand (small grids, orthogonal/identical vectors); the colour
ops are also checked against torchvision's per-image functional ops.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fusedist.distill.augment import PairAugment, flip_grid
from fusedist.distill.ema import EMA
from fusedist.distill.export import export_student, register_in_mlflow
from fusedist.distill.losses import XmagObjective, negcos, xmag_loss
from fusedist.distill.schedule import lr_at
from fusedist.models import EncoderSpec, build_encoder, get_spec
from fusedist.models.refs import exported_weights, register_exported, resolve_encoder
from fusedist.models.student import ProjectionHead, XmagStudent, block_mean_tokens
from fusedist.tracking import MlflowConfig, Tracker, start_run
from tests.s3util import moto_server, s3_bucket  # noqa: F401  (fixtures)

TEACHER_DIM = 32


@pytest.fixture(autouse=True)
def _restore_registry():
    """Exports registered here must not leak into other tests' view of the registry."""
    from fusedist.models import refs as export
    from fusedist.models.registry import _REGISTRY

    before, exported = dict(_REGISTRY), dict(export._EXPORTED)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)
    export._EXPORTED.clear()
    export._EXPORTED.update(exported)


@pytest.fixture(scope="module")
def student() -> XmagStudent:
    return XmagStudent.from_registry("test-vit", teacher_dim=TEACHER_DIM)


# -- token mapping ------------------------------------------------------------------------------
def test_block_mean_on_4x4_grid_is_identity_in_row_major_order() -> None:
    tokens = torch.arange(16.0).view(1, 16, 1)  # token (r, c) holds 4r + c
    assert torch.equal(block_mean_tokens(tokens, grid=4), tokens)


def test_block_mean_on_8x8_grid_averages_2x2_blocks() -> None:
    tokens = torch.arange(64.0).view(1, 64, 1).repeat(2, 1, 3)  # token (i, j) holds 8i + j
    out = block_mean_tokens(tokens, grid=4)
    assert out.shape == (2, 16, 3)
    for r in range(4):
        for c in range(4):
            i, j = 2 * r, 2 * c
            block = [8 * i + j, 8 * i + j + 1, 8 * (i + 1) + j, 8 * (i + 1) + j + 1]
            assert out[1, 4 * r + c, 2].item() == sum(block) / 4
    # Block 0 = tokens 0, 1, 8, 9; block 15 = 54, 55, 62, 63.
    assert out[0, 0, 0].item() == 4.5 and out[0, 15, 0].item() == 58.5


def test_block_mean_on_16x16_student_grid() -> None:
    tokens = torch.randn(2, 256, 5)
    grid = tokens.view(2, 16, 16, 5)
    out = block_mean_tokens(tokens)
    torch.testing.assert_close(out[:, 6], grid[:, 4:8, 8:12].mean(dim=(1, 2)))  # (r, c) = (1, 2)


@pytest.mark.parametrize("n,grid", [(15, 4), (36, 4), (16, 3)])
def test_block_mean_rejects_bad_grids(n: int, grid: int) -> None:
    with pytest.raises(ValueError, match="grid|square"):
        block_mean_tokens(torch.zeros(1, n, 2), grid=grid)


# -- loss ---------------------------------------------------------------------------------------
E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def test_negcos_hand_values() -> None:
    assert negcos(E1[None], E1[None] * 3).item() == pytest.approx(-1.0)
    assert negcos(E1[None], E2[None]).item() == pytest.approx(0.0)
    assert negcos(torch.stack([E1, E1]), torch.stack([E1, -E1])).item() == pytest.approx(0.0)


def test_xmag_loss_hand_values_and_weights() -> None:
    teacher = E1.expand(1, 16, 2).clone()  # every tile (1, 0): mean (1, 0)
    orthogonal_global = E2[None]
    same_local = teacher * 2.0
    assert xmag_loss(orthogonal_global, same_local, teacher).item() == pytest.approx(-0.5)
    assert xmag_loss(E1[None], same_local, teacher).item() == pytest.approx(-1.5)
    assert xmag_loss(E1[None], same_local, teacher, global_weight=2.0,
                     local_weight=3.0).item() == pytest.approx(-5.0)
    # Global target is the tile mean: tiles alternate e1/e2, so the mean points at (1, 1).
    alternating = torch.stack([E1 if j % 2 else E2 for j in range(16)])[None]
    assert xmag_loss(torch.tensor([[1.0, 1.0]]), alternating, alternating,
                     local_weight=0.0).item() == pytest.approx(-1.0)
    # Local term averages over all B x 16 pairs: sample 0 all +1, sample 1 all -1 -> 0.
    teacher2 = E1.expand(2, 16, 2)
    local = torch.cat([teacher2[:1], -teacher2[1:]])
    assert xmag_loss(E1.expand(2, 2), local, teacher2, global_weight=0.0).item() == \
        pytest.approx(0.0, abs=1e-7)


def test_objective_matches_xmag_loss_and_reports_cosines() -> None:
    g = torch.Generator().manual_seed(0)
    out = {"global": torch.randn(3, 8, generator=g, requires_grad=True),
           "local": torch.randn(3, 16, 8, generator=g, requires_grad=True)}
    teacher = torch.randn(3, 16, 8, generator=g).half()  # cached features are float16
    res = XmagObjective(global_weight=1.0, local_weight=0.5)(out, teacher)
    assert set(res) == {"loss", "global_cos", "local_cos"}
    torch.testing.assert_close(res["loss"], xmag_loss(out["global"], out["local"], teacher))
    torch.testing.assert_close(res["global_cos"], -negcos(out["global"], teacher.float().mean(1)))
    torch.testing.assert_close(res["local_cos"], -negcos(out["local"], teacher))
    torch.testing.assert_close(res["loss"], -(res["global_cos"] + 0.5 * res["local_cos"]))
    assert not res["global_cos"].requires_grad
    res["loss"].backward()
    assert out["global"].grad is not None and out["local"].grad is not None


# -- augmentation -------------------------------------------------------------------------------
def _index_grid(batch: int) -> torch.Tensor:
    return torch.arange(16.0).view(1, 16, 1).repeat(batch, 1, 1)  # tile (r, c) holds 4r + c


def test_flip_grid_moves_tiles_per_sample() -> None:
    tiles = _index_grid(4)
    hflip = torch.tensor([False, True, False, True])
    vflip = torch.tensor([False, False, True, True])
    out = flip_grid(tiles, hflip, vflip).view(4, 4, 4)
    for r in range(4):
        for c in range(4):
            j = 4 * r + c
            assert out[0, r, c] == j                     # untouched
            assert out[1, r, 3 - c] == j                 # hflip: (r, c) -> (r, 3 - c)
            assert out[2, 3 - r, c] == j                 # vflip: (r, c) -> (3 - r, c)
            assert out[3, 3 - r, 3 - c] == j             # both: 180° rotation
    assert torch.equal(out[3].flatten(), 15 - torch.arange(16.0))


def _block_colour_images(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose 4x4 blocks (56 px) have distinct colours, and those colours as targets."""
    g = torch.Generator().manual_seed(1)
    colours = torch.rand(batch, 16, 3, generator=g)
    img = colours.view(batch, 4, 4, 3).permute(0, 3, 1, 2)
    img = img.repeat_interleave(56, dim=2).repeat_interleave(56, dim=3)
    return img.contiguous(), colours


def _region_colours(images: torch.Tensor) -> torch.Tensor:
    """'Embed' each teacher region of a 224 px image: the mean colour of its 56x56 pixels."""
    b = images.shape[0]
    return block_mean_tokens(images.permute(0, 2, 3, 1).reshape(b, 224 * 224, 3), grid=4)


def test_pair_augment_flipped_image_regions_match_permuted_targets() -> None:
    images, targets = _block_colour_images(16)
    aug = PairAugment(jitter_p=0.0)
    gen = torch.Generator().manual_seed(3)
    params = aug.sample(16, torch.Generator().manual_seed(3))
    assert params.hflip.any() and params.vflip.any() and (params.hflip & params.vflip).any()
    assert (~params.hflip & ~params.vflip).any()
    out_img, out_tiles = aug(images, targets, gen)
    torch.testing.assert_close(_region_colours(out_img), out_tiles)
    torch.testing.assert_close(out_tiles, flip_grid(targets, params.hflip, params.vflip))


def test_pair_augment_is_deterministic_given_the_generator() -> None:
    images, targets = _block_colour_images(8)
    aug = PairAugment()
    a = aug(images, targets, torch.Generator().manual_seed(7))
    b = aug(images, targets, torch.Generator().manual_seed(7))
    c = aug(images, targets, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_jitter_factors_within_bounds_and_identity_when_not_applied() -> None:
    p = PairAugment().sample(20_000, torch.Generator().manual_seed(0))
    for name, lo, hi in (("brightness", 0.95, 1.05), ("contrast", 0.95, 1.05),
                         ("saturation", 0.95, 1.05), ("hue", -0.05, 0.05)):
        v = getattr(p, name)
        assert v.min() >= lo and v.max() <= hi, name
        on = v[p.jitter]
        assert on.min() < lo + 0.005 and on.max() > hi - 0.005, name  # the range is used
        idle = 0.0 if name == "hue" else 1.0
        assert torch.all(v[~p.jitter] == idle), name
    for rate in (p.jitter, p.hflip, p.vflip):
        assert abs(rate.float().mean().item() - 0.5) < 0.02


def test_jitter_matches_torchvision_per_image_and_spares_unjittered() -> None:
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(5)
    images = torch.rand(6, 3, 32, 32, generator=g)
    tiles = torch.zeros(6, 16, 2)
    aug = PairAugment()
    p = aug.sample(6, torch.Generator().manual_seed(11))
    out, _ = aug.apply(images, tiles, p)
    for i in range(6):
        ref = images[i]
        ref = ref.flip(-1) if p.hflip[i] else ref
        ref = ref.flip(-2) if p.vflip[i] else ref
        if p.jitter[i]:
            ref = TF.adjust_brightness(ref, p.brightness[i].item())
            ref = TF.adjust_contrast(ref, p.contrast[i].item())
            ref = TF.adjust_saturation(ref, p.saturation[i].item())
            ref = TF.adjust_hue(ref, p.hue[i].item())
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
        else:
            assert torch.equal(out[i], ref)
    assert p.jitter.any() and (~p.jitter).any()


def test_pil_backend_runs_torchvision_colorjitter_ops_on_uint8_pil_images() -> None:
    """``augment.backend: pil`` (released): each jittered image through torchvision's PIL ops
    in its drawn order, bit for bit; flips as before; the others untouched."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import functional as TF

    g = torch.Generator().manual_seed(5)
    u8 = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
    images = u8.float().div(255.0)
    aug = PairAugment(backend="pil")
    p = aug.sample(8, torch.Generator().manual_seed(11))
    assert sorted(p.order[0].tolist()) == [0, 1, 2, 3]
    # The extra draw comes after the tensor backend's: its factors are unchanged.
    t = PairAugment().sample(8, torch.Generator().manual_seed(11))
    assert t.order is None and torch.equal(t.hue, p.hue) and torch.equal(t.jitter, p.jitter)
    out, _ = aug.apply(images, torch.zeros(8, 16, 2), p)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    factors = torch.stack((p.brightness, p.contrast, p.saturation, p.hue), 1)
    for i in range(8):
        ref = images[i].flip(-1) if p.hflip[i] else images[i]
        ref = ref.flip(-2) if p.vflip[i] else ref
        if p.jitter[i]:
            im = Image.fromarray((ref * 255).round().byte().permute(1, 2, 0).numpy(), "RGB")
            for op in p.order[i].tolist():
                im = ops[op](im, factors[i, op].item())
            ref = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
        assert torch.equal(out[i], ref), i
    assert p.jitter.any() and (~p.jitter).any()
    with pytest.raises(ValueError, match="backend"):
        PairAugment(backend="cuda")


def test_pil_backend_hand_values_8_bit_rounding_and_hue_steps() -> None:
    """Hand values of Pillow's 8-bit ops against the float tensor ops."""
    from fusedist.distill.augment import AugParams

    def one(rgb, op, factor, backend):
        img = torch.tensor(rgb, dtype=torch.float32).div(255).permute(2, 0, 1)[None]
        f = {0: "brightness", 1: "contrast", 2: "saturation", 3: "hue"}
        kw = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, f[op]: factor}
        p = AugParams(hflip=torch.tensor([False]), vflip=torch.tensor([False]),
                      jitter=torch.tensor([True]),
                      order=torch.tensor([[op] + [k for k in range(4) if k != op]]),
                      **{k: torch.tensor([float(v)]) for k, v in kw.items()})
        out, _ = PairAugment(backend=backend).apply(img, torch.zeros(1, 16, 1), p)
        return (out[0] * 255).permute(1, 2, 0).tolist()

    # Brightness 1.03 on 101: 104.03, truncated by Pillow's blend to 104.
    assert one([[[101, 101, 101]]], 0, 1.03, "pil") == [[[104.0] * 3]]
    assert one([[[101, 101, 101]]], 0, 1.03, "tensor")[0][0][0] == pytest.approx(104.03, abs=1e-3)
    # Contrast 1.04 on grey 100 and 101: Pillow's mean grey is int(100.5 + 0.5) = 101, so
    # 101 + 1.04 (100 - 101) = 99.96 -> 99, and 101 stays; the tensor blends towards the
    # exact mean 100.5: 100.5 - 1.04 * 0.5 = 99.98 and 100.5 + 1.04 * 0.5 = 101.02.
    # (The other ops run at identity factors, which leave grey pixels as they are.)
    assert one([[[100] * 3, [101] * 3]], 1, 1.04, "pil") == [[[99.0] * 3, [101.0] * 3]]
    t = one([[[100] * 3, [101] * 3]], 1, 1.04, "tensor")[0]
    assert t[0][0] == pytest.approx(99.98, abs=1e-3) and t[1][0] == pytest.approx(101.02, abs=1e-3)
    # Hue +0.03 on pure red: H moves int(7.65) = 7 of 255 steps; Pillow's hsv2rgb gives
    # G = round(255 * 7 * 6 / 255) = 42. The tensor rotates by 0.03 of a turn: G = 255 * 0.18.
    assert one([[[255, 0, 0]]], 3, 0.03, "pil") == [[[255.0, 42.0, 0.0]]]
    assert one([[[255, 0, 0]]], 3, 0.03, "tensor")[0][0] == pytest.approx([255, 45.9, 0],
                                                                           abs=1e-3)
    # -0.03: -7 wraps to H = 249, sector 5, B = round(255 * (1 - 249 * 6 / 255 + 5)) = 36.
    assert one([[[255, 0, 0]]], 3, -0.03, "pil") == [[[255.0, 0.0, 36.0]]]


def test_fidelity_released_selects_the_pil_jitter() -> None:
    from fusedist.distill.config import DistillConfig

    assert DistillConfig(tiles="t", features="f").augment.backend == "tensor"
    assert DistillConfig(tiles="t", features="f", fidelity="released").augment.backend == "pil"


# -- EMA ----------------------------------------------------------------------------------------
def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_math_buffers_and_round_trip() -> None:
    model, d = _tiny(), 0.9
    ema = EMA(model, decay=d)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves the BatchNorm running stats
    ema.update(model)
    for name, p in model.named_parameters():
        expected = d * old[name] + (1 - d) * p.detach()
        torch.testing.assert_close(ema.module.state_dict()[name], expected)
    torch.testing.assert_close(ema.module[1].running_mean, model[1].running_mean)
    assert ema.module[1].num_batches_tracked.item() == 1
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    other = EMA(_tiny(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == d and other.num_updates == 1
    for k, v in ema.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v)


def test_ema_of_bf16_weights_stays_fp32_and_keeps_moving() -> None:
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert ema.module.weight.dtype == torch.float32
    # bf16 would round away a 0.001 step on values near 1; fp32 keeps it.
    torch.testing.assert_close(ema.module.weight - start,
                               torch.full_like(start, 0.001), atol=2e-5, rtol=0)


# -- schedules ----------------------------------------------------------------------------------
def test_lr_schedules() -> None:
    base, total, warm = 1e-3, 100, 10
    warmup = [lr_at(s, total, base, warm) for s in range(warm)]
    assert warmup == pytest.approx([base * (s + 1) / warm for s in range(warm)])
    assert lr_at(warm, total, base, warm) == pytest.approx(base)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, total, base, warm, min_lr=1e-5) == pytest.approx((base + 1e-5) / 2)
    assert lr_at(total, total, base, warm, min_lr=1e-5) == pytest.approx(1e-5)
    decay = [lr_at(s, total, base, warm) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    paper = [lr_at(s, total, base, warm, kind="paper") for s in range(total)]
    assert paper == pytest.approx([base * (s + 1) / total for s in range(total)])
    assert lr_at(0, total, base, 0, kind="constant") == base
    assert lr_at(3, total, base, warm, kind="constant") == pytest.approx(base * 0.4)
    assert lr_at(99, total, base, warm, kind="constant") == base
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(0, total, base, warm, kind="linear")


# -- the student --------------------------------------------------------------------------------
def test_projection_head_shapes_and_shared_batchnorm() -> None:
    head = ProjectionHead(6, 10)
    assert head(torch.randn(4, 6)).shape == (4, 10)
    assert head(torch.randn(4, 16, 6)).shape == (4, 16, 10)
    assert head.bn.num_batches_tracked.item() == 2


def test_student_from_registry_forward_shapes_and_gradients(student: XmagStudent) -> None:
    assert student.embed_dim == 64 and student.teacher_dim == TEACHER_DIM
    assert student.spec.name == "test-vit" and student.random_weights
    x = student.normalize(torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8))
    student.train()
    student.zero_grad()
    out = student(x)
    assert out["cls"].shape == (2, 64)
    assert out["global"].shape == (2, TEACHER_DIM)
    assert out["local"].shape == (2, 16, TEACHER_DIM)
    loss = XmagObjective()(out, torch.randn(2, 16, TEACHER_DIM))["loss"]
    loss.backward()
    for part in (student.global_head, student.local_head, student.backbone.patch_embed,
                 student.backbone.blocks[0]):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), type(part).__name__


def test_student_normalize_uses_the_spec() -> None:
    s = XmagStudent.from_registry("test-vit", teacher_dim=8)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    mean, std = torch.tensor(s.spec.mean), torch.tensor(s.spec.std)
    torch.testing.assert_close(s.normalize(x)[0, :, 0, 0], (1 - mean) / std)
    torch.testing.assert_close(s.normalize(x.float() / 255), s.normalize(x))


# -- export -------------------------------------------------------------------------------------
def _ema_of(student: XmagStudent) -> EMA:
    ema = EMA(student, decay=0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)  # one "training step", so the EMA differs from the init
    ema.update(student)
    return ema


def test_export_register_build_embed_round_trip(student: XmagStudent, tmp_path: Path) -> None:
    ema = _ema_of(student)
    card = {"name": "xmag-test-roundtrip", "teacher": "test-vit-reg",
            "teacher_weights_digest": "t" * 64, "data_digest": "d" * 64}
    out = export_student(ema.module, str(tmp_path / "export"), card)
    files = sorted(p.name for p in Path(out).iterdir())
    assert files == ["card.json", "model.safetensors"]
    saved = json.loads((Path(out) / "card.json").read_text())
    assert saved["name"] == "xmag-test-roundtrip" and saved["backbone"] == "test-vit"
    assert saved["mpp"] == 2.0 and saved["input_size"] == 224 and saved["output"] == "cls"
    assert saved["dim"] == 64 and saved["teacher"] == "test-vit-reg"
    assert saved["data_digest"] == "d" * 64 and len(saved["weights_sha256"]) == 64

    name = register_exported(out)
    assert name == "xmag-test-roundtrip"
    assert register_exported(str(Path(out) / "card.json")) == name  # idempotent, card path too
    assert resolve_encoder(out) == name and resolve_encoder(name) == name
    assert resolve_encoder("test-vit") == "test-vit"
    spec = get_spec(name)
    assert spec.mpp == 2.0 and spec.dim == 64 and spec.mean == student.spec.mean

    # Until EncoderSpec carries a default local weights file, pass it explicitly.
    has_default = "weights" in {f.name for f in dataclasses.fields(EncoderSpec)}
    enc = build_encoder(name) if has_default else build_encoder(
        name, weights=str(Path(out) / "model.safetensors"))
    assert enc.weights_digest == saved["weights_digest"]
    x = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ema.module(ema.module.normalize(x))["cls"]
    torch.testing.assert_close(enc.embed(x), expected, atol=1e-5, rtol=1e-5)


def test_register_exported_rejects_tampered_weights(student: XmagStudent, tmp_path: Path) -> None:
    out = export_student(student, str(tmp_path / "e"), {"name": "xmag-test-tampered"})
    weights = Path(out) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        register_exported(out)


def test_export_refuses_a_card_that_contradicts_the_model(student: XmagStudent,
                                                          tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dim"):
        export_student(student, str(tmp_path / "e"), {"name": "xmag-x", "dim": 1536})


def test_register_in_mlflow_creates_a_version_with_alias(
        student: XmagStudent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    out = export_student(student, str(tmp_path / "export"), {"name": "xmag-test-mlflow"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with start_run(MlflowConfig(tracking_uri=uri), run_name="distill", rank=0) as tracker:
        v1 = register_in_mlflow(tracker, out, "xmag-student", alias="latest")
        # The same files again: version 1 is reused (nothing registered) and gets the alias
        # the model did not have yet.
        v1_again = register_in_mlflow(tracker, out, "xmag-student", alias="candidate")
        run_id = tracker.run_id
        other = export_student(student, str(tmp_path / "second" / "export"),
                               {"name": "xmag-test-mlflow", "description": "another card"})
        v2 = register_in_mlflow(tracker, other, "xmag-student", alias="candidate")
    assert (v1, v1_again, v2) == ("1", "1", "2")  # another card: other files
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("xmag-student", "candidate")
    assert str(mv.version) == "2" and mv.run_id == run_id
    # A real MLflow model (a pyfunc LoggedModel of the run), not loose files.
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.name == "xmag_student"
    # 'latest' is MLflow's reserved alias: models:/<name>/latest resolves to the newest version.
    assert client.get_registered_model("xmag-student").aliases == {"candidate": 2}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    got = Path(mlflow.artifacts.download_artifacts("models:/xmag-student/latest",
                                                   dst_path=str(tmp_path / "dl")))
    assert (got / "MLmodel").is_file()
    assert sorted(p.name for p in (got / "artifacts" / "export").iterdir()) == [
        "card.json", "model.safetensors"]
    info = mlflow.models.get_model_info("models:/xmag-student/latest")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "uint8",
                                                                 "shape": (-1, 3, 224, 224)}
    assert info.metadata["fusedist_card"]["name"] == "xmag-test-mlflow"
    assert mv.tags["weights_sha256"] == json.loads((Path(out) / "card.json").read_text())[
        "weights_sha256"]
    assert register_in_mlflow(Tracker.noop(rank=1), out, "xmag-student") is None


def test_lr_schedule_cosine_is_smooth() -> None:
    # Half a cosine between warm-up end and total: the quarter point sits at (1 + cos(pi/4))/2.
    lr = lr_at(10 + 25, 110, 1.0, 10)
    assert lr == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_student_loads_local_weights_trainable(student: XmagStudent, tmp_path: Path) -> None:
    ema = _ema_of(student)
    out = export_student(ema.module, str(tmp_path / "e"), {"name": "xmag-test-reload"})
    again = XmagStudent.from_registry("test-vit", teacher_dim=8,
                                      weights=str(Path(out) / "model.safetensors"))
    assert not again.random_weights and again.training
    assert all(p.requires_grad for p in again.parameters())
    for k, v in ema.module.backbone.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[k], v), k


def test_register_exported_never_replaces_a_builtin(student: XmagStudent,
                                                    tmp_path: Path) -> None:
    out = export_student(student, str(tmp_path / "e"), {"name": "uni"})
    with pytest.raises(ValueError, match="already registered"):
        register_exported(out)
    assert get_spec("uni").arch == "vit_large_patch16_224"


def test_export_to_s3_registers_and_logs_from_s3(student: XmagStudent, s3_bucket: str,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from fusedist import storage

    monkeypatch.setenv("FUSEDIST_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/students/xmag-s3"
    assert export_student(student, url, {"name": "xmag-test-s3"}) == url
    assert storage.listdir(url) == ["card.json", "model.safetensors"]
    name = resolve_encoder(url)
    local = exported_weights(name)
    assert name == "xmag-test-s3" and local and Path(local).is_file()
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        expected = student.eval()(student.normalize(x))["cls"]
    student.train()
    torch.testing.assert_close(build_encoder(name, weights=local).embed(x), expected,
                               atol=1e-5, rtol=1e-5)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with start_run(MlflowConfig(tracking_uri=uri), run_name="distill", rank=0) as tracker:
        assert register_in_mlflow(tracker, url, "xmag-s3", alias="champion") == "1"
