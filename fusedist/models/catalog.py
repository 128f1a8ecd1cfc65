"""Built-in encoder entries: published pathology FMs, the XMAG student base, test-* models.

Architectures are the kwargs the model cards pass to ``timm.create_model`` (checked on the meta
device by tests/test_registry.py: parameter counts and output dims). Two traps worth knowing:

* Prov-GigaPath's hub config names ``vit_giant_patch14_dinov2`` but sets ``patch_size=16``
  (and a plain GELU MLP, mlp_ratio 5.33334): with patch 14 its weights do not load.
* Virchow2's output is CLS concatenated with the mean of the *patch* tokens: its 4 register
  tokens sit between CLS and the patches and are excluded (2 x 1280 = 2560-d).
"""

from __future__ import annotations

from fusedist.models.spec import EncoderSpec

_SWIGLU = "timm.layers.SwiGLUPacked"
_SILU = "torch.nn.SiLU"
_GATED = "gated on Hugging Face: accept the licence on the model page and set HF_TOKEN"

PUBLISHED: tuple[EncoderSpec, ...] = (
    EncoderSpec(
        name="uni",
        arch="vit_large_patch16_224",
        kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                    dynamic_img_size=True),
        hub_id="hf-hub:MahmoodLab/UNI",
        dim=1024, output="cls", precision="bf16", mpp=0.5,
        description="UNI (Mahmood Lab): ViT-L/16 DINOv2, 100M tiles, CLS 1024-d",
        license=f"CC-BY-NC-ND-4.0, {_GATED}",
    ),
    EncoderSpec(
        name="uni2-h",
        arch="vit_giant_patch14_224",
        kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                    embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                    mlp_layer=_SWIGLU, act_layer=_SILU, reg_tokens=8, dynamic_img_size=True),
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        dim=1536, output="cls", precision="bf16", mpp=0.5,
        description="UNI2-h (Mahmood Lab): ViT-H/14, 8 register tokens, SwiGLU, CLS 1536-d",
        license=f"CC-BY-NC-ND-4.0, {_GATED}",
    ),
    EncoderSpec(
        name="virchow2",
        arch="vit_huge_patch14_224",
        kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                    global_pool="", dynamic_img_size=True, mlp_layer=_SWIGLU, act_layer=_SILU,
                    reg_tokens=4),
        hub_id="hf-hub:paige-ai/Virchow2",
        # The model card runs it under fp16 autocast.
        dim=2560, output="cls+mean", precision="fp16", mpp=0.5,
        description="Virchow2 (Paige): ViT-H/14, 4 register tokens, SwiGLU, CLS+mean 2560-d",
        license=f"CC-BY-NC-ND-4.0, {_GATED}",
    ),
    EncoderSpec(
        name="prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                    num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
        hub_id="hf-hub:prov-gigapath/prov-gigapath",
        dim=1536, output="cls", precision="bf16", mpp=0.5,
        description="Prov-GigaPath tile encoder: ViT-g (patch 16 despite the timm name), "
                    "CLS 1536-d",
        license=f"Apache-2.0 per model card, research use; {_GATED}",
    ),
    EncoderSpec(
        name="h-optimus-1",
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
        hub_id="hf-hub:bioptimus/H-optimus-1",
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        # The model card runs it under fp16 autocast.
        dim=1536, output="cls", precision="fp16", mpp=0.5,
        description="H-optimus-1 (Bioptimus): ViT-g/14, 4 register tokens, SwiGLU, CLS 1536-d",
        license=f"non-commercial licence per model card, {_GATED}",
    ),
    EncoderSpec(
        name="phikon-v2",
        arch="Dinov2Model",
        loader="transformers",
        # A transformers config, used only to build the model without a hub (meta checks, local
        # state-dict files); hub and save_pretrained() directories bring their own config.json.
        kwargs=dict(model_type="dinov2", hidden_size=1024, num_hidden_layers=24,
                    num_attention_heads=16, patch_size=16, image_size=224, mlp_ratio=4,
                    layerscale_value=1e-5),
        hub_id="hf-hub:owkin/phikon-v2",
        dim=1024, output="cls", precision="bf16", mpp=0.5,
        description="Phikon-v2 (Owkin): ViT-L/16 DINOv2 in transformers format, CLS 1024-d",
        license="Owkin non-commercial licence per model card (not gated)",
    ),
    EncoderSpec(
        name="dinov2-vitb14",
        arch="vit_base_patch14_dinov2",
        # img_size 224 (16x16 patch grid); the 518-px hub pos_embed is resampled on load.
        kwargs=dict(img_size=224, num_classes=0),
        hub_id="hf-hub:timm/vit_base_patch14_dinov2.lvd142m",
        # mpp 2.0: this entry is the XMAG student base, which sees 5x tiles.
        dim=768, output="cls", precision="bf16", mpp=2.0,
        description="DINOv2 ViT-B/14 natural-image weights: XMAG student initialisation",
        license="Apache-2.0 (not gated)",
    ),
)

TEST: tuple[EncoderSpec, ...] = (
    EncoderSpec(
        name="test-vit",
        arch="test_vit",
        # Patch 14 at 224 px gives the same 16x16 token grid as the XMAG student.
        kwargs=dict(img_size=224, patch_size=14, num_classes=0),
        dim=64, output="cls", precision="bf16", mpp=0.5, seed=1,
        description="tiny seeded random ViT/14 (6 blocks, 64-d), CLS",
        license="none (random weights)",
    ),
    EncoderSpec(
        name="test-vit-reg",
        arch="test_vit",
        # Virchow2-like in miniature: register tokens, SwiGLU, CLS + mean patch token.
        kwargs=dict(img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=2,
                    init_values=1e-5, reg_tokens=4, mlp_ratio=5.3375, mlp_layer=_SWIGLU,
                    act_layer=_SILU, global_pool="", num_classes=0),
        dim=96, output="cls+mean", precision="bf16", mpp=0.5, seed=2,
        description="tiny seeded random ViT/16 with 4 register tokens (48-d), CLS+mean 96-d",
        license="none (random weights)",
    ),
    EncoderSpec(
        name="test-convnext",
        arch="test_convnext2",
        kwargs=dict(num_classes=0),
        dim=128, output="pooled", precision="fp32", mpp=0.5, seed=3,
        description="tiny seeded random ConvNeXt, pooled 128-d",
        license="none (random weights)",
    ),
)

# Shapes for engine benchmarks (no published weights: use ``weights: random``).
BENCH: tuple[EncoderSpec, ...] = (
    EncoderSpec(
        name="bench-vit-s16",
        arch="vit_small_patch16_224",
        kwargs=dict(img_size=224, num_classes=0),
        dim=384, output="cls", precision="bf16", mpp=0.5,
        description="ViT-S/16 (22M) for CPU engine benchmarks; random weights only",
        license="none (random weights)",
    ),
)

BUILTIN: tuple[EncoderSpec, ...] = PUBLISHED + TEST + BENCH
