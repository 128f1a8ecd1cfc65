"""GPU tier (`pytest -m gpu`, `make test-all`): runs only where CUDA is; CI deselects it.

No GPU was lent to the session that wrote these; they check the CUDA paths against the CPU
reference the default tier already verifies.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tier needs CUDA; run it on a GPU machine (make test-all there)")


def test_encoder_embed_on_cuda_matches_cpu_within_bf16():
    from fusedist.models import build_encoder

    x = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    for name in ("test-vit", "test-vit-reg", "test-convnext"):
        cpu = build_encoder(name).embed(x).float()
        gpu = build_encoder(name, device="cuda").embed(x.cuda()).float().cpu()
        cos = torch.nn.functional.cosine_similarity(cpu, gpu, dim=-1)
        assert cos.min() > 0.99, (name, cos.min())


def test_engine_on_cuda_matches_cpu(ray_cluster, tmp_path):
    from fusedist.features.engine.core import EngineSpec, PoolSpec
    from tests.test_cache import run_engine_collect
    from tests.slides import make_known_slide
    from tests.test_tiling import tile_cfg
    from fusedist.tiling import run_tile

    make_known_slide(tmp_path / "s.tiff", width=3584, height=2688, mpp=0.5)
    run_tile(tile_cfg(tmp_path / "s.tiff", tmp_path / "t", mode="grid"), progress=False)
    tiles = tmp_path / "t" / "default"
    m = json.loads((tiles / "manifest.json").read_text())
    shards = [(s["name"], s["samples"]) for s in m["shards"]]
    out = {}
    for device, gpus in (("cpu", 0.0), ("cuda", 1.0)):
        spec = EngineSpec(tiles_url=str(tiles), mode="grid", image_key="img.jpg", tile_px=224,
                          chunk=64, encoders=(("test-vit", None),), device=device,
                          staging=str(tmp_path / "parts"))
        res, _ = run_engine_collect(spec, shards, PoolSpec(1, 1, gpus, 1.0, 0.25))
        out[device] = np.concatenate([res[n]["test-vit"][:, 0] for n in sorted(res)])
    a, b = torch.from_numpy(out["cpu"]), torch.from_numpy(out["cuda"])
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_fuse_heads_train_on_cuda_like_cpu(tmp_path):
    """Fold heads on the GPU (device=cuda in-process, no Ray): every method scores, and the
    experts' held-out AUC is close to the CPU run of the same seeds."""
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import load_cohort, make_folds
    from fusedist.fusion.fold import run_fold
    from fusedist.fusion.metrics import classification_metrics
    from fusedist.synth.cohort import synthetic_cohort

    c = synthetic_cohort(str(tmp_path / "c"), num_slides=36, tiles=(24, 48), seed=5)
    out = {}
    for device in ("cpu", "cuda"):
        cfg = FuseConfig(bags=c.bags, labels=c.labels, folds=3, inner_folds=2, device=device,
                         methods=["logitprod", "mean_ensemble", "concat", "meta"],
                         experts={"epochs": 10, "hidden": 128}, meta={"epochs": 4},
                         mlflow={"enabled": False})
        co = load_cohort(cfg)
        folds = make_folds(co, np.arange(len(co.slide_ids)), 3, 0)
        r = run_fold(co, cfg, folds, 0, [], None, None)
        out[device] = {m: classification_metrics(co.y[r.test_idx], p)["auc"]
                       for m, p in r.preds.items()}
    assert set(out["cpu"]) == set(out["cuda"])
    for m, auc in out["cuda"].items():
        assert np.isfinite(auc), m
        if m.startswith("expert."):
            assert abs(auc - out["cpu"][m]) < 0.15, (m, auc, out["cpu"][m])
