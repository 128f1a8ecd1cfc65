"""Deterministic WebDataset shard writing: the bytes ``webdataset.TarWriter`` writes.

A shard's bytes depend only on its samples: every tar member has mtime 0, uid/gid 0 and mode
0644, so a re-run (or a resumed run) reproduces a shard byte for byte and its sha256 can be
compared. Shards are written through :func:`fusedist.storage.open_write` and so appear whole
or not at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import IO, Iterable, Mapping

from fusedist import storage
from fusedist.formats.slide_ids import decode_id, encode_id

SHARD_PATTERN = "{slide_id}-{part:06d}.tar"


def shard_name(slide_id: str, part: int) -> str:
    """A tile shard's name: its slide and its part of that slide, nothing else.

    The name never depends on which other slides exist, failed or were added, so a re-run
    over a changed slide set leaves every still-valid shard (and the feature shards that
    mirror it by name) untouched. The id is encoded for file names
    (:func:`fusedist.formats.slide_ids.encode_id`: no '/') and the suffix has a fixed form, so
    a name parses back to one (slide, part) pair (:func:`shard_slide_id`).
    """
    return SHARD_PATTERN.format(slide_id=encode_id(slide_id), part=part)


def shard_slide_id(name: str) -> str:
    """The slide id of a tile shard named by :func:`shard_name`."""
    return decode_id(name.removesuffix(".tar").rsplit("-", 1)[0])


class _HashingWriter(io.RawIOBase):
    """Pass-through writer that counts bytes and hashes them on the way out."""

    def __init__(self, sink: IO[bytes]):
        self.sink = sink
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        self.sink.write(b)
        return len(b)


def encode_member(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return (json.dumps(value, sort_keys=True, separators=(",", ":"))).encode("utf-8")


INDEX_FORMAT = "fusedist.shard-index/1"


def index_url(shard_url: str) -> str:
    """Where a shard's index lives: beside it, ``<name>.tar.idx.json``."""
    return shard_url + ".idx.json"


def sample_digest(key: str, members: Mapping[str, bytes]) -> str:
    """A sample's content digest as its shard's index records it: its key and each member's
    extension and bytes, in sorted extension order (what a reader extracts from the tar)."""
    h = hashlib.sha256(key.encode("utf-8") + b"\0")
    for ext in sorted(members):
        data = members[ext]
        h.update(f"{ext}\0{len(data)}\0".encode("utf-8"))
        h.update(data)
    return h.hexdigest()[:32]


def write_tar(fileobj: IO[bytes], samples: Iterable[tuple[str, Mapping[str, object]]],
              index: list[tuple[int, str]] | None = None) -> int:
    """Write ``(key, {ext: value})`` samples to ``fileobj`` as a deterministic tar; returns the
    number of samples. Members of a sample are written in sorted extension order. ``index``
    receives each sample's ``(byte offset of its first header, sample_digest)``.

    The bytes are exactly ``webdataset.TarWriter(fileobj, user="", group="", mode=0o644,
    mtime=0, encoder=False, compress=False)``'s (tests/test_shards.py compares them), written
    here with the stdlib ``tarfile`` that TarWriter itself uses: importing the ``webdataset``
    package imports torch, ~3 CPU-seconds in every tile task and finisher process that writes
    a shard. Fixed mtime, mode and (empty) owner names keep the bytes a function of the samples.
    """
    n = 0
    with tarfile.open(fileobj=fileobj, mode="w|") as tar:
        for key, members in samples:
            # TarWriter drops metadata entries ("__key__", "_x").
            written = {ext: encode_member(members[ext]) for ext in sorted(members)
                       if not ext.startswith("_")}
            if index is not None:  # tar.offset: where this sample's first header starts
                index.append((tar.offset, sample_digest(key, written)))
            for ext, data in written.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def write_shard(url: str, samples: Iterable[tuple[str, Mapping[str, object]]]) -> dict:
    """Write a shard atomically to ``url``, then its index (:func:`index_url`: each sample's
    byte offset and content digest, so a reader can start mid-shard with a ranged read and
    still verify every sample it yields); returns ``{samples, bytes, sha256, index_sha256}``."""
    index: list[tuple[int, str]] = []
    with storage.open_write(url) as f:
        hw = _HashingWriter(f)
        n = write_tar(hw, samples, index)
    sha = hw.sha.hexdigest()
    doc = {"format": INDEX_FORMAT, "shard_sha256": sha, "bytes": hw.nbytes,
           "offsets": [o for o, _ in index], "digests": [d for _, d in index]}
    data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    storage.write_bytes(index_url(url), data)
    return {"samples": n, "bytes": hw.nbytes, "sha256": sha,
            "index_sha256": hashlib.sha256(data).hexdigest()}


def listed_shards(dataset_url: str) -> dict[str, bool]:
    """{shard name: whether its index is there too} for the shards under ``dataset_url``, from
    one listing (see :func:`shard_written`)."""
    names = storage.listdir(dataset_url)
    indexed = {n[: -len(".idx.json")] for n in names if n.endswith(".tar.idx.json")}
    return {n: n in indexed for n in names if n.endswith(".tar")}


def shard_written(name: str, entry: dict, listed: dict[str, bool]) -> bool:
    """Whether the shard ``name`` of done-entry ``entry`` is whole on storage: listed, with its
    index if the entry records one. A re-run trusts an entry only then; one whose index file
    is gone is redone (the reader would refuse the shard)."""
    return name in listed and (listed[name] or "index_sha256" not in entry)


def delete_shard(url: str) -> None:
    """Remove a shard and its index (either may be missing)."""
    storage.delete(url)
    storage.delete(index_url(url))


def sha256_of(url: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
