"""The paper's scale, simulated: what grows with the data, measured through fusedist's own code.

XMAG trains on 3.49M paired regions from ~10,000 slides on 24 GPUs. This script synthesises
metadata only at 1 %, 10 % and 100 % of that (no pixels): per-slide plan records with realistic
TCGA slide ids and tile coordinates, shard done-entries and empty shard stubs, a tile manifest,
a teacher's feature manifest, tiny HDF5 bag stubs and a labels CSV. It then times, and takes the
peak Python allocation of, each piece that grows with the data, by calling fusedist's functions:

- tiling: the shard plan (``_assign_shards``), the manifest build+write and read, a re-run of
  ``run_tile`` on a finished dataset (the skip check), and a re-run after 100 slides are added
  (``retrain`` does not exist yet: this is the diff it will use);
- cache/embed: the done-entry check that decides which shards to do, the feature manifest,
  embed's per-slide "bag is current" check;
- the training reader at 24 ranks x 8 loader workers: opening both manifests, one worker's
  epoch plan, a resume at the epoch midpoint (time to the first micro-batch, on tiny real tar
  stubs of that worker's shards), the cursor in a checkpoint, and ``Cursor.update`` per epoch;
- the distill sample log: bytes per epoch and per checkpoint, seconds, against a checkpoint's
  bytes (DeepSpeed ZeRO-2 bf16 + fp32 Adam states + the fp32 EMA of the real student);
- the fuse cohort load (labels join, exclusions, folds) over bag stubs.

Only Ray is stood in for (the pixel work of the 100 new slides is not simulated: their plan and
write tasks are replaced by their results). Storage calls are counted, so per-object request
counts can be priced for S3. The growth exponent is log(t100/t10)/log(10) (1.0 = linear).

    python benchmarks/scale_sim.py --quick            # 1 % and 10 %; 100 % extrapolated
    python benchmarks/scale_sim.py                    # 1 %, 10 %, 100 %
    python benchmarks/scale_sim.py --groups reader,sample_log   # 100 % of those only

Where a piece has no 100 % point, its 100 % column is the largest point scaled by the measured
exponent (at least 1), marked "extrap.".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import shutil
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

FULL_SLIDES = 10_000
FULL_SAMPLES = 3_490_000
RANKS, WORKERS = 24, 8
MICRO_BATCH, EPOCHS = 48, 10
CKPT_EVERY = 500  # configs/distill/xmag_paper.yaml
SHUFFLE_BUFFER, INTERLEAVE = 2000, 8
NEW_SLIDES = 100
TEACHER, TEACHER_DIM = "uni2-h", 1536
# Real sample sizes (docs/benchmarks.md tiling: 62 pairs = 15.5 MB; UNI2-h 16 x 1536 fp16).
PAIR_BYTES = 250_000
FEATURE_BYTES = 16 * TEACHER_DIM * 2 + 128
# design.md, one H100: student train step 2,307 img/s (plain compile), so a 10-epoch run is
# 3.49M * 10 / 2307 s = 4.2 GPU-hours; per rank that is this over 24.
STUDENT_IMG_S = 2307.0
STORAGE_OPS = ("exists", "size", "read_json", "read_text", "read_bytes", "listdir",
               "walk_files", "write_json", "write_text", "write_bytes", "delete")


# ----------------------------------------------------------------------------- measuring

@dataclass
class Point:
    seconds: float  # wall
    mb: float  # peak Python allocation during the call (tracemalloc), MB
    extra: dict[str, Any] = field(default_factory=dict)
    cpu: float = 0.0  # process CPU seconds (all threads): what the code costs on a loaded box


@contextlib.contextmanager
def count_storage() -> Any:
    """Count fusedist.storage calls by name (each is one request or more on S3)."""
    from fusedist import storage

    counts: Counter = Counter()
    saved = {n: getattr(storage, n) for n in STORAGE_OPS}
    local, lock = threading.local(), threading.Lock()  # reads run in threads too

    def wrap(name, fn):
        def inner(*a, **k):
            depth = getattr(local, "depth", 0)
            if depth == 0:  # read_json -> read_text -> read_bytes is one request
                with lock:
                    counts[name] += 1
            local.depth = depth + 1
            try:
                return fn(*a, **k)
            finally:
                local.depth = depth
        return inner

    for n, fn in saved.items():
        setattr(storage, n, wrap(n, fn))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(storage, n, fn)


def measure(fn: Callable[[], Any], memory: bool = True) -> tuple[Point, Any]:
    """Time ``fn`` untraced, then run it again under tracemalloc for its peak (``fn`` must be
    repeatable). Returns the point and the first call's result."""
    t0, c0 = time.perf_counter(), time.process_time()
    with count_storage() as ops:
        out = fn()
    p = Point(time.perf_counter() - t0, float("nan"), cpu=time.process_time() - c0)
    if ops:
        p.extra["storage_ops"] = dict(ops)
    if memory:
        tracemalloc.start()
        fn()
        p.mb = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return p, out


# ----------------------------------------------------------------------------- synthesis

def slide_ids(rng: np.random.Generator, n: int) -> list[str]:
    """TCGA diagnostic-slide-like ids (60 characters): the length keys really have."""
    al = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    hx = np.array(list("0123456789ABCDEF"))
    out = set()
    while len(out) < n:
        a = "".join(rng.choice(al, 2)) + "-" + "".join(rng.choice(al, 4))
        u = "".join(rng.choice(hx, 32))
        out.add(f"TCGA-{a}-01Z-00-DX1.{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}")
    return sorted(out)


def tile_counts(rng: np.random.Generator, n_slides: int, n_samples: int) -> np.ndarray:
    """Per-slide tile counts, lognormal like real cohorts, summing to exactly ``n_samples``."""
    w = rng.lognormal(0.0, 0.8, n_slides)
    c = np.maximum(1, np.floor(w / w.sum() * n_samples)).astype(np.int64)
    diff = n_samples - int(c.sum())
    idx = rng.choice(n_slides, abs(diff), replace=True) if diff else []
    for i in idx:  # a handful of +-1 moves
        if diff > 0:
            c[i] += 1
        elif c[i] > 1:
            c[i] -= 1
    while int(c.sum()) > n_samples:  # rare: -1 landed on ones
        c[int(np.argmax(c))] -= 1
    return c


def slide_record(cfg, digest: str, sid: str, url: str, ident: str, n: int,
                 rng: np.random.Generator) -> dict:
    """What ``plan_slide`` returns for an ok slide (coords on the 1792 level-0 px grid)."""
    step = 1792
    cols = 60
    k = np.arange(n)
    x0, y0 = int(rng.integers(0, 20)) * step, int(rng.integers(0, 20)) * step
    coords = np.stack([x0 + (k % cols) * step, y0 + (k // cols) * step], 1).tolist()
    tissue = np.round(rng.uniform(cfg.min_tissue, 1.0, n), 4).tolist()
    return {"slide_id": sid, "url": url, "identity": ident, "config_digest": digest,
            "tiles": int(n), "shards": [], "level0_size": [150_000, 120_000],
            "vendor": "aperio", "dicom_series": None, "mpp0": 0.2527, "mpp_source": "metadata",
            "read_level": 0, "thumbnail": f"thumbnails/{sid}.png", "status": "ok",
            "coords": coords, "tissue": tissue}


def stub_slide(path: Path, rng: np.random.Generator) -> None:
    with open(path, "wb") as f:  # sparse: a realistic size for the identity, no bytes
        f.truncate(int(rng.integers(300_000_000, 3_000_000_000)))


@dataclass
class World:
    root: Path
    frac: float
    cfg: Any
    digest: str
    dataset_url: str
    feats_url: str
    records: list[dict]
    specs: list[dict]
    entries: dict[str, dict]
    teacher: Any
    labels_url: str
    bags_url: str
    encoders: list[str]
    synth_seconds: float = 0.0


def synthesise(root: Path, frac: float, seed: int = 0, files: bool = True) -> World:
    """The metadata of a cohort at ``frac`` of the paper's scale; ``files=False``: only the two
    manifests (what the reader and the sample log need), no per-slide/per-shard files."""
    from fusedist import storage
    from fusedist.formats.bags import Bag, bag_url, write_bag
    from fusedist.config import config_digest
    from fusedist.features.cache import TeacherInfo, _state
    from fusedist.features.cache import _manifest as feature_manifest
    from fusedist.features.embed import _slide_digest, bag_state
    from fusedist.tiling.config import TileConfig
    from fusedist.formats.tile_manifest import MANIFEST
    from fusedist.tiling.job import _assign_shards, _identity, discover
    from fusedist.tiling.job import _manifest as tile_manifest
    from fusedist.tiling.plan import shard_state, slide_state

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_slides = max(1, round(FULL_SLIDES * frac))
    n_samples = max(n_slides, round(FULL_SAMPLES * frac))
    slides_dir = root / "slides"
    slides_dir.mkdir(parents=True)
    ids = slide_ids(rng, n_slides)
    for sid in ids:
        stub_slide(slides_dir / f"{sid}.svs", rng)
    cfg = TileConfig(input=str(slides_dir), output=str(root / "tiles"), dataset="xmag",
                     mode="pairs", thumbnails=False)
    digest = config_digest(cfg, TileConfig.RUN_ONLY)
    dataset_url = storage.join(cfg.output, cfg.dataset)
    inputs = discover(cfg)
    counts = tile_counts(rng, n_slides, n_samples)
    records = []
    for s, n in zip(inputs, counts):
        rec = slide_record(cfg, digest, s.slide_id, s.url, _identity(s), int(n), rng)
        if files:
            slide_state(dataset_url).write(s.slide_id, rec)
        records.append(rec)
    specs = _assign_shards(cfg, records)
    entries = {}
    for sp in specs:
        n = sp["stop"] - sp["start"]
        e = {"name": sp["name"], "slide_id": sp["record"]["slide_id"], "start": sp["start"],
             "stop": sp["stop"], "digest": sp["digest"], "status": "ok", "samples": n,
             "bytes": n * PAIR_BYTES, "sha256": rng.bytes(32).hex()}
        if files:
            shard_state(dataset_url).write(sp["name"], e)
            (Path(dataset_url) / sp["name"]).touch()
        entries[sp["name"]] = e
    # The teacher's feature dataset: done-entries + stubs, mirroring the tile shards.
    feats_url = storage.join(str(root / "features"), TEACHER, cfg.dataset)
    teacher = TeacherInfo(TEACHER, feats_url, "ab" * 32, TEACHER_DIM, False)
    fentries = {}
    for sp in specs:
        e = entries[sp["name"]]
        fentries[e["name"]] = fe = {
            "name": e["name"], "source_sha256": e["sha256"], "weights_digest": teacher.digest,
            "samples": e["samples"], "bytes": e["samples"] * FEATURE_BYTES,
            "sha256": rng.bytes(32).hex()}
        if files:
            _state(teacher).write(e["name"], fe)
            (Path(feats_url) / e["name"]).touch()
    for r in records:
        r["shards"] = []
    storage.write_json(storage.join(dataset_url, MANIFEST),
                       tile_manifest(cfg, dataset_url, digest, records, specs, entries, {}))
    storage.write_json(storage.join(feats_url, "manifest.json"), feature_manifest(
        teacher, SimpleNamespace(tiles=dataset_url), storage.read_json(
            storage.join(dataset_url, MANIFEST)), [], [16], fentries))
    bags_url, encoders, labels_url = str(root / "bags"), ["uni2-h", "virchow2"], ""
    if not files:
        return World(root, frac, cfg, digest, dataset_url, feats_url, records, specs, entries,
                     teacher, labels_url, bags_url, encoders, time.perf_counter() - t0)
    # Bag stubs (2 encoders, 4 tiles x 8 dims) with the attributes embed checks, and labels:
    # 1 % of slides unlabelled, 0.5 % lack one encoder's bag, 0.5 % of rows have no bags.
    shard_sha = {e["name"]: e["sha256"] for e in entries.values()}
    by_slide: dict[str, list[str]] = {}
    for sp in specs:
        by_slide.setdefault(sp["record"]["slide_id"], []).append(sp["name"])
    for i, r in enumerate(records):
        sd = _slide_digest({"shards": by_slide[r["slide_id"]]}, shard_sha)
        for j, enc in enumerate(encoders):
            if j == 1 and i % 200 == 7:
                continue
            f = rng.standard_normal((4, 8)).astype(np.float16)
            xy = np.asarray(r["coords"][:4], np.int64).reshape(-1, 2)
            if len(xy) < 4:
                xy = np.array([[0, 0], [1792, 0], [0, 1792], [1792, 1792]], np.int64)
            url = bag_url(bags_url, enc, r["slide_id"])
            write_bag(url, Bag(r["slide_id"], f, xy, enc, 0.5, 224,
                               {"weights_digest": f"w-{enc}", "source_digest": sd}))
            # The done-entry embed's finish task writes beside each bag.
            bag_state(bags_url, enc).write(r["slide_id"], {
                "weights_digest": f"w-{enc}", "source_digest": sd,
                "bytes": Path(url).stat().st_size})
    labels_url = str(root / "labels.csv")
    extra = slide_ids(np.random.default_rng(seed + 1), max(1, n_slides // 200))
    with open(labels_url, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "patient_id", "label"])
        for i, r in enumerate(records):
            if i % 100 != 3:
                w.writerow([r["slide_id"], r["slide_id"][:12], "ABC"[i % 3]])
        for sid in extra:
            w.writerow([sid, sid[:12], "A"])
    return World(root, frac, cfg, digest, dataset_url, feats_url, records, specs, entries,
                 teacher, labels_url, bags_url, encoders, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- Ray stand-in

@contextlib.contextmanager
def tasks_as_results(world: World, new_records: dict[str, dict]):
    """Replace tile's tasks (Ray's or local processes') by their results (plan: the synthetic
    record; write: an ok entry), counting them. Everything else in ``run_tile`` runs as is."""
    import fusedist.tiling.job as job

    counts: Counter = Counter()

    class _Function:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *a):
            counts[self.fn.__name__] += 1
            return (self.fn.__name__, a)

    def result(ref):
        name, a = ref
        if name == "plan_slide":
            return new_records[a[2]]
        record, shard, start, stop, digest = a[2:7]  # then siblings and rendered parts
        return {"name": shard, "slide_id": record["slide_id"], "start": start, "stop": stop,
                "digest": digest, "status": "ok", "samples": stop - start,
                "bytes": (stop - start) * PAIR_BYTES, "sha256": "0" * 64}

    class _Tasks:
        slots = 1  # one slot: a shard is one render part

        def __enter__(self):
            return self

        def __exit__(self, *_):
            pass

        def function(self, fn, max_retries=2, describe=None):
            return _Function(fn)

        def run(self, refs, on_done, *_, **__):
            for r in refs:
                on_done(result(r))

    saved = job._tasks
    job._tasks = lambda cfg: _Tasks()
    try:
        yield counts
    finally:
        job._tasks = saved


# ----------------------------------------------------------------------------- the pieces

def bench_tiling(w: World, out: dict[str, Point], memory: bool) -> None:
    from fusedist import storage
    from fusedist.formats.tile_manifest import read_tile_manifest
    from fusedist.formats.tile_manifest import MANIFEST
    from fusedist.tiling.job import _assign_shards, _manifest, run_tile

    out["tile: shard plan (_assign_shards)"], specs = measure(
        lambda: _assign_shards(w.cfg, w.records), memory)

    def build_write():
        for r in w.records:
            r["shards"] = []
        m = _manifest(w.cfg, w.dataset_url, w.digest, w.records, specs, w.entries, {})
        storage.write_json(storage.join(w.dataset_url, MANIFEST), m)
        return m

    p, _ = measure(build_write, memory)
    p.extra["bytes"] = Path(w.dataset_url, MANIFEST).stat().st_size
    out["tile: manifest build + write"] = p
    out["tile: manifest read"], _ = measure(lambda: read_tile_manifest(w.dataset_url), memory)

    with tasks_as_results(w, {}) as tasks:
        p, res = measure(lambda: run_tile(w.cfg, progress=False), memory)
    p.extra["tasks"] = dict(tasks)
    assert res.written_shards == 0, "a finished dataset must be skipped whole"
    out["tile: re-run skip check (run_tile, all done)"] = p


def bench_new_slides(w: World, out: dict[str, Point]) -> None:
    """Last: it leaves a manifest that lists the stand-in shards of the new slides."""
    from fusedist.tiling.job import run_tile

    # retrain's "which slides are new": 100 more slides, planned by (stand-in) tasks.
    rng = np.random.default_rng(99)
    new = {}
    from fusedist.tiling.job import SlideInput, _identity
    from fusedist.tiling.slide import slide_id_for

    paths = []
    for name in slide_ids(rng, NEW_SLIDES):
        path = Path(w.cfg.input) / f"{name}.svs"
        stub_slide(path, rng)
        paths.append(path)
        sid = slide_id_for(path.name)
        s = SlideInput(sid, str(path))
        new[sid] = slide_record(w.cfg, w.digest, sid, s.url, _identity(s), 349, rng)
    with tasks_as_results(w, new) as tasks:
        p, res = measure(lambda: run_tile(w.cfg, progress=False), memory=False)
    n_new_shards = sum(math.ceil(r["tiles"] / w.cfg.samples_per_shard) for r in new.values())
    p.extra["tasks"] = {"plan_slide": tasks["plan_slide"],
                        "write_slide_shard": tasks["write_slide_shard"]}
    p.extra["shards_needed"] = n_new_shards
    p.extra["shards_total"] = res.manifest["totals"]["shards"]
    out[f"tile: re-run after +{NEW_SLIDES} slides (retrain diff)"] = p


def bench_cache_embed(w: World, out: dict[str, Point], memory: bool) -> None:
    from fusedist import storage
    from fusedist.formats.bags import bag_is_current, bag_url
    from fusedist.features.cache import _done_entries, _manifest
    from fusedist.features.config import CacheConfig
    from fusedist.features.embed import _slide_digest, bags_to_do
    from fusedist.formats.tile_manifest import read_tile_manifest

    tm = read_tile_manifest(w.dataset_url)
    t = w.teacher

    def plan():  # run_cache's done-entry check
        done = _done_entries(t, tm["shards"], False)
        todo = [s for s in tm["shards"] if s["name"] not in done]
        return done, todo

    p, (done, todo) = measure(plan, memory)
    p.extra["todo"] = len(todo)
    out["cache: which shards to do (done-entries)"] = p
    ccfg = CacheConfig(tiles=w.dataset_url, teachers=[{"name": "test-vit"}])

    def manifest():
        m = _manifest(t, ccfg, tm, [], [16], done)
        storage.write_json(storage.join(t.url, "manifest.json"), m)
        return m

    p, _ = measure(manifest, memory)
    p.extra["bytes"] = Path(t.url, "manifest.json").stat().st_size
    out["cache: feature manifest build + write"] = p

    shard_sha = {s["name"]: s["sha256"] for s in tm["shards"]}
    slides = [s for s in tm["slides"] if s["status"] == "ok" and s["shards"]]

    def embed_plan_hdf5():  # the check before done-entries: every bag's HDF5 opened
        todo = 0
        for s in slides:
            digest = _slide_digest(s, shard_sha)
            for e in w.encoders:
                if not bag_is_current(bag_url(w.bags_url, e, s["slide_id"]),
                                      {"weights_digest": f"w-{e}", "source_digest": digest}):
                    todo += 1
        return todo

    def embed_plan():  # _embed_group's check: done-entries, one listing per encoder
        todo, _ = bags_to_do(w.bags_url, {e: f"w-{e}" for e in w.encoders}, slides, shard_sha)
        return sum(len(v) for v in todo.values())

    p, todo = measure(embed_plan_hdf5, memory)
    p.extra["todo"] = todo
    out["embed: which bags to do (every HDF5 opened, before)"] = p
    p, todo2 = measure(embed_plan, memory)
    assert todo2 == todo, (todo2, todo)
    p.extra["todo"] = todo2
    out["embed: which bags to do (done-entries, `bags_to_do`)"] = p


def _stub_tars(w: World, pieces) -> None:
    """Tiny real tars (one 1-byte member per sample) for the shards of ``pieces``."""
    import hashlib

    from fusedist import shards, storage

    by_name = {sp["name"]: sp for sp in w.specs}
    written: dict[str, dict[str, dict]] = {w.dataset_url: {}, w.feats_url: {}}
    for piece in pieces:
        sp = by_name[piece.shard.name]
        rec = sp["record"]
        keys = [f"{rec['slide_id']}/{x}_{y}" for x, y in rec["coords"][sp["start"]:sp["stop"]]]
        for root, member in ((w.dataset_url, {"lo.jpg": b"\xff"}),
                             (w.feats_url, {f"{TEACHER}.npy": b"\x00"})):
            url = storage.join(root, sp["name"])
            written[root][sp["name"]] = shards.write_shard(url, ((k, member) for k in keys))
    # The reader checks each shard's bytes against its manifest once it reads to the end:
    # the manifests list the stubs' hashes (the synthesised ones match no real bytes) and
    # their indexes' hashes.
    for root, got in written.items():
        m = storage.read_json(storage.join(root, "manifest.json"))
        for row in m["shards"]:
            if row["name"] in got:
                row["sha256"] = got[row["name"]]["sha256"]
                row["index_sha256"] = got[row["name"]]["index_sha256"]
        storage.write_json(storage.join(root, "manifest.json"), m)


def _drop_indexes(w: World) -> dict[str, bytes]:
    """Rewrite both manifests without index hashes (shards written before indexes existed);
    returns the originals for :func:`_restore`."""
    from fusedist import storage

    saved = {}
    for root in (w.dataset_url, w.feats_url):
        url = storage.join(root, "manifest.json")
        saved[url] = storage.read_bytes(url)
        m = json.loads(saved[url])
        for row in m["shards"]:
            row.pop("index_sha256", None)
        storage.write_json(url, m)
    return saved


def bench_reader(w: World, out: dict[str, Point], memory: bool) -> dict:
    import torch

    import fusedist.data.reader as rd
    from fusedist import storage
    from fusedist.data import Cursor, ShardReader
    from fusedist.distill.checkpoint import TrainState

    urls = [w.dataset_url, w.feats_url]
    kw = dict(seed=0, shuffle_buffer=SHUFFLE_BUFFER, interleave=INTERLEAVE, equal=True,
              world_size=RANKS)
    out["reader: open both manifests (per rank)"], reader = measure(
        lambda: ShardReader(urls, rank=0, **kw), memory)
    n_slots = RANKS * WORKERS

    def plan():  # what one loader worker computes per epoch before its first read
        start, stop = rd.slot_block(reader.total, n_slots, 0, True)
        order = rd.shard_order(len(reader.shards), 0, 0, True)
        return rd._slot_pieces(reader.shards, order, start, stop)

    p, pieces = measure(plan, memory)
    p.extra["pieces"] = len(pieces)
    out["reader: epoch plan (per worker)"] = p

    per_slot = rd.slot_block(reader.total, n_slots, 0, True)[1]
    mid = per_slot // 2
    take = min(MICRO_BATCH, per_slot - mid)
    _stub_tars(w, pieces)
    reader = ShardReader(urls, rank=0, **kw)  # the manifests now list the stubs' hashes
    cursor = Cursor(0, (RANKS, WORKERS), {s: mid for s in range(n_slots)}, reader.fingerprint)
    streamed = Counter()
    real = {"iter_tar_samples": rd.iter_tar_samples,
            "iter_indexed_samples": rd.iter_indexed_samples}

    def counting(fn):
        def wrapped(url, *args, **kwargs):
            for item in fn(url, *args, **kwargs):
                streamed[url.startswith(w.dataset_url)] += 1
                yield item
        return wrapped

    def resume():
        r = ShardReader(urls, rank=0, cursor=cursor.to_dict(), **kw)
        it = r._iter_slot(0, n_slots, mid)
        batch = [next(it) for _ in range(take)]
        it.close()
        return batch

    # With shard indexes (every shard the stages write) and without (older shards): a
    # resumed piece starts at its first still-needed sample, or at the shard's start.
    for label, indexed in (("", True), (", shards without indexes", False)):
        saved = {} if indexed else _drop_indexes(w)
        streamed.clear()
        for name, fn in real.items():
            setattr(rd, name, counting(fn))
        try:
            p, batch = measure(resume, memory)
        finally:
            for name, fn in real.items():
                setattr(rd, name, fn)
            for url, data in saved.items():
                storage.write_bytes(url, data)
        assert [b["__index__"] for b in batch] == list(range(mid, mid + take))
        passed = streamed[True] // (2 if memory else 1) - take
        p.extra["samples_streamed_past"] = passed
        p.extra["real_bytes_streamed_past_MB"] = round(
            passed * (PAIR_BYTES + FEATURE_BYTES) / 1e6, 1)
        out[f"reader: resume at epoch midpoint, to 1st micro-batch (per worker{label})"] = p

    state = TrainState(step=10**6, epoch=5, cursor=cursor.to_dict(), samples=10**9,
                       weights_digest="0" * 64, resumes=[1000, 2000], meta={"student": "x"})
    from dataclasses import asdict
    p = Point(0.0, 0.0, {"cursor_bytes": len(json.dumps(cursor.to_dict())),
                         "state_file_bytes": len(json.dumps(asdict(state), indent=1))})
    out["checkpoint: data cursor in fusedist_state.json"] = p

    steps = (WORKERS * (per_slot // MICRO_BATCH))  # one rank's micro-batches per epoch

    def updates():
        c = Cursor(0, (RANKS, WORKERS), {}, reader.fingerprint)
        pos = [0] * WORKERS
        for i in range(steps):
            wk = i % WORKERS  # DataLoader takes batches from its workers in turn
            idx = torch.arange(pos[wk], pos[wk] + MICRO_BATCH)
            c.update({"__epoch__": torch.zeros(MICRO_BATCH, dtype=torch.long),
                      "__slot__": torch.full((MICRO_BATCH,), wk), "__index__": idx})
            pos[wk] += MICRO_BATCH
        return c

    p, _ = measure(updates, memory)
    p.extra["micro_batches"] = steps
    out["reader: Cursor.update, one rank's epoch"] = p
    return {"per_slot": per_slot, "steps_per_epoch": steps, "total": reader.total}


def checkpoint_bytes() -> tuple[int, int]:
    """Bytes of one distill checkpoint of the paper's student, from its parameter count:
    bf16 module (2 B) + fp32 master, exp_avg, exp_avg_sq (12 B) + fp32 EMA (4 B)."""
    from fusedist.models.arch import create_model
    from fusedist.models.registry import get_spec
    from fusedist.models.student import XmagStudent

    spec = get_spec("dinov2-vitb14")
    m = XmagStudent(create_model(spec, "meta"), teacher_dim=TEACHER_DIM, grid=4, spec=spec)
    n = sum(p.numel() for p in m.parameters())
    return n, n * (2 + 12 + 4)


def bench_sample_log(w: World, out: dict[str, Point], memory: bool, info: dict,
                     ckpt_bytes: int) -> None:
    import fusedist.data.reader as rd
    from fusedist.distill.checkpoint import SampleLog, sample_log_fraction
    from fusedist.distill.config import DistillConfig

    # One rank's keys of one epoch, in micro-batches of its 8 slots, as training feeds them.
    shards = [rd.ShardInfo(sp["name"], sp["stop"] - sp["start"]) for sp in w.specs]
    by_name = {sp["name"]: sp for sp in w.specs}
    order = rd.shard_order(len(shards), 0, 0, True)
    n_slots = RANKS * WORKERS
    slot_keys = []
    for slot in range(WORKERS):
        a, b = rd.slot_block(info["total"], n_slots, slot, True)
        keys = []
        for pc in rd._slot_pieces(shards, order, a, b):
            sp = by_name[pc.shard.name]
            rec = sp["record"]
            keys += [f"{rec['slide_id']}/{x}_{y}" for x, y in
                     rec["coords"][sp["start"] + pc.start:sp["start"] + pc.stop]]
        slot_keys.append(keys)
    batches = [slot_keys[i % WORKERS][(i // WORKERS) * MICRO_BATCH:
                                      (i // WORKERS + 1) * MICRO_BATCH]
               for i in range(info["steps_per_epoch"])]
    run = w.root / "run"
    max_keys = DistillConfig.model_fields["sample_log_keys"].default
    for label, keys_cap in (("every key (sample_log_keys: null)", None),
                            (f"default (sample_log_keys: {max_keys})", max_keys)):
        frac = sample_log_fraction(keys_cap, info["total"])

        def epoch():
            log = SampleLog(str(run), rank=0, fraction=frac)
            for step, keys in enumerate(batches):
                log.add(0, step, keys)
                if (step + 1) % CKPT_EVERY == 0 or step + 1 == len(batches):
                    log.flush(step + 1)
            return log

        shutil.rmtree(run, ignore_errors=True)
        p, _ = measure(epoch, memory)
        files = list(run.rglob("*.jsonl"))
        rank_bytes = sum(f.stat().st_size for f in files)
        rows = sum(f.read_text().count("\n") for f in files)
        row_bytes = rank_bytes / max(1, rows)
        # At full scale: a checkpoint every CKPT_EVERY steps of the global batch.
        full_frac = sample_log_fraction(keys_cap, FULL_SAMPLES)
        full_ckpt = row_bytes * full_frac * CKPT_EVERY * MICRO_BATCH * RANKS
        p.extra.update(fraction=round(frac, 5), epoch_bytes_all_ranks=rank_bytes * RANKS,
                       row_bytes=round(row_bytes, 1),
                       full_scale_fraction=round(full_frac, 5),
                       full_scale_epoch_bytes=int(row_bytes * full_frac * FULL_SAMPLES),
                       full_scale_bytes_per_checkpoint=int(full_ckpt),
                       checkpoint_bytes=ckpt_bytes,
                       full_scale_of_checkpoint_pct=round(100 * full_ckpt / ckpt_bytes, 3))
        out[f"distill: sample log {label}, one rank's epoch"] = p
    shutil.rmtree(run, ignore_errors=True)


def bench_fuse(w: World, out: dict[str, Point], memory: bool) -> None:
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.data import load_cohort, make_folds

    cfg = FuseConfig(bags=w.bags_url, labels=w.labels_url, task="classification",
                     output=str(w.root / "fuse"), folds=5, inner_folds=3)

    def load():
        c = load_cohort(cfg)
        return c, make_folds(c, np.arange(c.num_samples), cfg.folds, 0)

    p, (c, folds) = measure(load, memory)
    p.extra.update(slides=len(c.slide_ids), excluded=len(c.exclusions))
    out["fuse: cohort load (labels join, exclusions, folds)"] = p


# ----------------------------------------------------------------------------- reporting

def exponent(a: float, b: float, ratio: float = 10.0) -> float:
    if a <= 0 or b <= 0 or ratio == 1.0:
        return float("nan")
    return math.log(b / a) / math.log(ratio)


GROUPS = ("tiling", "cache", "reader", "sample_log", "fuse", "new_slides")


def run_scale(frac: float, memory: bool, ckpt_bytes: int, keep: Path | None,
              groups: tuple[str, ...] = GROUPS) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"fusedist-scale-{frac:g}-", dir=keep))
    try:
        files = bool({"tiling", "cache", "fuse", "new_slides"} & set(groups))
        w = synthesise(root, frac, files=files)
        out: dict[str, Point] = {}
        if "tiling" in groups:
            bench_tiling(w, out, memory)
        if "cache" in groups:
            bench_cache_embed(w, out, memory)
        info = bench_reader(w, out, memory) if "reader" in groups else None
        if "sample_log" in groups:
            bench_sample_log(w, out, memory, info or reader_info(w), ckpt_bytes)
        if "fuse" in groups:
            bench_fuse(w, out, memory)
        if "new_slides" in groups:
            bench_new_slides(w, out)
        samples = sum(int(r["tiles"]) for r in w.records)
        return {"frac": frac, "slides": len(w.records), "samples": samples,
                "shards": len(w.specs), "synth_seconds": w.synth_seconds, "points": out}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def reader_info(w: World) -> dict:
    import fusedist.data.reader as rd

    total = sum(int(r["tiles"]) for r in w.records)
    per_slot = rd.slot_block(total, RANKS * WORKERS, 0, True)[1]
    return {"per_slot": per_slot, "steps_per_epoch": WORKERS * (per_slot // MICRO_BATCH),
            "total": total}


def _series(results: list[dict], name: str) -> list[tuple[float, Point]]:
    return [(r["frac"], r["points"][name]) for r in results if name in r["points"]]


def full_scale(results: list[dict], name: str) -> tuple[float, bool]:
    """CPU seconds at 100 %: measured, else the largest point scaled with the measured
    exponent (never below linear: a sub-linear exponent between two points is not trusted)."""
    pts = _series(results, name)
    f, p = pts[-1]
    if f >= 1.0:
        return p.cpu, False
    e = exponent(pts[-2][1].cpu, p.cpu, f / pts[-2][0]) if len(pts) > 1 else 1.0
    return p.cpu * (1.0 / f) ** max(1.0, e if e == e else 1.0), True


def report(results: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in results for n in r["points"]))
    fr = [r["frac"] for r in results]
    head = " | ".join(f"{f * 100:g}% s | cpu s | MB" for f in fr)
    lines = [f"| piece | {head} | exponent (cpu) | 100% cpu s |",
             "|---|" + "---:|" * (3 * len(fr) + 2)]
    for n in names:
        cells = []
        for r in results:
            p = r["points"].get(n)
            cells.append(f"{p.seconds:.3f} | {p.cpu:.3f} | {p.mb:.1f}" if p else "- | - | -")
        pts = _series(results, n)
        e = exponent(pts[-2][1].cpu, pts[-1][1].cpu, pts[-1][0] / pts[-2][0]) \
            if len(pts) > 1 else float("nan")
        s, extrap = full_scale(results, n)
        lines.append(f"| {n} | {' | '.join(cells)} | {e:.2f} | {s:.2f}{' (extrap.)' * extrap} |")
    lines += ["", "Details (each piece at its largest scale):"]
    for r in results:
        lines.append(f"  {r['frac'] * 100:g}%: {r['slides']} slides, {r['samples']} samples, "
                     f"{r['shards']} shards (synthesis {r['synth_seconds']:.1f} s)")
    for n in names:
        f, p = _series(results, n)[-1]
        if p.extra:
            lines.append(f"  [{f * 100:g}%] {n}: {json.dumps(p.extra, sort_keys=True)}")
    return "\n".join(lines)


def goals(results: list[dict], ckpt_params: int, ckpt_bytes: int) -> str:
    """The issue's per-run goals, priced at full scale (measured or extrapolated)."""
    names = list(dict.fromkeys(n for r in results for n in r["points"]))
    run_rank_s = FULL_SAMPLES * EPOCHS / STUDENT_IMG_S / RANKS  # one GPU's share, seconds
    lines = [f"Goals at full scale, in CPU seconds; a 10-epoch student run is "
             f"{FULL_SAMPLES * EPOCHS / STUDENT_IMG_S / 3600:.1f} GPU-hours = {run_rank_s:.0f} s "
             f"per rank at {RANKS} ranks (design.md: {STUDENT_IMG_S:g} img/s per GPU):"]

    def fs(n: str) -> float:
        return full_scale(results, n)[0]

    reader = ["reader: open both manifests (per rank)", "reader: epoch plan (per worker)",
              "reader: Cursor.update, one rank's epoch",
              "reader: resume at epoch midpoint, to 1st micro-batch (per worker)",
              "reader: resume at epoch midpoint, to 1st micro-batch (per worker, shards "
              "without indexes)"]
    if all(n in names for n in reader):
        once = fs(reader[0]) + fs(reader[3])
        per_epoch = fs(reader[1]) + fs(reader[2])
        tot = once + EPOCHS * per_epoch
        lines.append(f"  reader per rank: open + 1 resume {once:.2f} s, per epoch (plan + cursor "
                     f"updates) {per_epoch:.2f} s; 10 epochs {tot:.2f} s = "
                     f"{100 * tot / run_rank_s:.3f} % of the run")
        for n in reader[3:]:  # the I/O a resume costs: real bytes read past, not CPU
            p = _series(results, n)[-1][1]
            mb = p.extra["real_bytes_streamed_past_MB"]
            lines.append(f"  {n[len('reader: '):]}: {p.extra['samples_streamed_past']} samples "
                         f"= {mb:.1f} MB read and not yielded per worker, "
                         f"{mb * RANKS * WORKERS / 1e3:.1f} GB over {RANKS * WORKERS} workers")
    for n in names:
        if n.startswith("distill: sample log"):
            p = _series(results, n)[-1][1]
            t = EPOCHS * fs(n)
            lines.append(f"  {n[len('distill: '):]}: 10 epochs {t:.2f} s per rank = "
                         f"{100 * t / run_rank_s:.3f} % of the run; "
                         f"{p.extra['full_scale_bytes_per_checkpoint'] / 1e6:.1f} MB per "
                         f"checkpoint = {p.extra['full_scale_of_checkpoint_pct']:.2f} % of one "
                         f"({ckpt_bytes / 1e9:.2f} GB: {ckpt_params / 1e6:.1f}M params x 18 B)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1%% and 10%% only")
    ap.add_argument("--scales", default=None, help="comma-separated fractions, e.g. 0.01,0.1,1")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    ap.add_argument("--groups", default=",".join(GROUPS),
                    help="pieces to run at the largest scale (all at the others), from "
                         + ",".join(GROUPS))
    ap.add_argument("--tmp", default=None, help="where to synthesise (default: system temp)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args()
    scales = [0.01, 0.1] if a.quick else [0.01, 0.1, 1.0]
    if a.scales:
        scales = [float(x) for x in a.scales.split(",")]
    import logging

    logging.getLogger("fusedist").setLevel(logging.ERROR)
    params, ckpt = checkpoint_bytes()
    import h5py  # noqa: F401  (imports are not what is measured)
    import sklearn.model_selection  # noqa: F401
    results = []
    groups = tuple(g for g in a.groups.split(",") if g)
    for g in groups:
        if g not in GROUPS:
            ap.error(f"unknown group {g!r}; choose from {','.join(GROUPS)}")
    for i, f in enumerate(scales):
        t0 = time.perf_counter()
        results.append(run_scale(f, not a.no_memory, ckpt, Path(a.tmp) if a.tmp else None,
                                 groups if i == len(scales) - 1 else GROUPS))
        print(f"scale {f * 100:g}%: done in {time.perf_counter() - t0:.1f} s", flush=True)
    print()
    print(report(results))
    print()
    print(goals(results, params, ckpt))
    if a.json:
        Path(a.json).write_text(json.dumps(
            [{**{k: v for k, v in r.items() if k != "points"},
              "points": {n: p.__dict__ for n, p in r["points"].items()}} for r in results],
            indent=1, default=str))


if __name__ == "__main__":
    main()
