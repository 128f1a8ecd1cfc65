"""Streaming shard reader for training, with a resumable cursor.

One epoch is a deterministic function of ``(seed, epoch)`` and the manifest:

1. The shards listed in ``manifest.json`` are permuted by ``rng(seed, epoch)`` and their samples
   concatenated into one global stream of ``N`` samples.
2. The stream is cut into ``R * W`` contiguous blocks, one per *slot* (rank ``r``, loader worker
   ``w``; ``slot = r * W + w``), sizes differing by at most one. Cutting samples rather than
   shards means every slot gets work even with fewer shards than slots (WebDataset's shard split
   hangs DDP there), and a slot reads only its part of a shard.
3. A slot reads up to ``interleave`` of its shard pieces round-robin (a shard is one slide, so
   this mixes slides), then a shuffle buffer seeded from ``(seed, epoch, slot)`` reorders it.

Every yielded sample carries ``__key__``, ``__shard__``, ``__epoch__``, ``__slot__`` and
``__index__`` (its position in the slot's stream). A training loop feeds the batches it has
consumed to :meth:`Cursor.update`; a reader built with that cursor replays each slot's stream
index-only (no payload kept, no decoding) and yields exactly the rest, in the same order an
uninterrupted run would have (WebDataset has no mid-epoch resume, hence this module). Shards
with an index (``fusedist.shards.index_url``) are read from the first sample a slot needs,
with ranged reads that jump what it does not; see :class:`_PieceReader`.

Typical DDP loop (``equal=True`` so every rank takes the same number of steps)::

    reader = ShardReader([tiles, feats], seed=0, equal=True, cursor=saved_or_None)
    loader = DataLoader(reader, batch_size=64, num_workers=4)  # not persistent_workers
    cursor = Cursor.from_dict(saved) if saved else reader.cursor(num_workers=4)
    for epoch in range(cursor.epoch, epochs):
        reader.set_epoch(epoch)
        for batch in loader:
            step(decode(batch)); cursor.update(batch)
            if time_to_save:  # gather every rank's cursor: each knows only its own slots
                parts = [None] * world; dist.all_gather_object(parts, cursor)
                save(client_state={"data_cursor": Cursor.merge(parts).to_dict()})
        cursor = cursor.next_epoch()
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, NoReturn, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from fusedist import shards, storage
from fusedist.formats import tile_manifest

Sample = dict[str, Any]
META_KEYS = ("__key__", "__shard__", "__epoch__", "__slot__", "__index__")


class ShardError(IOError):
    """A shard could not be read as its manifest describes (corrupt, truncated, wrong count)."""


class ShardHashError(ShardError):
    """A shard's bytes, hashed as they were streamed, differ from its manifest's sha256."""


class DatasetMismatchError(ValueError):
    """Parallel datasets do not mirror each other (shard names, sample counts or keys)."""


# ----------------------------------------------------------------------------- manifests

@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    sha256: str | None = None  # from the manifest; checked as the shard streams past
    index_sha256: str | None = None  # of its index (shards.index_url); None: no index


def _manifest_shards(url: str) -> list[ShardInfo]:
    murl = tile_manifest.manifest_url(url)
    try:
        manifest = tile_manifest.read_manifest(url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{murl}: no manifest; a dataset folder lists its shards in "
                                "manifest.json (see docs/formats.md)") from e
    try:
        return [ShardInfo(str(s["name"]), int(s["samples"]), s.get("sha256"),
                          s.get("index_sha256")) for s in manifest["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{murl}: 'shards' must be a list of {{name, samples}} ({e!r})") from e


def load_shards(urls: Sequence[str]) -> list[ShardInfo]:
    """The shard list of ``urls[0]``, checked to be mirrored by every other dataset."""
    return load_mirrored(urls)[0]


def load_mirrored(urls: Sequence[str]) -> tuple[list[ShardInfo], list[dict[str, str | None]]]:
    """The shard list of ``urls[0]`` (checked to be mirrored by every other dataset) and, per
    dataset, each shard's manifest sha256 by name."""
    base, infos = _load_mirrored(urls)
    return base, [{n: i.sha256 for n, i in d.items()} for d in infos]


def _load_mirrored(urls: Sequence[str]) -> tuple[list[ShardInfo], list[dict[str, ShardInfo]]]:
    """:func:`load_mirrored` with each dataset's whole :class:`ShardInfo` by name."""
    base = _manifest_shards(urls[0])
    infos: list[dict[str, ShardInfo]] = [{s.name: s for s in base}]
    for url in urls[1:]:
        listed = _manifest_shards(url)
        infos.append({s.name: s for s in listed})
        other = {s.name: s.samples for s in listed}
        missing = [s.name for s in base if s.name not in other]
        if missing:
            raise DatasetMismatchError(
                f"{url} lacks {len(missing)} shard(s) of {urls[0]}, e.g. {missing[:5]}; "
                "parallel datasets must list the same shards (is the feature cache complete?)")
        for s in base:
            if other[s.name] != s.samples:
                raise DatasetMismatchError(
                    f"{s.name}: {urls[0]} lists {s.samples} samples but {url} lists "
                    f"{other[s.name]}")
    return base, infos


def select_shards(shards: list[ShardInfo], names: Iterable[str], url: str) -> list[ShardInfo]:
    """The shards named in ``names``, in manifest order; a name the manifest lacks is an error
    (a subset computed from another manifest version must not silently shrink)."""
    wanted = set(names)
    missing = sorted(wanted - {s.name for s in shards})
    if missing:
        raise DatasetMismatchError(f"{url}/manifest.json lacks {len(missing)} selected shard(s), "
                                   f"e.g. {missing[:5]}")
    return [s for s in shards if s.name in wanted]


# ----------------------------------------------------------------------------- epoch plan

def _rng(*parts: object) -> random.Random:
    # A digest, not hash(): the order must be identical in every process and Python version.
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    order = list(range(n_shards))
    if shuffle:
        _rng("shards", seed, epoch).shuffle(order)
    return order


def slot_block(n_total: int, n_slots: int, slot: int, equal: bool = False) -> tuple[int, int]:
    """Half-open range of the global stream read by ``slot``; ``equal`` trims to N // slots."""
    start = slot * n_total // n_slots
    stop = (slot + 1) * n_total // n_slots
    if equal:
        stop = start + n_total // n_slots
    return start, stop


@dataclass(frozen=True)
class _Piece:
    shard: ShardInfo
    start: int  # first sample (within the shard) this slot reads
    stop: int


def _slot_pieces(shards: list[ShardInfo], order: list[int], start: int,
                 stop: int) -> list[_Piece]:
    """Cut the global range [start, stop) into per-shard pieces, in the epoch's shard order."""
    pieces, offset = [], 0
    for i in order:
        s = shards[i]
        lo, hi = max(start, offset), min(stop, offset + s.samples)
        if lo < hi:
            pieces.append(_Piece(s, lo - offset, hi - offset))
        offset += s.samples
        if offset >= stop:
            break
    return pieces


def _interleave(lengths: list[int], k: int) -> Iterator[int]:
    """Piece id of each position of a slot's input: round-robin over ``k`` open pieces, each
    finished piece replaced in place by the next one (deterministic from the lengths alone)."""
    left = list(lengths)
    active = list(range(min(k, len(left))))
    nxt, i = len(active), 0
    while active:
        i %= len(active)
        p = active[i]
        yield p
        left[p] -= 1
        if left[p] > 0:
            i += 1
        elif nxt < len(left):
            active[i] = nxt  # the next piece takes the finished one's turn
            nxt += 1
            i += 1
        else:
            active.pop(i)


class _ShuffleOrder:
    """Shuffle-buffer emission order over positions 0..n-1, computed without any payload.

    The random draws depend only on buffer lengths, so replaying the first ``c`` emissions tells
    exactly which positions a resumed slot must still yield: those in ``buf`` and those at or
    after ``next_read``.
    """

    def __init__(self, n: int, size: int, rng: random.Random):
        self.n, self.size, self.rng = n, max(1, size), rng
        self.buf: list[int] = []
        self.next_read = 0

    def __iter__(self) -> "_ShuffleOrder":
        return self

    def __next__(self) -> int:
        while self.next_read < self.n and len(self.buf) < self.size:
            self.buf.append(self.next_read)
            self.next_read += 1
        if not self.buf:
            raise StopIteration
        j = self.rng.randrange(len(self.buf))
        self.buf[j], self.buf[-1] = self.buf[-1], self.buf[j]
        return self.buf.pop()


# ----------------------------------------------------------------------------- tar streams

def split_member(name: str) -> tuple[str, str]:
    """``'s1/10_20.lo.jpg'`` -> ``('s1/10_20', 'lo.jpg')``: keys end at the basename's 1st dot."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


class _HashingReader(io.RawIOBase):
    """Pass-through reader that hashes every byte handed to the tar parser (no second read)."""

    def __init__(self, source: IO[bytes]):
        self.source = source
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        b = self.source.read(n)
        self.sha.update(b)
        return b

    def readinto(self, buf) -> int:
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)

    def drain(self) -> str:
        """Read (and hash) what the tar parser left, e.g. the record padding; the hex digest."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def _tar_samples(f: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of each sample of a tar stream, as soon as it is complete
    (members of a sample are consecutive). ``f`` may start at any member header."""
    key, members = None, {}
    with tarfile.open(fileobj=f, mode="r|") as tf:
        while (info := tf.next()) is not None:
            tf.members.clear()  # stream mode keeps every TarInfo otherwise
            if not info.isfile():
                continue
            k, ext = split_member(info.name)
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = tf.extractfile(info).read()
    if key is not None:
        yield key, members


def _corrupt(url: str, count: int, key: str | None, e: BaseException) -> NoReturn:
    """Re-raise a read error of ``url`` as :class:`ShardError`, unless it is a missing file
    or a (named) storage failure, which are not a corrupt shard."""
    if isinstance(e, (FileNotFoundError, storage.StorageError)):
        raise e
    raise ShardError(f"{url}: corrupt or truncated at sample {count} (last key read "
                     f"{key!r}): {type(e).__name__}: {e}") from e


_READ_ERRORS = (tarfile.TarError, EOFError, OSError)


def iter_tar_samples(url: str, sha256: str | None = None,
                     digest: dict[str, str] | None = None
                     ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {ext: bytes})`` from one tar; members of a sample are consecutive.

    The bytes are hashed as they stream. The last sample is yielded only after the whole file
    was hashed: with ``sha256`` (the manifest's) a mismatch raises :class:`ShardHashError`
    naming the file and both hashes before it, so a consumer that reads a shard to its end
    never finishes on unverified data. ``digest["sha256"]`` receives the hash actually read.
    """
    count, held = 0, None
    try:
        with storage.open_read(url) as raw:
            f = _HashingReader(raw)
            for item in _tar_samples(f):
                if held is not None:
                    yield held
                    count += 1
                held = item
            got = f.drain()
    except _READ_ERRORS as e:
        _corrupt(url, count, held[0] if held else None, e)
    if digest is not None:
        digest["sha256"] = got
    if sha256 is not None and got != sha256:
        raise ShardHashError(f"{url}: sha256 of the bytes read is {got} but its manifest lists "
                             f"{sha256}; the shard changed after it was written (re-run the "
                             "stage that wrote it, or restore the file)")
    if held is not None:
        yield held


def read_index(url: str, info: ShardInfo) -> dict[str, Any]:
    """The index of shard ``url`` (offsets and digests of its samples), checked against the
    manifest's ``index_sha256`` and sample count."""
    iurl = shards.index_url(url)
    try:
        data = storage.read_bytes(iurl)
    except FileNotFoundError:
        raise ShardError(f"{iurl}: missing, but the manifest lists an index for {url}; re-run "
                         "the stage that wrote the shard, or restore the file") from None
    got = hashlib.sha256(data).hexdigest()
    if got != info.index_sha256:
        raise ShardHashError(f"{iurl}: sha256 is {got} but the manifest lists "
                             f"{info.index_sha256}; the index changed after it was written "
                             "(re-run the stage that wrote the shard, or restore the file)")
    index = json.loads(data)
    if not len(index["offsets"]) == len(index["digests"]) == info.samples:
        raise ShardError(f"{iurl}: lists {len(index['offsets'])} samples but the manifest "
                         f"lists {info.samples} for {url}")
    return index


def iter_indexed_samples(url: str, info: ShardInfo, start: int
                         ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of ``url`` from its sample ``start`` on, read from that sample's byte
    offset (one ranged GET on S3: nothing before it is read). Each sample is checked against
    the digest its index records before it is yielded, so every byte yielded is verified
    though the whole file is never hashed."""
    index = read_index(url, info)
    digests, count, key = index["digests"], start, None
    try:
        with storage.open_read(url, start=index["offsets"][start]) as raw:
            for key, members in _tar_samples(raw):
                if count >= len(digests):
                    raise ShardError(f"{url}: holds more than the {len(digests)} samples its "
                                     "index lists")
                if shards.sample_digest(key, members) != digests[count]:
                    raise ShardHashError(
                        f"{url}: sample {count} ({key!r}) differs from the digest its index "
                        "recorded when the shard was written; the shard changed after it was "
                        "written (re-run the stage that wrote it, or restore the file)")
                yield key, members
                count += 1
    except _READ_ERRORS as e:
        if isinstance(e, ShardError):
            raise
        _corrupt(url, count, key, e)


def _zip_samples(urls: list[str], infos: Sequence[ShardInfo | None],
                 start: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Merge the members of mirrored shards sample by sample, checking that keys agree and,
    once a shard is read to its end, its sha256; with ``start``, from that sample on through
    the shards' indexes, each sample checked (every ``infos`` entry must then have one)."""
    if start is not None:
        its = [iter_indexed_samples(u, i, start) for u, i in zip(urls, infos)]
    else:
        its = [iter_tar_samples(u, i.sha256 if i else None) for u, i in zip(urls, infos)]
    try:
        for n in itertools.count():
            got = [next(it, None) for it in its]
            if all(g is None for g in got):
                return
            if any(g is None for g in got):
                ended = [u for u, g in zip(urls, got) if g is None]
                raise DatasetMismatchError(f"{ended[0]} ends after {n} samples but a mirrored "
                                           f"shard goes on: {urls}")
            key, merged = got[0][0], dict(got[0][1])
            for u, (k, members) in zip(urls[1:], got[1:]):
                if k != key:
                    raise DatasetMismatchError(
                        f"sample {n}: key {key!r} in {urls[0]} but {k!r} in {u}; mirrored "
                        "shards must hold the same keys in the same order")
                for ext, data in members.items():
                    if merged.setdefault(ext, data) != data:
                        raise DatasetMismatchError(f"sample {n} ({key!r}): member {ext!r} "
                                                   f"differs between {urls[0]} and {u}")
            yield key, merged
    finally:
        for it in its:
            it.close()


JUMP_SAMPLES = 16
"""An indexed piece re-opens at a wanted sample (one ranged GET) rather than read past more
than this many unwanted ones (a GET's latency is worth a few samples' transfer)."""


class _PieceReader:
    """Reads one piece of a shard lazily: a piece whose samples are all skipped is never opened.

    With shard indexes (every dataset of the piece lists one) each read starts at the first
    sample wanted, and a gap of more than :data:`JUMP_SAMPLES` unwanted samples is jumped with
    a new ranged read, so a resumed slot reads the samples its shuffle buffer still holds, not
    everything before them; every sample yielded is checked against its index digest. Without
    (older shards) a piece streams from the shard's start and reads through what it skips,
    and the shard's sha256 is checked when it is read to its end.
    """

    def __init__(self, urls: list[str], piece: _Piece, infos: Sequence[ShardInfo | None]):
        self.urls, self.piece, self.infos = urls, piece, infos
        self.indexed = all(i is not None and i.index_sha256 for i in infos)
        self.offset = piece.start  # the position asked for next
        self._at = 0  # the position the open stream yields next
        self._it: Iterator[tuple[str, dict[str, bytes]]] | None = None

    def next(self, want: bool) -> tuple[str, dict[str, bytes]] | None:
        if not want and (self._it is None or self.indexed):
            self.offset += 1  # nothing read now: an open stream catches up or jumps later
            if self.offset == self.piece.stop:
                self.close()
            return None
        if self._it is None or (self.indexed and
                                not 0 <= self.offset - self._at <= JUMP_SAMPLES):
            self._open()
        while self._at < self.offset:  # headers and bytes stream past; nothing is decoded
            self._take()
        item = self._take()
        self.offset += 1
        if self.offset == self.piece.shard.samples and next(self._it, None) is not None:
            raise ShardError(f"{self.urls[0]}: holds more than the {self.offset} samples its "
                             "manifest lists")
        if self.offset == self.piece.stop:
            self.close()  # don't hold a connection while the slot's other pieces stream
        return item if want else None

    def _open(self) -> None:
        self.close()
        if self.indexed:
            self._it, self._at = _zip_samples(self.urls, self.infos, self.offset), self.offset
        else:
            self._it, self._at = _zip_samples(self.urls, self.infos), 0

    def _take(self) -> tuple[str, dict[str, bytes]]:
        assert self._it is not None
        item = next(self._it, None)
        if item is None:
            raise ShardError(f"{self.urls[0]}: ends at sample {self._at} but its manifest "
                             f"lists {self.piece.shard.samples} (truncated shard?)")
        self._at += 1
        return item

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


# ----------------------------------------------------------------------------- cursor

def _as_list(v: Any) -> list:
    if isinstance(v, torch.Tensor):
        return v.reshape(-1).tolist()
    return list(v) if isinstance(v, (list, tuple)) else [v]


@dataclass
class Cursor:
    """How far each slot of one epoch has been consumed: a prefix length per global slot.

    ``world`` is ``(ranks, loader workers per rank)``; ``fingerprint`` pins the dataset and the
    reader settings that shape the streams, so a mismatched resume fails instead of skipping
    the wrong samples. Each rank updates its own cursor; :meth:`merge` combines them.
    """

    epoch: int = 0
    world: tuple[int, int] = (1, 1)
    consumed: dict[int, int] = field(default_factory=dict)
    fingerprint: str | None = None

    @property
    def slots(self) -> int:
        return self.world[0] * self.world[1]

    def update(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Mark a consumed batch (collated dict, one sample, or a list of samples)."""
        rows = batch if isinstance(batch, (list, tuple)) else [batch]
        seen: dict[int, list[int]] = {}
        for row in rows:
            epochs = _as_list(row["__epoch__"])
            if any(e != self.epoch for e in epochs):
                raise ValueError(f"batch from epoch {set(epochs)} fed to a cursor of epoch "
                                 f"{self.epoch}; start the new epoch with cursor.next_epoch()")
            for s, i in zip(_as_list(row["__slot__"]), _as_list(row["__index__"])):
                seen.setdefault(int(s), []).append(int(i))
        for slot, idx in seen.items():
            if not 0 <= slot < self.slots:
                raise ValueError(f"slot {slot} outside this cursor's world {self.world}")
            done = self.consumed.get(slot, 0)
            # A gap would make a resumed job skip samples it never trained on: refuse it.
            if sorted(idx) != list(range(done, done + len(idx))):
                raise ValueError(f"slot {slot}: batch holds positions {sorted(idx)[:8]}... but "
                                 f"{done} were consumed; feed every batch, in order")
            self.consumed[slot] = done + len(idx)

    def next_epoch(self) -> "Cursor":
        return Cursor(self.epoch + 1, self.world, {}, self.fingerprint)

    def total(self) -> int:
        return sum(self.consumed.values())

    @classmethod
    def merge(cls, cursors: Iterable["Cursor"]) -> "Cursor":
        """One cursor from the per-rank ones (e.g. after ``all_gather_object``)."""
        cs = list(cursors)
        for c in cs[1:]:
            if (c.epoch, c.world, c.fingerprint) != (cs[0].epoch, cs[0].world, cs[0].fingerprint):
                raise ValueError(f"cannot merge cursors of epoch/world {c.epoch}/{c.world} and "
                                 f"{cs[0].epoch}/{cs[0].world} (or other datasets)")
        consumed: dict[int, int] = {}
        for c in cs:
            for s, n in c.consumed.items():
                consumed[s] = max(consumed.get(s, 0), n)
        return cls(cs[0].epoch, cs[0].world, consumed, cs[0].fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "world": list(self.world),
                "consumed": [self.consumed.get(s, 0) for s in range(self.slots)],
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Cursor":
        world = (int(d["world"][0]), int(d["world"][1]))
        consumed = {s: int(n) for s, n in enumerate(d.get("consumed", [])) if int(n)}
        return cls(int(d["epoch"]), world, consumed, d.get("fingerprint"))


# ----------------------------------------------------------------------------- reader

def _resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank = int(os.environ.get("RANK", 0))
            world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return rank, world_size


class ShardReader(IterableDataset):
    """Streams the samples of one dataset (or of mirrored datasets zipped by key) for training.

    ``urls``: a dataset folder with ``manifest.json``, or several folders that mirror it shard by
    shard (tiles + cached features), merged per sample. ``equal``: every slot yields exactly
    ``N // (R * W)`` samples so all DDP ranks take the same number of steps (drops < R*W per
    epoch). ``cursor``: resume that epoch after its consumed prefix; needs the same world,
    dataset and settings. ``decode``: applied to each yielded sample (see :func:`decode_sample`);
    by default members stay raw bytes. ``shards``: read only these shards (by name, manifest
    order kept), e.g. the training or the validation slides' shards; ``None``: all. Call
    :meth:`set_epoch` before each epoch, and use non-persistent DataLoader workers so they
    see it.
    """

    def __init__(self, urls: str | Sequence[str], *, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, interleave: int = 4,
                 equal: bool = False, rank: int | None = None, world_size: int | None = None,
                 cursor: Cursor | Mapping[str, Any] | None = None,
                 decode: Callable[[Sample], Any] | None = None,
                 shards: Iterable[str] | None = None):
        super().__init__()
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("ShardReader needs at least one dataset URL")
        self.shards, self.infos = _load_mirrored(self.urls)
        if shards is not None:
            self.shards = select_shards(self.shards, shards, self.urls[0])
        self.seed, self.shuffle, self.equal = seed, shuffle, equal
        # shuffle=False (evaluation) reads each slot's shards in manifest order, one at a time.
        self.shuffle_buffer = shuffle_buffer if shuffle else 1
        self.interleave = max(1, interleave) if shuffle else 1
        self.rank, self.world_size = _resolve_world(rank, world_size)
        self.decode = decode
        self.total = sum(s.samples for s in self.shards)
        self.fingerprint = self._fingerprint()
        if isinstance(cursor, Mapping):
            cursor = Cursor.from_dict(cursor)
        self.resume = self._check_cursor(cursor) if cursor is not None else None
        self.epoch = cursor.epoch if cursor is not None else epoch

    def _fingerprint(self) -> str:
        spec = [[s.name, s.samples] for s in self.shards]
        spec.append([self.seed, self.shuffle, self.shuffle_buffer, self.interleave, self.equal])
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    def _check_cursor(self, cursor: Cursor) -> Cursor:
        if cursor.world[0] != self.world_size:
            raise ValueError(f"cursor was saved with {cursor.world[0]} ranks x {cursor.world[1]} "
                             f"loader workers but this job has {self.world_size} ranks; resume "
                             "with the same world, or start the next epoch with a fresh cursor")
        if cursor.fingerprint not in (None, self.fingerprint):
            raise ValueError("cursor was saved for another dataset or other reader settings "
                             "(shards, seed, shuffle, shuffle_buffer, interleave, equal)")
        return Cursor(cursor.epoch, cursor.world, dict(cursor.consumed), cursor.fingerprint)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def cursor(self, num_workers: int = 0) -> Cursor:
        """A fresh cursor for the current epoch of a DataLoader with ``num_workers``."""
        return Cursor(self.epoch, (self.world_size, max(1, num_workers)), {}, self.fingerprint)

    def num_samples(self, num_workers: int = 0) -> int:
        """Samples this rank yields in one full epoch (same for every epoch)."""
        w = max(1, num_workers)
        slots = range(self.rank * w, (self.rank + 1) * w)
        return sum(b - a for a, b in (slot_block(self.total, self.world_size * w, s, self.equal)
                                      for s in slots))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slot, skip = self.rank * workers + worker, 0
        if self.resume is not None and self.resume.epoch == self.epoch:
            if self.resume.world != (self.world_size, workers):
                r, w = self.resume.world
                raise ValueError(f"cursor was saved with {r} ranks x {w} loader workers but this "
                                 f"job runs {self.world_size} ranks x {workers} workers; use the "
                                 "same DataLoader num_workers to resume mid-epoch")
            skip = self.resume.consumed.get(slot, 0)
        for sample in self._iter_slot(slot, self.world_size * workers, skip):
            yield self.decode(sample) if self.decode is not None else sample

    def _iter_slot(self, slot: int, n_slots: int, skip: int) -> Iterator[Sample]:
        start, stop = slot_block(self.total, n_slots, slot, self.equal)
        order = shard_order(len(self.shards), self.seed, self.epoch, self.shuffle)
        pieces = _slot_pieces(self.shards, order, start, stop)
        n = stop - start
        if skip > n:
            raise ValueError(f"cursor says slot {slot} consumed {skip} samples but it has {n}")
        emit = _ShuffleOrder(n, self.shuffle_buffer, _rng("slot", self.seed, self.epoch, slot,
                                                          n_slots))
        for _ in range(skip):  # replay index-only: which positions were already yielded
            next(emit)
        kept, first_new = set(emit.buf), emit.next_read
        readers = [_PieceReader([storage.join(u, p.shard.name) for u in self.urls], p,
                                [d.get(p.shard.name) for d in self.infos])
                   for p in pieces]
        source = _interleave([p.stop - p.start for p in pieces], self.interleave)
        pending: dict[int, tuple[str, str, dict[str, bytes]]] = {}
        read = 0
        try:
            for index in range(skip, n):
                pos = next(emit)
                while pos not in pending:  # read forward; skipped positions keep no payload
                    pid = next(source)
                    item = readers[pid].next(read >= first_new or read in kept)
                    if item is not None:
                        pending[read] = (pieces[pid].shard.name, *item)
                    read += 1
                shard, key, members = pending.pop(pos)
                yield {**members, "__key__": key, "__shard__": shard,
                       "__epoch__": self.epoch, "__slot__": slot, "__index__": index}
        finally:
            for r in readers:
                r.close()


# ----------------------------------------------------------------------------- decoding

def decode_sample(sample: Sample) -> Sample:
    """Decode members by extension: images -> uint8 tensor (C, H, W), ``json`` -> object,
    ``npy`` -> numpy array, ``txt`` -> str, ``cls`` -> int; others stay bytes."""
    import io

    import numpy as np

    out: Sample = {}
    for ext, v in sample.items():
        kind = ext.rsplit(".", 1)[-1].lower()
        if ext.startswith("__") or not isinstance(v, bytes):
            out[ext] = v
        elif kind in ("jpg", "jpeg", "png", "webp"):
            from PIL import Image

            with Image.open(io.BytesIO(v)) as im:
                arr = np.asarray(im.convert("RGB"))
            out[ext] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        elif kind == "json":
            out[ext] = json.loads(v)
        elif kind == "npy":
            out[ext] = np.load(io.BytesIO(v), allow_pickle=False)
        elif kind == "txt":
            out[ext] = v.decode("utf-8")
        elif kind == "cls":
            out[ext] = int(v)
        else:
            out[ext] = v
    return out
