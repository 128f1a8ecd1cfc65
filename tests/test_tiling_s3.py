"""`fusedist tile` against a real S3 API (moto server), with injected faults and a dead endpoint."""

from __future__ import annotations

import json

import boto3
import pytest

from fusedist import storage
from fusedist.storage import StorageError
from fusedist.tiling import run_tile
from tests.s3util import FAKE_SECRET, dead_endpoint, fault_proxy, moto_server, s3_bucket  # noqa: F401
from tests.slides import known_slides
from tests.test_tiling import tile_cfg


@pytest.fixture(scope="module")
def slides_and_reference(tmp_path_factory, ray_cluster):
    """Two slides and the shards a local run makes of them (the reference bytes)."""
    d = tmp_path_factory.mktemp("s3src")
    src = known_slides(d / "slides", 2, width=3072, height=2560)
    ref = run_tile(tile_cfg(src, d / "local", mode="grid", samples_per_shard=8), progress=False)
    return src, ref.manifest


def upload(src, bucket_url: str, endpoint: str) -> None:
    bucket = bucket_url.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=endpoint)
    for p in sorted(src.iterdir()):
        client.upload_file(str(p), bucket, f"slides/{p.name}")


def s3_cfg(bucket: str, endpoint: str, cache, **kw):
    return tile_cfg(f"{bucket}/slides", f"{bucket}/tiles", mode="grid", samples_per_shard=8,
                    **{"storage.endpoint_url": endpoint, "storage.cache_dir": str(cache), **kw})


def same_shards(manifest: dict, reference: dict) -> None:
    assert manifest["totals"]["tiles"] == reference["totals"]["tiles"] > 0
    assert [(s["name"], s["sha256"], s["samples"]) for s in manifest["shards"]] == \
        [(s["name"], s["sha256"], s["samples"]) for s in reference["shards"]]


def test_tile_s3_to_s3_matches_local(slides_and_reference, s3_bucket, moto_server, tmp_path):
    src, reference = slides_and_reference
    upload(src, s3_bucket, moto_server)
    res = run_tile(s3_cfg(s3_bucket, moto_server, tmp_path / "cache"), progress=False)
    same_shards(res.manifest, reference)
    assert res.manifest["slides"][0]["url"] == f"{s3_bucket}/slides/s0.tiff"
    # The objects are really there, and the sha256 in the manifest is of the stored bytes.
    first = res.manifest["shards"][0]
    data = storage.read_bytes(f"{s3_bucket}/tiles/default/{first['name']}")
    import hashlib
    assert hashlib.sha256(data).hexdigest() == first["sha256"]
    assert storage.exists(f"{s3_bucket}/tiles/default/thumbnails/s0.png")
    assert json.loads(storage.read_text(f"{s3_bucket}/tiles/default/manifest.json")) == \
        res.manifest
    # WebDataset streams the s3:// shard through our opener.
    import webdataset as wds
    storage.register_webdataset_opener()
    keys = [s["__key__"] for s in wds.WebDataset(
        f"{s3_bucket}/tiles/default/{first['name']}", shardshuffle=False)]
    assert len(keys) == first["samples"] and keys[0].startswith("s0/")


def test_tile_through_faulty_network_gives_identical_shards(slides_and_reference, s3_bucket,
                                                            moto_server, fault_proxy, tmp_path):
    src, reference = slides_and_reference
    upload(src, s3_bucket, moto_server)
    fault_proxy.set_faults(error_rate=0.12, drop_rate=0.08, cut_rate=0.3, seed=5)
    # The seed picks which requests fail; it must give every kind of fault on tile's request
    # sequence (seed 3 gave no cut once tile also wrote slides.csv).
    res = run_tile(s3_cfg(s3_bucket, fault_proxy.endpoint, tmp_path / "cache",
                          **{"storage.max_attempts": 10}), progress=False)
    same_shards(res.manifest, reference)
    counts = fault_proxy.counts
    assert counts["errors"] > 0 and counts["drops"] > 0 and counts["cuts"] > 0, counts


def test_dead_endpoint_fails_clearly_and_quickly(slides_and_reference, s3_bucket, tmp_path):
    with dead_endpoint() as ep:
        cfg = s3_cfg(s3_bucket, ep, tmp_path / "cache", **{"storage.max_attempts": 2,
                                                          "storage.connect_timeout": 1})
        with pytest.raises(StorageError) as e:
            run_tile(cfg, progress=False)
    msg = str(e.value)
    assert f"{s3_bucket}/tiles/default/manifest.json" in msg and ep in msg
    assert FAKE_SECRET not in msg
