"""The streaming shard reader: exactly-once splits, determinism, resume, equal mode, zipping."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fusedist.data import (
    Cursor,
    DatasetMismatchError,
    ShardError,
    ShardHashError,
    ShardReader,
    decode_sample,
    split_member,
)
from tests.s3util import moto_server, s3_bucket  # noqa: F401

SIZES = [7, 23, 12, 9, 16]  # uneven on purpose; 67 samples, not a multiple of 4 slots


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tf.addfile(info, io.BytesIO(data))


def _samples(i: int, n: int, kind: str, rename: tuple[int, int] | None):
    for j in range(n):
        key = f"s{i}/{j * 224}_0" if (i, j) != rename else f"s{i}/renamed_0"
        if kind == "tiles":
            meta = {"slide_id": f"s{i}", "x": j * 224, "y": 0, "n": i * 1000 + j}
            yield key, {"lo.jpg": _jpeg(i * 1000 + j), "meta.json": json.dumps(meta).encode()}
        else:
            npy = io.BytesIO()
            np.save(npy, np.full((4,), i * 1000 + j, dtype=np.float32))
            yield key, {"t.npy": npy.getvalue()}


def make_dataset(root: Path, sizes: list[int], kind: str = "tiles",
                 rename: tuple[int, int] | None = None, indexed: bool = False) -> str:
    """A dataset folder per docs/formats.md: one slide per shard, manifest written last.

    ``kind="feats"`` writes mirrored feature shards (``t.npy`` holding the sample's number);
    ``rename=(shard, sample)`` changes one key there, to break the mirror. ``indexed``: written
    as the stages write them (``shards.write_shard``: with an index); else a plain USTAR tar
    without one, as shards written before indexes existed.
    """
    from fusedist import shards as shard_io

    root.mkdir(parents=True)
    shards = []
    for i, n in enumerate(sizes):
        name = f"shard-{i:06d}.tar"
        if indexed:
            info = shard_io.write_shard(str(root / name), _samples(i, n, kind, rename))
            shards.append({"name": name, "slide_id": f"s{i}", **info})
            continue
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for key, members in _samples(i, n, kind, rename):
                for ext, data in members.items():
                    _add(tf, f"{key}.{ext}", data)
        sha = hashlib.sha256((root / name).read_bytes()).hexdigest()
        shards.append({"name": name, "slide_id": f"s{i}", "samples": n, "sha256": sha})
    manifest = {"format": "fusedist.tiles/1", "dataset": "demo", "mode": "grid", "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def all_keys(sizes: list[int]) -> set[str]:
    return {f"s{i}/{j * 224}_0" for i, n in enumerate(sizes) for j in range(n)}


def load(reader: ShardReader, workers: int = 2, batch: int = 4, stop_after: int | None = None):
    """Batches from a real DataLoader (workers interleave round-robin), optionally stopped early."""
    out = []
    for b in DataLoader(reader, batch_size=batch, num_workers=workers):
        out.append(b)
        if stop_after is not None and len(out) == stop_after:
            break
    return out


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def per_slot(batches) -> dict[int, list[tuple[int, str]]]:
    slots: dict[int, list[tuple[int, str]]] = {}
    for b in batches:
        for s, i, k in zip(b["__slot__"].tolist(), b["__index__"].tolist(), b["__key__"]):
            slots.setdefault(s, []).append((i, k))
    return slots


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> str:
    return make_dataset(tmp_path_factory.mktemp("ds") / "tiles", SIZES)


def test_split_member_key_is_up_to_first_dot_of_basename():
    assert split_member("s1/10_20.lo.jpg") == ("s1/10_20", "lo.jpg")
    assert split_member("s1/10_20.meta.json") == ("s1/10_20", "meta.json")


@pytest.mark.parametrize("sizes", [SIZES, [30, 11]], ids=["5-shards", "fewer-shards-than-slots"])
def test_every_sample_exactly_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, sizes):
    url = make_dataset(tmp_path / "tiles", sizes)
    rank0_keys = []
    for epoch in (0, 3):  # (with seed 7, epochs 0 and 1 happen to start with the same shards)
        batches = []
        for rank in (0, 1):
            reader = ShardReader(url, seed=7, epoch=epoch, rank=rank, world_size=2,
                                 shuffle_buffer=8)
            batches += load(reader)
            if rank == 0:
                rank0_keys.append(set(keys_of(batches)))
        keys = keys_of(batches)
        assert Counter(keys).most_common(1)[0][1] == 1, "a sample was yielded twice"
        assert set(keys) == all_keys(sizes)
        slots = per_slot(batches)
        # All 4 slots work, also with 2 shards: the split cuts samples, not shards.
        assert sorted(slots) == [0, 1, 2, 3]
        assert max(len(v) for v in slots.values()) - min(len(v) for v in slots.values()) <= 1
        for v in slots.values():  # each slot's positions run 0..n-1 in yield order
            assert [i for i, _ in v] == list(range(len(v)))
    if len(sizes) > 2:  # (two shards keep their order in half the epochs)
        # The shard order is reshuffled per epoch, so a rank does not see the same slides again.
        assert rank0_keys[0] != rank0_keys[1]


def test_order_is_deterministic_per_seed_and_epoch_and_shuffled(tiles):
    def order(seed: int, epoch: int) -> list[str]:
        return [s["__key__"] for s in ShardReader(tiles, seed=seed, epoch=epoch, rank=0,
                                                  world_size=1)]

    first = order(3, 0)
    assert order(3, 0) == first
    assert order(3, 1) != first
    assert order(4, 0) != first
    assert sorted(first) == sorted(all_keys(SIZES))
    manifest_order = [k for s in ShardReader(tiles, shuffle=False, rank=0, world_size=1)
                      for k in [s["__key__"]]]
    assert manifest_order[:SIZES[0]] == [f"s0/{j * 224}_0" for j in range(SIZES[0])]
    assert first != manifest_order
    # set_epoch changes the next iteration, as DistributedSampler.set_epoch does.
    reader = ShardReader(tiles, seed=3, rank=0, world_size=1)
    reader.set_epoch(1)
    assert [s["__key__"] for s in reader] == order(3, 1)


def test_shard_subset_reads_only_those_shards_exactly_once_across_ranks(tiles):
    """``shards=`` (distill's train/validation split): only the named shards, every sample of
    them once over the ranks (equal=False), the full set's fingerprint when all are named."""
    picked = ["shard-000003.tar", "shard-000001.tar"]
    keys = [k for rank in (0, 1)
            for k in keys_of(load(ShardReader(tiles, shuffle=False, rank=rank, world_size=2,
                                              shards=picked)))]
    assert sorted(keys) == sorted(k for k in all_keys(SIZES) if k.split("/")[0] in {"s1", "s3"})
    assert len(keys) == len(set(keys)) == SIZES[1] + SIZES[3]
    sub = ShardReader(tiles, rank=0, world_size=1, shards=picked)
    assert [s.name for s in sub.shards] == sorted(picked)  # manifest order, not the caller's
    everything = [f"shard-{i:06d}.tar" for i in range(len(SIZES))]
    assert (ShardReader(tiles, rank=0, world_size=1, shards=everything).fingerprint
            == ShardReader(tiles, rank=0, world_size=1).fingerprint != sub.fingerprint)
    with pytest.raises(DatasetMismatchError, match="lacks 1 selected shard.*shard-000099.tar"):
        ShardReader(tiles, rank=0, world_size=1, shards=["shard-000099.tar"])


def test_resume_from_cursor_neither_repeats_nor_skips(tiles):
    seed, epoch = 11, 2
    full = []
    for rank in (0, 1):
        full += load(ShardReader(tiles, seed=seed, epoch=epoch, rank=rank, world_size=2,
                                 shuffle_buffer=6))
    full_slots = per_slot(full)

    # Interrupted run: each rank consumes a different number of batches, then "crashes".
    consumed, cursors = [], []
    for rank, n_batches in ((0, 3), (1, 6)):
        reader = ShardReader(tiles, seed=seed, epoch=epoch, rank=rank, world_size=2,
                             shuffle_buffer=6)
        cursor = reader.cursor(num_workers=2)
        got = load(reader, stop_after=n_batches)
        for b in got:
            cursor.update(b)
        consumed += got
        cursors.append(cursor)
    saved = json.loads(json.dumps(Cursor.merge(cursors).to_dict()))  # as in a checkpoint
    assert sum(saved["consumed"]) == len(keys_of(consumed)) == 9 * 4

    remaining, finals = [], []
    for rank in (0, 1):
        cursor = Cursor.from_dict(saved)
        reader = ShardReader(tiles, seed=seed, rank=rank, world_size=2, shuffle_buffer=6,
                             cursor=cursor)
        got = load(reader)
        for b in got:  # the resumed job keeps updating the loaded cursor
            cursor.update(b)
        remaining += got
        finals.append(cursor)

    keys = keys_of(consumed) + keys_of(remaining)
    assert Counter(keys).most_common(1)[0][1] == 1, "a consumed sample was repeated"
    assert set(keys) == all_keys(SIZES), "a sample was skipped"
    # Each slot continues exactly where the uninterrupted run would have been.
    rest = per_slot(remaining)
    for slot, seq in full_slots.items():
        done = saved["consumed"][slot]
        assert rest.get(slot, []) == seq[done:], f"slot {slot} diverged after {done}"
    assert Cursor.merge(finals).total() == sum(SIZES)


def test_cursor_rejects_other_world_gaps_and_other_settings(tiles):
    reader = ShardReader(tiles, rank=0, world_size=2)
    cursor = reader.cursor(num_workers=2)
    cursor.consumed[0] = 3
    with pytest.raises(ValueError, match="2 ranks x 2 loader workers.*3 ranks"):
        ShardReader(tiles, rank=0, world_size=3, cursor=cursor)
    with pytest.raises(ValueError, match="2 ranks x 2 loader workers.*2 ranks x 1 workers"):
        list(ShardReader(tiles, rank=0, world_size=2, cursor=cursor))  # no DataLoader: W=1
    with pytest.raises(ValueError, match="another dataset or other reader settings"):
        ShardReader(tiles, seed=1, rank=0, world_size=2, cursor=cursor)
    sample = next(iter(ShardReader(tiles, rank=0, world_size=2)))
    with pytest.raises(ValueError, match="feed every batch"):
        reader.cursor(num_workers=2).update({**sample, "__index__": 1})  # position 0 missing


def test_equal_mode_gives_every_rank_the_same_count(tiles):
    counts, keys = [], []
    for rank in (0, 1):
        reader = ShardReader(tiles, seed=5, equal=True, rank=rank, world_size=2)
        got = keys_of(load(reader))
        counts.append(len(got))
        keys += got
        assert reader.num_samples(num_workers=2) == len(got)
    assert counts == [2 * (sum(SIZES) // 4)] * 2  # 67 samples -> 16 per slot, 3 dropped
    assert len(set(keys)) == len(keys)
    # Without equal mode the ranks differ here (67 = 16 + 17 + 17 + 17).
    plain = [ShardReader(tiles, rank=r, world_size=2).num_samples(2) for r in (0, 1)]
    assert plain == [33, 34]


def test_parallel_datasets_zip_by_key_and_decode(tmp_path, tiles):
    feats = make_dataset(tmp_path / "feats", SIZES, kind="feats")
    reader = ShardReader([tiles, feats], seed=1, rank=0, world_size=1, decode=decode_sample)
    seen = 0
    for s in reader:
        n = s["meta.json"]["n"]
        assert s["__key__"] == f"s{n // 1000}/{(n % 1000) * 224}_0"
        assert float(s["t.npy"][0]) == n  # the feature row belongs to this tile
        assert s["lo.jpg"].shape == (3, 8, 8) and s["lo.jpg"].dtype == torch.uint8
        seen += 1
    assert seen == sum(SIZES)


def test_parallel_key_mismatch_fails_naming_both_shards_and_keys(tmp_path, tiles):
    feats = make_dataset(tmp_path / "feats", SIZES, kind="feats", rename=(3, 4))
    reader = ShardReader([tiles, feats], rank=0, world_size=1)
    with pytest.raises(DatasetMismatchError) as e:
        list(reader)
    msg = str(e.value)
    assert "'s3/896_0'" in msg and "'s3/renamed_0'" in msg
    assert f"{tiles}/shard-000003.tar" in msg and f"{feats}/shard-000003.tar" in msg
    short = make_dataset(tmp_path / "short", SIZES[:4], kind="feats")
    with pytest.raises(DatasetMismatchError, match="lacks 1 shard.*shard-000004.tar"):
        ShardReader([tiles, short], rank=0, world_size=1)


def test_truncated_shard_raises_naming_shard_and_position(tmp_path):
    url = make_dataset(tmp_path / "tiles", [6, 5])
    path = Path(url) / "shard-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 700])  # cut inside a member
    with pytest.raises(ShardError, match=r"shard-000001\.tar: corrupt or truncated at sample \d"
                       ) as e:
        list(ShardReader(url, rank=0, world_size=1))
    assert len(re.findall(r"'s1/\d+_0'", str(e.value))) == 1  # one last key, not two
    path.write_bytes(data)
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 8  # the manifest promises more than the shard holds
    (Path(url) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: ends at sample 6 .* lists 8"):
        list(ShardReader(url, rank=0, world_size=1))


def test_reads_shards_from_s3_through_storage(tmp_path, s3_bucket):
    from fusedist import storage

    local = make_dataset(tmp_path / "tiles", [9, 14], indexed=True)
    url = storage.join(s3_bucket, "tiles/demo")
    for p in sorted(Path(local).iterdir()):
        storage.upload_file(p, storage.join(url, p.name))
    # A read opened mid-object is one ranged GET from there (what indexed pieces do).
    data = (Path(local) / "shard-000001.tar").read_bytes()
    with storage.open_read(storage.join(url, "shard-000001.tar"), start=1536) as f:
        assert f.read(700) == data[1536:2236] and f.seek(0) == 0 and f.read(10) == data[:10]
    keys = []
    for rank in (0, 1):  # loader workers open their own clients (storage keys them by pid)
        keys += keys_of(load(ShardReader(url, seed=2, rank=rank, world_size=2)))
    assert sorted(keys) == sorted(all_keys([9, 14]))


def test_resume_at_every_position_yields_exactly_the_tail(tiles, monkeypatch):
    from fusedist import storage

    reader = ShardReader(tiles, seed=9, epoch=4, rank=0, world_size=1, shuffle_buffer=10,
                         interleave=3)
    full = [s["__key__"] for s in reader]
    opened: list[str] = []
    real_open = storage.open_read
    monkeypatch.setattr(storage, "open_read", lambda u: opened.append(u) or real_open(u))
    for done in range(len(full) + 1):
        cursor = reader.cursor()
        cursor.consumed[0] = done
        opened.clear()
        rest = [s["__key__"] for s in ShardReader(tiles, seed=9, rank=0, world_size=1,
                                                  shuffle_buffer=10, interleave=3,
                                                  cursor=cursor.to_dict())]
        assert rest == full[done:], f"resume after {done} diverged"
        # Only shards that still hold an unconsumed sample are opened, each once.
        shards = sorted(u.rsplit("/", 1)[1] for u in opened if u.endswith(".tar"))
        assert shards == sorted({f"shard-{int(k.split('/')[0][1:]):06d}.tar" for k in rest})


def flip_member_byte(path: Path, member_suffix: str) -> str:
    """Flip one byte in the middle of the first member ending in ``member_suffix`` (the tar stays
    well-formed: headers and sizes are untouched); returns the member's name."""
    with tarfile.open(path) as tf:
        info = next(m for m in tf.getmembers() if m.name.endswith(member_suffix))
    data = bytearray(path.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x55
    path.write_bytes(bytes(data))
    return info.name


def test_changed_shard_bytes_fail_with_both_hashes(tmp_path, tiles):
    """The distill reader hashes feature and tile shards as they stream (no second read)."""
    feats = make_dataset(tmp_path / "feats", SIZES, kind="feats")
    path = Path(feats) / "shard-000002.tar"
    listed = json.loads((Path(feats) / "manifest.json").read_text())["shards"][2]["sha256"]
    flip_member_byte(path, ".t.npy")
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ShardHashError) as e:
        list(ShardReader([tiles, feats], rank=0, world_size=1, shuffle=False))
    assert str(path) in str(e.value) and got in str(e.value) and listed in str(e.value)
    # A slot that reads the shard to its end checks it even when it starts mid-shard.
    with pytest.raises(ShardHashError, match="shard-000002.tar"):
        for r in range(4):
            list(ShardReader([tiles, feats], rank=r, world_size=4, shuffle=False))


def _count_reads(monkeypatch) -> dict[str, dict]:
    """Record, per opened shard, where each read started and how many bytes were read."""
    from fusedist import storage

    real_open, seen = storage.open_read, {}

    class Counting(io.RawIOBase):
        def __init__(self, f, rec):
            self.f, self.rec = f, rec

        def readable(self):
            return True

        def readinto(self, b):
            n = self.f.readinto(b)
            self.rec["bytes"] += n
            return n

        def close(self):
            self.f.close()
            super().close()

    def opened(url, start=0):
        f = real_open(url, start)
        if not url.endswith(".tar"):
            return f
        rec = seen.setdefault(url.rsplit("/", 1)[1], {"starts": [], "bytes": 0})
        rec["starts"].append(start)
        return io.BufferedReader(Counting(f, rec))

    monkeypatch.setattr(storage, "open_read", opened)
    return seen


def _shard_and_sample(key: str) -> tuple[str, int]:
    slide, xy = key.split("/")
    return f"shard-{int(slide[1:]):06d}.tar", int(xy[:-2]) // 224


def test_indexed_shards_resume_reading_only_what_is_still_needed(tmp_path, monkeypatch):
    """With shard indexes a resumed slot starts each shard at the first sample it still needs
    (a ranged read) and jumps long runs of samples it already yielded, yields exactly what an
    unindexed dataset yields, and reads less."""
    sizes = [120, 150, 90]
    plain = make_dataset(tmp_path / "plain", sizes)
    indexed = make_dataset(tmp_path / "indexed", sizes, indexed=True)
    # Samples a shuffle buffer still holds at a resume lie far apart in a shard: old ones are
    # rare, so the gaps between them grow past JUMP_SAMPLES.
    kw = dict(seed=3, rank=0, world_size=1, shuffle_buffer=60, interleave=2)
    full = [s["__key__"] for s in ShardReader(indexed, **kw)]
    assert full == [s["__key__"] for s in ShardReader(plain, **kw)]
    offsets = {n: json.loads((Path(indexed) / f"{n}.idx.json").read_text())["offsets"]
               for n in (f"shard-{i:06d}.tar" for i in range(len(sizes)))}
    seen = _count_reads(monkeypatch)
    jumps = 0
    for done in (0, 40, 130, 200, 290, len(full) - 1):
        cursor = {"epoch": 0, "world": [1, 1], "consumed": [done]}
        seen.clear()
        rest = [s["__key__"] for s in ShardReader(indexed, cursor=cursor, **kw)]
        assert rest == full[done:], f"resume after {done} diverged"
        indexed_bytes = sum(r["bytes"] for r in seen.values())
        needed: dict[str, set[int]] = {}
        for k in rest:
            shard, j = _shard_and_sample(k)
            needed.setdefault(shard, set()).add(j)
        assert set(seen) == set(needed)  # only shards that still owe a sample are opened
        for shard, rec in seen.items():
            # The first read starts at the first sample still needed; every later one (a
            # jump) at another needed sample.
            assert rec["starts"][0] == offsets[shard][min(needed[shard])]
            assert set(rec["starts"]) <= {offsets[shard][j] for j in needed[shard]}
            jumps += len(rec["starts"]) - 1
        seen.clear()
        assert [s["__key__"] for s in ShardReader(plain, cursor=cursor, **kw)] == rest
        if 0 < done < len(full) - 1:
            assert indexed_bytes < sum(r["bytes"] for r in seen.values())
    assert jumps > 0


def test_indexed_reads_verify_every_sample_and_the_index(tmp_path):
    """Reading from mid-shard never hashes the whole file: each sample is checked against the
    index's digest instead, and the index against the manifest."""
    tiles = make_dataset(tmp_path / "tiles", [10, 10], indexed=True)
    feats = make_dataset(tmp_path / "feats", [10, 10], kind="feats", indexed=True)
    # 4 slots of 5: slots 1 and 3 start mid-shard (sample 5) and read through the index.
    keys = [k for r in range(4) for k in keys_of([{"__key__": [s["__key__"] for s in
            ShardReader([tiles, feats], rank=r, world_size=4, shuffle=False)]}])]
    assert sorted(keys) == sorted(all_keys([10, 10]))
    path = Path(feats) / "shard-000001.tar"
    name = flip_member_byte_at(path, 7, ".t.npy")  # sample 7: read by slot 3 via the index
    with pytest.raises(ShardHashError, match=r"shard-000001\.tar: sample 7 \('s1/1568_0'\) "
                       r"differs from the digest its index recorded"):
        list(ShardReader([tiles, feats], rank=3, world_size=4, shuffle=False))
    assert name == "s1/1568_0.t.npy"
    idx = Path(feats) / "shard-000000.tar.idx.json"
    idx.write_text(idx.read_text().replace('"offsets":[0,', '"offsets":[512,'))
    with pytest.raises(ShardHashError, match=r"shard-000000\.tar\.idx\.json: sha256 is .* the "
                       r"index changed"):
        list(ShardReader([tiles, feats], rank=1, world_size=4, shuffle=False))
    idx.unlink()
    with pytest.raises(ShardError, match=r"shard-000000\.tar\.idx\.json: missing"):
        list(ShardReader([tiles, feats], rank=1, world_size=4, shuffle=False))


def flip_member_byte_at(path: Path, sample: int, member_suffix: str) -> str:
    """:func:`flip_member_byte` on the ``sample``-th member ending in ``member_suffix``."""
    with tarfile.open(path) as tf:
        info = [m for m in tf.getmembers() if m.name.endswith(member_suffix)][sample]
    data = bytearray(path.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x55
    path.write_bytes(bytes(data))
    return info.name
