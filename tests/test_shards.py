"""Tile and feature shards are WebDataset's format (the bytes ``webdataset.TarWriter`` writes),
with bytes fixed by their samples, and ``webdataset.WebDataset`` streams them, local and s3://."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from fusedist import shards, storage
from fusedist.data.reader import iter_tar_samples, split_member
from fusedist.features.cache import npy_bytes
from tests.s3util import moto_server, s3_bucket  # noqa: F401  (fixtures)

# sha256 of _fixed_samples() as shards were written before TarWriter (tarfile, PAX, mtime 0,
# uid/gid 0, mode 0644, empty owner names): the switch must not change a single byte, or
# every resumed job would see its finished shards as changed.
FIXED_SHA256 = "7baafb9d13c3cf62dfbbb1dd760cab17618711c3ec359f594d116d4732fb8994"


def _fixed_samples():
    return [(f"slide.a/{i * 224}_{i * 448}", {"img.jpg": bytes(range(256)) * (i + 1),
             "meta.json": {"i": i, "x": i * 224, "slide_id": "slide.a"},
             "test-vit.npy": b"\x93NUMPY" + bytes(i)}) for i in range(5)]


def test_shard_bytes_are_fixed_by_the_samples(tmp_path: Path) -> None:
    buf = io.BytesIO()
    assert shards.write_tar(buf, _fixed_samples()) == 5
    assert hashlib.sha256(buf.getvalue()).hexdigest() == FIXED_SHA256
    info = shards.write_shard(str(tmp_path / "a.tar"), _fixed_samples())
    again = shards.write_shard(str(tmp_path / "b.tar"), _fixed_samples())
    index_bytes = (tmp_path / "a.tar.idx.json").read_bytes()
    assert info == again == {"samples": 5, "bytes": len(buf.getvalue()), "sha256": FIXED_SHA256,
                             "index_sha256": hashlib.sha256(index_bytes).hexdigest()}
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["slide.a/0_0.img.jpg", "slide.a/0_0.meta.json",
                                             "slide.a/0_0.test-vit.npy"]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == \
        {(0, 0o644, 0, 0, "", "")}


def test_shard_bytes_are_webdatasets_own_tarwriter_bytes() -> None:
    """``write_tar`` skips importing webdataset (it imports torch) but writes exactly what
    ``webdataset.TarWriter`` writes with the same settings, PAX headers of long keys included."""
    import webdataset as wds

    samples = _fixed_samples() + [("s/" + "k" * 150, {"img.jpg": b"x" * 700, "_meta": b"m"}),
                                  ("slide-é/1_2", {"a.npy": b"", "meta.json": "é"})]
    ours, theirs = io.BytesIO(), io.BytesIO()
    shards.write_tar(ours, samples)
    with wds.TarWriter(theirs, user="", group="", mode=0o644, mtime=0, encoder=False,
                       compress=False) as tar:
        for key, members in samples:
            tar.write({"__key__": key, **{e: shards.encode_member(v) for e, v in members.items()}})
    assert ours.getvalue() == theirs.getvalue()
    assert len(ours.getvalue()) > 5 * 1024


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_dataset(root: str) -> tuple[list[str], list[str], dict]:
    """Two tile shards (pairs: hi/lo JPEG + meta) and the feature shards mirroring them, as
    `fusedist tile` / `fusedist cache` write them; returns both URL lists and the samples."""
    rng = np.random.default_rng(0)
    tiles, feats, want = [], [], {}
    for s, slide in enumerate(["TCGA-01-x", "TCGA-02"]):
        samples = {}
        for i in range(3):
            x, y = 896 * i, 448 * s
            samples[f"{slide}/{x}_{y}"] = {
                "hi.jpg": _jpeg(10 * s + i), "lo.jpg": _jpeg(100 + 10 * s + i),
                "meta.json": {"slide_id": slide, "x": x, "y": y, "tile_mpp": 0.5}}
        name = shards.shard_name(slide, 0)
        tiles.append(storage.join(root, "tiles", name))
        shards.write_shard(tiles[-1], samples.items())
        fsamples = {k: {"test-vit.npy": npy_bytes(rng.standard_normal(16).astype(np.float16))}
                    for k in samples}
        feats.append(storage.join(root, "features", name))
        shards.write_shard(feats[-1], fsamples.items())
        for k in samples:
            want[k] = {ext: shards.encode_member(v)
                       for ext, v in {**samples[k], **fsamples[k]}.items()}
    return tiles, feats, want


def _check_webdataset(root: str) -> None:
    import webdataset as wds

    tiles, feats, want = _write_dataset(root)
    got: dict[str, dict[str, bytes]] = {}
    for urls in (tiles, feats):
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=True):
            assert sample["__url__"] in urls
            got.setdefault(sample["__key__"], {}).update(
                {k: v for k, v in sample.items() if not k.startswith("__")})
    assert got == want  # every sample, every member, byte for byte
    # ... and in the same order and bytes as fusedist's own reader sees them.
    ours = [(k, m) for u in tiles for k, m in iter_tar_samples(u)]
    assert [k for k, _ in ours] == [k for k in want if "hi.jpg" in want[k]]
    assert all(m == {e: want[k][e] for e in m} for k, m in ours)
    # A user's pipeline: decode images and features with WebDataset's own decoders.
    ds = wds.WebDataset(tiles, shardshuffle=False).decode("rgb").to_tuple("hi.jpg", "meta.json")
    first_img, first_meta = next(iter(ds))
    assert first_img.shape == (32, 32, 3) and first_meta["slide_id"] == "TCGA-01-x"
    vec = next(iter(wds.WebDataset(feats, shardshuffle=False).decode()))["test-vit.npy"]
    np.testing.assert_array_equal(vec, np.load(io.BytesIO(want["TCGA-01-x/0_0"]["test-vit.npy"])))
    json.loads(want["TCGA-02/0_448"]["meta.json"])  # meta is plain JSON


def test_webdataset_reads_local_shards(tmp_path: Path) -> None:
    _check_webdataset(str(tmp_path))


def test_webdataset_reads_s3_shards_through_the_registered_opener(s3_bucket: str) -> None:
    storage.register_webdataset_opener()
    _check_webdataset(f"{s3_bucket}/data")


def test_shard_index_points_at_each_samples_first_header_and_digests_it(tmp_path: Path) -> None:
    """The index beside a shard: where each sample's first tar header starts (a PAX header for
    long or unicode keys) and the digest of what a reader extracts for it."""
    samples = _fixed_samples() + [("s/" + "k" * 150, {"img.jpg": b"x" * 700, "_meta": b"m"}),
                                  ("slide-é/1_2", {"a.npy": b"", "meta.json": "é"})]
    url = str(tmp_path / "s.tar")
    info = shards.write_shard(url, samples)
    index = json.loads(Path(shards.index_url(url)).read_text())
    assert index["format"] == "fusedist.shard-index/1" and index["shard_sha256"] == info["sha256"]
    first_headers, extracted = [], []
    with tarfile.open(url) as tar:
        for m in tar.getmembers():
            key, ext = split_member(m.name)
            if not extracted or extracted[-1][0] != key:
                first_headers.append(m.offset)
                extracted.append((key, {}))
            extracted[-1][1][ext] = tar.extractfile(m).read()
    assert index["offsets"] == first_headers and len(first_headers) == 7
    assert index["digests"] == [shards.sample_digest(k, m) for k, m in extracted]
    assert len(set(index["digests"])) == 7
    shards.delete_shard(url)
    assert not list(tmp_path.iterdir())


def test_a_shard_counts_as_written_only_with_its_index(tmp_path: Path) -> None:
    url = str(tmp_path / "a.tar")
    entry = {"name": "a.tar", **shards.write_shard(url, _fixed_samples())}
    (tmp_path / "old.tar").write_bytes(b"")  # written before indexes: no index expected
    listed = shards.listed_shards(str(tmp_path))
    assert listed == {"a.tar": True, "old.tar": False}
    assert shards.shard_written("a.tar", entry, listed)
    assert shards.shard_written("old.tar", {"name": "old.tar", "sha256": "x"}, listed)
    Path(shards.index_url(url)).unlink()
    assert not shards.shard_written("a.tar", entry, shards.listed_shards(str(tmp_path)))
