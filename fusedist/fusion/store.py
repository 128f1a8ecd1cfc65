"""Per-slide feature matrices that need not fit in memory.

``fuse`` works on every slide's features of every encoder. A cohort the size of the paper's
(10,000 slides, ~5,600 tiles each, 1,536-d UNI2-h) is ~34 MB per slide per encoder, ~1.3 TB for
three encoders as float32: far more than a node's RAM. So once the features pass a budget
(``FuseConfig.bags_in_memory_gb``), each encoder's features are packed, slide after slide, into
one flat float32 file (``<output>/_features/<encoder>.float32``, the tiles' coords beside
it) and read back through ``np.memmap``
one slide at a time: memory holds what the current step touches, the page cache the rest.

The pieces behave as ``Sequence[np.ndarray]`` (one ``(N_i, D)`` float32 matrix per slide), which
is what every fusion method indexes, so a method cannot tell a packed cohort from one in
memory, and the results are the same bytes (tests/test_fuse.py). A packed sequence pickles as
its URL and offsets (a few KB), so the cohort travels to fold tasks cheaply; each process maps
the file on first use (an S3 file is fetched once per node into the local cache).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from fusedist import storage

FOLDER = "_features"
"""Packed features live under ``<output>/_features/`` (removed when the run succeeds)."""


class _PerSlide(Sequence):
    """A read-only per-slide sequence of matrices: subclasses give ``__len__`` and
    ``_slide(i)`` (``0 <= i < len``); indexing, slices and iteration are here."""

    def _slide(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._slide(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"slide {i} of {n}")
        return self._slide(i % n)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self._slide(i) for i in range(len(self)))


class Rows(_PerSlide):
    """Slide ``i``'s rows ``offsets[i]:offsets[i+1]`` of one flat ``(total, dim)`` file of
    ``dtype`` (float32 features, int64 coords)."""

    def __init__(self, url: str, offsets: np.ndarray, dim: int, sums: np.ndarray,
                 dtype: str = "float32") -> None:
        self.url, self.dim, self.dtype = url, int(dim), str(dtype)
        self.offsets = np.asarray(offsets, np.int64)
        self.sums = np.asarray(sums, np.float64)
        """float64 sum of each slide's matrix, taken while packing (the run's fingerprint
        needs them, and reading 1 TB back for it would take longer than the run)."""
        self._mm: np.ndarray | None = None
        self.path: Path | None = None
        """The local file this process maps (a cached copy when ``url`` is on S3)."""

    def __reduce__(self):  # travels as its address, never as its data
        return Rows, (self.url, self.offsets, self.dim, self.sums, self.dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _map(self) -> np.ndarray:
        if self._mm is None:
            path = self.path or storage.fetch_local(self.url, subdir="features")
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"{self.url}: packed fuse features are not on this node; on a multi-node "
                    "cluster put fuse's `output` on S3 or a shared filesystem, or raise "
                    "`bags_in_memory_gb` so the features travel in memory")
            # Copy-on-write: arrays are writable (torch takes them without a warning) and a
            # write stays private to this process, never reaching the file.
            self._mm = np.memmap(path, self.dtype, "c", shape=(int(self.offsets[-1]), self.dim))
            self.path = Path(path)
        return self._mm

    def _slide(self, i: int) -> np.ndarray:
        return self._map()[self.offsets[i]:self.offsets[i + 1]]


class Picked(_PerSlide):
    """Rows of another per-slide sequence: slide ``i`` is ``base[i]`` itself when ``picks[i]``
    is None (the usual case: every encoder of a feature group read the same tiles), else
    ``base[i][picks[i]]``. The aligned view of a cohort costs its index arrays, not a copy of
    the features."""

    def __init__(self, base: Sequence[np.ndarray], picks: list[np.ndarray | None]) -> None:
        self.base, self.picks = base, picks

    def __len__(self) -> int:
        return len(self.picks)

    def _slide(self, i: int) -> np.ndarray:
        p = self.picks[i]
        return self.base[i] if p is None else self.base[i][p]


def feature_sums(seq: Sequence[np.ndarray]) -> np.ndarray:
    """float64 sum of each slide's matrix (recorded when packed, else computed)."""
    if isinstance(seq, Rows):
        return seq.sums
    return np.array([float(f.sum(dtype=np.float64)) for f in seq])


class _Writer:
    """Appends slides to one flat file; ``close`` commits it atomically."""

    def __init__(self, url: str, dim: int, dtype: str) -> None:
        self.url, self.dim, self.dtype = url, dim, dtype
        self.offsets, self.sums = [0], []
        self._stack = contextlib.ExitStack()
        if storage.is_s3(url):
            # Written on local disk first, uploaded on close, then kept as the node's cached
            # copy, so the driver never downloads what it just wrote.
            d = storage.cache_dir() / "features"
            d.mkdir(parents=True, exist_ok=True)
            self._local = d / f".{storage.basename(url)}.{os.getpid()}.tmp"
            self._f = self._stack.enter_context(open(self._local, "wb"))
        else:
            self._local = None
            self._f = self._stack.enter_context(storage.open_write(url))

    def add(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self._f.write(memoryview(a).cast("B"))
        self.offsets.append(self.offsets[-1] + len(a))
        self.sums.append(float(a.sum(dtype=np.float64)))

    def close(self) -> Rows:
        self._stack.close()
        rows = Rows(self.url, np.array(self.offsets), self.dim, np.array(self.sums), self.dtype)
        if self._local is not None:
            rows.path = storage.upload_to_cache(self._local, self.url, subdir="features")
        return rows

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        if self._local is not None:
            with contextlib.suppress(OSError):
                self._local.unlink()


class Packer:
    """Collects per-slide arrays (one column per name: ``{name: (dim, dtype)}``) in memory
    until their total passes ``budget`` bytes, then moves everything to packed files
    (``<folder>/<name>.<dtype>``) and appends there."""

    def __init__(self, columns: dict[str, tuple[int, str]], folder_url: str,
                 budget: float) -> None:
        self.columns, self.folder, self.budget = dict(columns), folder_url, budget
        self.held: dict[str, list[np.ndarray]] = {k: [] for k in columns}
        self.writers: dict[str, _Writer] | None = None
        self.nbytes = 0
        """Bytes added so far."""

    @property
    def packed(self) -> bool:
        return self.writers is not None

    def add(self, e: str, a: np.ndarray) -> None:
        dim, dtype = self.columns[e]
        self.nbytes += a.shape[0] * dim * np.dtype(dtype).itemsize
        if self.writers is not None:
            self.writers[e].add(a)
            return
        self.held[e].append(np.ascontiguousarray(a, dtype=dtype))
        if self.nbytes > self.budget:
            self._spill()

    def _spill(self) -> None:
        self.writers = {}
        try:
            for e, (dim, dtype) in self.columns.items():
                w = self.writers[e] = _Writer(storage.join(self.folder, f"{e}.{dtype}"), dim,
                                              dtype)
                for a in self.held[e]:
                    w.add(a)
                self.held[e] = []
        except BaseException:
            self.abort()
            raise

    def finish(self) -> dict[str, Sequence[np.ndarray]]:
        if self.writers is None:
            return dict(self.held)
        return {e: w.close() for e, w in self.writers.items()}

    def abort(self) -> None:
        for w in (self.writers or {}).values():
            w.abort()


def is_packed(columns: Iterable[Sequence[np.ndarray]]) -> bool:
    return any(isinstance(v, Rows) for v in columns)


def remove_packed(columns: Iterable[Sequence[np.ndarray]]) -> None:
    """Delete packed files, and this node's cached copies of S3 ones: they are a copy of the
    bags, rebuilt by every run. (Other nodes' cached copies stay in their
    ``FUSEDIST_CACHE``, which goes with their pods.)"""
    folders = set()
    for v in columns:
        if isinstance(v, Rows):
            v._mm = None
            storage.delete(v.url)
            if storage.is_s3(v.url) and v.path is not None:
                with contextlib.suppress(OSError):
                    v.path.unlink()
            elif not storage.is_s3(v.url):
                folders.add(storage.local_path(v.url).parent)
    for d in folders:
        with contextlib.suppress(OSError):  # only when empty
            d.rmdir()
