"""Encoder registry: real architectures checked on the meta device, seeded test models, weights
files (round trip, wrong architecture), hub failures offline, and the transformers loader."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedist.models import (
    EncoderSpec,
    MissingDependencyError,
    WeightsError,
    build_encoder,
    build_meta,
    check_weights,
    get_spec,
    list_encoders,
    register_from_dict,
    register_from_yaml,
    save_weights,
)
from fusedist.models.registry import _REGISTRY

REPO = Path(__file__).resolve().parents[1]
TEST_ENCODERS = ["test-vit", "test-vit-reg", "test-convnext"]

# Published sizes (model cards / papers), in millions of parameters, and output dims.
PUBLISHED = {
    "uni": (303, 1024),
    "uni2-h": (681, 1536),
    "virchow2": (632, 2560),
    "prov-gigapath": (1134, 1536),
    "h-optimus-1": (1134, 1536),
    "dinov2-vitb14": (86, 768),
}


def _tiles(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def test_encoders():
    return {name: build_encoder(name) for name in TEST_ENCODERS}


@pytest.fixture
def scratch_registry():
    """Undo registrations made by a test."""
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


# -- the real architectures, on the meta device ---------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_architectures_on_meta(name):
    params_m, dim = PUBLISHED[name]
    spec = get_spec(name)
    enc = build_meta(name)
    n = sum(p.numel() for p in enc.model.parameters()) / 1e6
    assert n == pytest.approx(params_m, rel=0.02), f"{name}: {n:.1f}M parameters"
    out = enc(torch.empty(2, 3, spec.input_size, spec.input_size, device="meta"))
    assert tuple(out.shape) == (2, dim) == (2, spec.dim)
    assert spec.hub_id and spec.hub_id.startswith("hf-hub:") and not spec.random_weights
    assert spec.mpp > 0 and spec.input_size == 224


def test_published_details():
    # Register tokens are excluded from Virchow2's patch mean: CLS + 4 registers come first.
    assert build_meta("virchow2").num_prefix_tokens == 5
    assert build_meta("uni2-h").num_prefix_tokens == 9
    assert get_spec("h-optimus-1").mean == (0.707223, 0.578729, 0.703617)
    assert get_spec("uni").mean == (0.485, 0.456, 0.406)
    phikon = get_spec("phikon-v2")
    assert (phikon.loader, phikon.dim, phikon.hub_id) == ("transformers", 1024,
                                                          "hf-hub:owkin/phikon-v2")
    names = set(list_encoders())
    assert set(PUBLISHED) | {"phikon-v2"} | set(TEST_ENCODERS) <= names
    assert set(list_encoders(include_test=False)).isdisjoint(TEST_ENCODERS)


# -- test-* entries -------------------------------------------------------------------------
def test_test_entries_distinct_and_frozen(test_encoders):
    dims = [get_spec(n).dim for n in TEST_ENCODERS]
    assert len(set(dims)) == len(dims)
    assert len({get_spec(n).arch + get_spec(n).output for n in TEST_ENCODERS}) == 3
    for name, enc in test_encoders.items():
        assert enc.random_weights and get_spec(name).random_weights
        assert enc.weights_source.startswith("random(seed=")
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())
        enc.train()
        assert not enc.training  # frozen by contract


def test_test_entries_deterministic_across_processes(test_encoders):
    code = ("import json; from fusedist.models import build_encoder; print(json.dumps("
            f"{{n: build_encoder(n).weights_digest for n in {TEST_ENCODERS!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120)
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh == {n: e.weights_digest for n, e in test_encoders.items()}
    assert len(set(fresh.values())) == 3


def test_digest_follows_weight_changes():
    enc = build_encoder("test-vit")
    before = enc.weights_digest
    assert enc.weights_digest == before  # cached
    with torch.no_grad():
        enc.model.cls_token.add_(1.0)
    assert enc.weights_digest != before
    enc.model.load_state_dict(build_encoder("test-vit").model.state_dict())
    assert enc.weights_digest == before


def test_seeding_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_encoder("test-vit")
    assert torch.equal(torch.rand(3), expected)


def test_normalize_embed_forward(test_encoders):
    x = _tiles(3)
    for name, enc in test_encoders.items():
        spec = get_spec(name)
        z = enc.normalize(x)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        assert z.dtype == torch.float32
        torch.testing.assert_close(z, (x.float() / 255 - mean) / std)
        e = enc.embed(x)
        assert e.shape == (3, spec.dim) and e.dtype == torch.float32
        with torch.no_grad():
            torch.testing.assert_close(e, enc(z))
    with pytest.raises(ValueError, match="uint8"):
        test_encoders["test-vit"].normalize(x.float())


def test_output_rules(test_encoders):
    z = test_encoders["test-vit"].normalize(_tiles(2))
    with torch.no_grad():
        vit = test_encoders["test-vit"]
        # CLS is what timm's own token pooling returns.
        torch.testing.assert_close(vit(z), vit.model(z))
        reg = test_encoders["test-vit-reg"]
        tokens = reg.model.forward_features(z)
        assert tokens.shape[1] == 1 + 4 + 14 * 14
        manual = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
        torch.testing.assert_close(reg(z), manual)


# -- weights files ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip(test_encoders, tmp_path, suffix):
    src = test_encoders["test-vit-reg"]
    path = save_weights(src, tmp_path / f"w{suffix}")
    check_weights("test-vit-reg", path)
    loaded = build_encoder("test-vit-reg", weights=path)
    assert not loaded.random_weights and loaded.weights_source == str(path)
    assert loaded.weights_digest == src.weights_digest
    x = _tiles(2)
    torch.testing.assert_close(loaded.embed(x), src.embed(x), rtol=0, atol=0)


def test_wrapped_checkpoint_and_half_precision(test_encoders, tmp_path):
    src = test_encoders["test-vit"]
    sd = {f"module.{k}": v.to(torch.bfloat16) for k, v in src.model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    check_weights("test-vit", path)
    enc = build_encoder("test-vit", weights=path)
    assert all(p.dtype == torch.float32 for p in enc.parameters())
    ref = {k: v.to(torch.bfloat16).float() for k, v in src.model.state_dict().items()}
    for k, v in enc.model.state_dict().items():
        torch.testing.assert_close(v, ref[k])


def test_pos_embed_resampled_from_larger_grid(tmp_path):
    """DINOv2 weights come at 518 px; loading at 224 px resamples the position embedding."""
    big = EncoderSpec(name="vit-518", arch="test_vit", dim=64,
                      kwargs=dict(img_size=518, patch_size=14, num_classes=0))
    path = save_weights(build_encoder(big, allow_random=True), tmp_path / "w518.safetensors")
    check_weights("test-vit", path)
    enc = build_encoder("test-vit", weights=path)
    assert enc.model.pos_embed.shape == (1, 1 + 16 * 16, 64)


def _assert_weights_error(err: pytest.ExceptionInfo, path: Path, name: str, *needles: str):
    msg = str(err.value)
    assert str(path) in msg and f"'{name}'" in msg and "Fix:" in msg, msg
    for n in needles:
        assert n in msg, msg


def test_wrong_architecture_file(test_encoders, tmp_path):
    path = save_weights(test_encoders["test-vit"], tmp_path / "vit.safetensors")
    with pytest.raises(WeightsError) as err:
        check_weights("test-convnext", path)
    _assert_weights_error(err, path, "test-convnext", "missing from the file",
                          "unexpected in the file", "more")
    with pytest.raises(WeightsError) as err:
        build_encoder("test-convnext", weights=path)
    _assert_weights_error(err, path, "test-convnext", "missing from the file")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_one_tensor_wrong_shape(test_encoders, tmp_path, suffix):
    sd = dict(test_encoders["test-vit"].model.state_dict())
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(10, 64)
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    for call in (lambda: check_weights("test-vit", path),
                 lambda: build_encoder("test-vit", weights=path)):
        with pytest.raises(WeightsError) as err:
            call()
        _assert_weights_error(err, path, "test-vit", "1 shape mismatch",
                              "blocks.0.attn.qkv.weight: file [10, 64] vs model [192, 64]")
        assert "missing" not in str(err.value)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_encoder("test-vit", weights=tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3, "note": "no tensors"}, junk)
    with pytest.raises(WeightsError, match="not a state dict"):
        check_weights("test-vit", junk)


# -- the hub (never reached: offline) -------------------------------------------------------
def test_hub_entry_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (lambda: build_encoder("uni2-h"),
                 lambda: check_weights("uni2-h", "hf-hub:MahmoodLab/UNI2-h")):
        with pytest.raises(WeightsError) as err:
            call()
        msg = str(err.value)
        assert "hf-hub:MahmoodLab/UNI2-h" in msg and "weights=" in msg and "HF_TOKEN" in msg
        assert "'uni2-h'" in msg


def test_hub_weights_from_local_cache(test_encoders, tmp_path, monkeypatch):
    """Offline, a hub id is answered from the Hugging Face cache when the file is there."""
    import huggingface_hub.constants as hub_constants

    snapshot = tmp_path / "models--acme--tiny-vit" / "snapshots" / ("0" * 40)
    save_weights(test_encoders["test-vit"], snapshot / "model.safetensors")
    (tmp_path / "models--acme--tiny-vit" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-vit" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = EncoderSpec(name="acme-tiny", arch="test_vit", dim=64, hub_id="hf-hub:acme/tiny-vit",
                       kwargs=dict(get_spec("test-vit").kwargs))
    enc = build_encoder(spec)
    assert enc.weights_source == "hf-hub:acme/tiny-vit" and not enc.random_weights
    assert enc.weights_digest == test_encoders["test-vit"].weights_digest


def test_random_weights_need_permission(caplog, scratch_registry):
    register_from_dict({"name": "my-vit", "arch": "test_vit", "dim": 64,
                        "kwargs": {"num_classes": 0, "img_size": 224}})
    with pytest.raises(WeightsError, match="no weights source"):
        build_encoder("my-vit")
    with caplog.at_level(logging.WARNING, logger="fusedist.models"):
        enc = build_encoder("my-vit", allow_random=True)
    assert enc.random_weights and "random weights" in caplog.text


# -- names, registration, optional loaders --------------------------------------------------
def test_unknown_name_suggests():
    with pytest.raises(KeyError) as err:
        get_spec("uni2h")
    assert "uni2-h" in str(err.value) and "Did you mean" in str(err.value)
    with pytest.raises(KeyError, match="virchow2"):
        build_encoder("Virchow-2")


def test_register_from_dict_and_yaml(tmp_path, scratch_registry):
    with pytest.raises(ValueError, match="did you mean 'hub_id'"):
        register_from_dict({"name": "x", "arch": "test_vit", "dim": 64, "hubid": "hf-hub:a/b"})
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        register_from_dict({"name": "x", "arch": "vit_smal_patch16_224", "dim": 384})
    with pytest.raises(ValueError, match="seed"):
        EncoderSpec(name="test-noseed", arch="test_vit", dim=64)
    with pytest.raises(ValueError, match="already registered"):
        register_from_dict({"name": "uni", "arch": "test_vit", "dim": 64})
    yml = tmp_path / "enc.yaml"
    yml.write_text("encoders:\n"
                   "  - name: test-mini-reg\n    arch: test_vit\n    dim: 64\n    seed: 7\n"
                   "    output: cls+mean\n"
                   "    kwargs: {embed_dim: 32, depth: 1, reg_tokens: 2, num_classes: 0,\n"
                   "             mlp_layer: timm.layers.SwiGLUPacked, act_layer: torch.nn.SiLU}\n")
    (spec,) = register_from_yaml(yml)
    assert get_spec("test-mini-reg") == spec and spec.to_dict()["kwargs"]["reg_tokens"] == 2
    enc = build_encoder("test-mini-reg")
    assert enc.embed(_tiles(1)).shape == (1, 64) and enc.num_prefix_tokens == 3


def test_transformers_loader_without_transformers(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now fails, installed or not
    for call in (lambda: build_encoder("phikon-v2"),
                 lambda: build_encoder("phikon-v2", weights=tmp_path / "w.safetensors"),
                 lambda: build_meta("phikon-v2")):
        with pytest.raises(MissingDependencyError) as err:
            call()
        assert "pip install transformers" in str(err.value) and "phikon-v2" in str(err.value)
