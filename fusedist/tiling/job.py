"""``fusedist tile``: slides -> WebDataset shards, as Ray tasks (or local processes when no
Ray runs: ``executor``), resumable.

Two phases. *Plan*: one task per slide opens it, finds tissue and lists its tiles (cheap; the
plan is saved and reused on re-runs). *Write*: a slide's tiles fill ``samples_per_shard``-sized
shards of its own, named ``<slide_id>-<part>.tar`` (never by position among the slides, so
adding, removing or failing a slide renames nothing), then one task per shard writes it
atomically followed by its done-entry. With fewer shards than CPUs, a shard's tiles are first
rendered by several tasks (``split_range``) and its writer concatenates them in order, so one
large slide uses every core and the bytes do not depend on the split. A shard whose entry
exists with the same digest is skipped, so a re-run after a kill finishes the work and yields
the same bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fusedist import storage
from fusedist.config import ConfigError, config_digest
from fusedist.formats import tile_manifest
from fusedist.formats.slide_ids import check_ids
from fusedist.formats.slide_table import (SlideRow, check_paths, format_slide_table,
                                          is_slide_table, read_slide_table, write_slide_table)
from fusedist.execution.progress import Rate
from fusedist.execution.tasks import Tasks, open_tasks
from fusedist.shards import delete_shard, listed_shards, shard_name, shard_written
from fusedist.tiling.config import TileConfig
from fusedist.lookups import concurrently
from fusedist.state import mismatch_error
from fusedist.tiling.plan import (plan_slide, render_part, shard_digest, shard_state, slide_state,
                                  write_slide_shard)
from fusedist.tiling.slide import slide_id_for

log = logging.getLogger("fusedist.tile")



@dataclass
class SlideInput:
    slide_id: str
    url: str
    siblings: list[str] = field(default_factory=list)  # other files of a multi-file slide
    patient_id: str | None = None  # from a slide table; None: the slide's own id
    mpp: float | None = None  # level-0 µm/px from a slide table (over the file's metadata)
    line: int = 0  # the slide table line it came from (0: found in a folder)


@dataclass
class TileResult:
    manifest: dict
    dataset_url: str
    written_shards: int = 0
    written_tiles: int = 0
    written_bytes: int = 0
    elapsed: float = 0.0

    @property
    def failed(self) -> list[dict]:
        return [s for s in self.manifest["slides"] if s["status"] == "failed"]

    def summary(self) -> str:
        t = self.manifest["totals"]
        rate = self.written_tiles / self.elapsed if self.elapsed else 0.0
        mbs = self.written_bytes / 1e6 / self.elapsed if self.elapsed else 0.0
        lines = [f"tiled {self.dataset_url}: {t['slides_ok']}/{t['slides']} slides ok, "
                 f"{t['slides_failed']} failed, {t['slides_skipped']} skipped; "
                 f"{t['tiles']} tiles in {t['shards']} shards ({t['bytes'] / 1e6:.1f} MB)",
                 f"this run: wrote {self.written_shards} shards, {self.written_tiles} tiles in "
                 f"{self.elapsed:.1f} s ({rate:.1f} tiles/s, {mbs:.1f} MB/s)"]
        for s in self.failed:
            lines.append(f"  FAILED {s['slide_id']} [{s['code']}]: {s['reason']}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- discovery

def discover(cfg: TileConfig) -> list[SlideInput]:
    """Slides of ``cfg.input``, id-sorted: a slide table (CSV/Parquet), one slide file, or a
    folder searched recursively, where a slide's id is its file name without the slide
    extension. Two slides with one id, a missing file, a file that is not a slide by its
    extension, or ids that would share a file name are a ConfigError naming them, before any
    work."""
    src = cfg.input.rstrip("/")
    exts = tuple(cfg.extensions)
    if is_slide_table(src):
        slides = _from_table(src, exts)
    else:
        slides = _from_folder(src, exts, cfg.input)
    fix = ("give the slides other ids in a slide table (slide_id, path columns; "
           "docs/formats.md) and pass it as the input")
    check_ids([(s.slide_id, f"line {s.line}" if s.line else s.url) for s in slides], fix)
    return sorted(slides, key=lambda s: s.slide_id)


def _dicom_siblings(url: str, others: list[str]) -> list[str]:
    """The other .dcm files of a DICOM slide's folder: OpenSlide needs the whole series."""
    return [o for o in others if o != url and o.lower().endswith(".dcm")]


def _from_table(src: str, exts: tuple[str, ...]) -> list[SlideInput]:
    rows = read_slide_table(src)
    bad = [r for r in rows if not r.path.lower().endswith(exts)]
    if bad:
        shown = "; ".join(f"line {r.line} {r.slide_id!r}: {r.path}" for r in bad[:5])
        raise ConfigError(f"slide table {src}: {len(bad)} path(s) are not slide files (by "
                          f"extension; slides end in {', '.join(exts)}): {shown}"
                          f"{' ...' if len(bad) > 5 else ''}; fix the path column, or set "
                          "extensions for another format")
    check_paths(src, rows)
    folders: dict[str, list[str]] = {}
    out = []
    for r in rows:
        sib = []
        if r.path.lower().endswith(".dcm"):
            d = r.path.rsplit("/", 1)[0]
            if d not in folders:
                folders[d] = [storage.join(d, n) for n in storage.listdir(d, "")]
            sib = _dicom_siblings(r.path, folders[d])
        out.append(SlideInput(r.slide_id, r.path, sib, r.patient_id, r.mpp, r.line))
    return out


def _from_folder(src: str, exts: tuple[str, ...], given: str) -> list[SlideInput]:
    if not storage.exists(src):
        raise ConfigError(f"input {given} does not exist; check the --input path (a slide "
                          "file, a folder, or a slide table .csv/.parquet; local or s3://)")
    if src.lower().endswith(exts):
        return [SlideInput(slide_id_for(src), src)]
    rels = [r for r in storage.walk_files(src)
            if r.lower().endswith(exts) and not any(p.startswith(".") for p in r.split("/"))]
    if not rels:
        raise ConfigError(f"no slides found at {given} (looked for {', '.join(exts)}); "
                          "check the input path or set extensions")
    # DICOM: every .dcm of a folder is a candidate slide; siblings travel along so OpenSlide
    # sees the whole series, and files of one series are merged after planning.
    by_dir: dict[str, list[str]] = {}
    for r in rels:
        by_dir.setdefault(r.rsplit("/", 1)[0] if "/" in r else "", []).append(
            storage.join(src, r))
    slides, first = [], {}
    clashes = []
    for r in rels:
        url = storage.join(src, r)
        sid = slide_id_for(r)
        if sid in first:  # a.svs in two folders, or a.svs and a.tiff side by side
            clashes.append(f"{first[sid]} and {url}")
        first.setdefault(sid, url)
        sib = []
        if r.lower().endswith(".dcm"):
            sib = _dicom_siblings(url, by_dir[r.rsplit("/", 1)[0] if "/" in r else ""])
        slides.append(SlideInput(sid, url, sib))
    if clashes:
        raise ConfigError(f"{len(clashes)} slide file name(s) occur twice under {given}, and a "
                          f"slide's id is its file name (parent folders are not part of it): "
                          f"{'; '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}; "
                          "list the slides in a slide table with an id for each (slide_id, "
                          "path columns; docs/formats.md) and pass it as the input")
    return slides


SLIDES_CSV = "slides.csv"
"""The id -> path map of a tile dataset, beside its manifest: a slide table to edit and reuse."""


def _write_slide_map(dataset_url: str, slides: list[SlideInput]) -> None:
    def where(url: str) -> str:  # absolute, so the table reads back from its own folder
        return url if storage.is_s3(url) else str(storage.local_path(url).resolve())

    rows = [SlideRow(s.slide_id, where(s.url), s.patient_id or s.slide_id, s.mpp)
            for s in slides]
    url = storage.join(dataset_url, SLIDES_CSV)
    # Written only when it changes: a re-run over the same slides touches nothing.
    try:
        same = storage.read_text(url) == format_slide_table(rows)
    except FileNotFoundError:
        same = False
    if not same:
        write_slide_table(url, rows)


def _identity(s: SlideInput) -> str:
    """What identifies a slide file's content cheaply: its name(s) and size(s), and the mpp
    a slide table gives it (another mpp is another plan)."""
    ident = ";".join(f"{storage.basename(u)}:{storage.size(u)}" for u in [s.url, *s.siblings])
    return ident if s.mpp is None else f"{ident};mpp={s.mpp!r}"


# ----------------------------------------------------------------------------- phases

def _check_existing(cfg: TileConfig, dataset_url: str, digest: str) -> None:
    if not tile_manifest.exists(dataset_url) or cfg.overwrite:
        return
    old = tile_manifest.read_manifest(dataset_url)
    if old.get("config_digest") != digest:
        raise mismatch_error(dataset_url, "tiles", "tiling config")


def _plan_all(cfg, tasks, dataset_url, slides, digest, progress) -> list[dict]:
    records: dict[str, dict] = {}
    todo = []
    idents = concurrently(_identity, slides, remote=storage.is_s3(cfg.input))
    states = slide_state(dataset_url).read_many(s.slide_id for s in slides)
    for s, ident in zip(slides, idents):
        rec = states.get(s.slide_id)
        # Only successful plans are reused: a failure may have been transient.
        if (rec is not None and rec.get("status") == "ok" and rec.get("config_digest") == digest
                and rec.get("identity") == ident and rec.get("url") == s.url):
            records[s.slide_id] = rec
            continue
        todo.append((s, ident))
    task = tasks.function(plan_slide, describe=lambda a: f"the plan of slide {a[3]}")
    refs = [task.remote(cfg, dataset_url, s.slide_id, s.url, s.siblings, ident, s.mpp, s.line)
            for s, ident in todo]
    tasks.run(refs, lambda r: records.__setitem__(r["slide_id"], r),
              f"plan {len(todo)} slides", "slide", progress)
    return _merge_dicom_series([records[s.slide_id] for s in slides])


def _merge_dicom_series(records: list[dict]) -> list[dict]:
    """Files of one DICOM series describe one slide: keep the first, mark the rest."""
    first: dict[tuple, str] = {}
    for r in records:
        series = r.get("dicom_series")
        if not series:
            continue
        key = (r["url"].rsplit("/", 1)[0], series)
        if key in first:
            r.update(status="skipped", code="duplicate", tiles=0,
                     reason=f"{r['url']}: another file of DICOM series {series} "
                            f"(slide {first[key]})", coords=[], tissue=[])
        else:
            first[key] = r["slide_id"]
    return records


def _assign_shards(cfg: TileConfig, records: list[dict]) -> list[dict]:
    """Each slide's tiles fill shards of its own, named by slide and part (in slide order)."""
    specs = []
    for r in records:
        if r["status"] != "ok":
            continue
        for part, start in enumerate(range(0, r["tiles"], cfg.samples_per_shard)):
            stop = min(start + cfg.samples_per_shard, r["tiles"])
            specs.append({"name": shard_name(r["slide_id"], part), "record": r, "start": start,
                          "stop": stop, "digest": shard_digest(r, start, stop)})
    return specs


def _remove_stale(dataset_url: str, specs: list[dict]) -> None:
    """Shards from an earlier, different plan (slides removed or re-planned) are deleted."""
    planned = {s["name"] for s in specs}
    state = shard_state(dataset_url)
    for name in state.names():
        if name not in planned:
            state.delete(name)
            delete_shard(storage.join(dataset_url, name))


def _clean_temp_files(dataset_url: str) -> None:
    """Temp files of a killed local run (S3 uploads leave nothing visible)."""
    if storage.is_s3(dataset_url):
        return
    root = storage.local_path(dataset_url)
    if root.exists():
        for p in root.rglob(".*.tmp"):
            p.unlink(missing_ok=True)


@dataclass
class WriteStats:
    shards: int = 0
    bytes: int = 0
    rate: Rate = field(default_factory=lambda: Rate("tiles"))  # tiles written, and tiles/s


def _write_all(cfg, tasks, dataset_url, specs, slides_by_id,
               progress) -> tuple[dict, dict, WriteStats]:
    entries: dict[str, dict] = {}
    failures: dict[str, dict] = {}
    todo = []
    listed = listed_shards(dataset_url)  # one listing, not a request per shard
    states = shard_state(dataset_url).read_many(s["name"] for s in specs)
    for s in specs:
        e = states.get(s["name"])
        if (e is not None and e.get("digest") == s["digest"]
                and shard_written(s["name"], e, listed)):
            entries[s["name"]] = e
            continue
        todo.append(s)
    stats = WriteStats()

    def done(e: dict) -> None:
        if e["status"] == "ok":
            entries[e["name"]] = e
            stats.rate.add(e["samples"])
            stats.shards += 1
            stats.bytes += e["bytes"]
        else:
            failures.setdefault(e["slide_id"], e)

    task = tasks.function(write_slide_shard, describe=lambda a: f"shard {a[3]}")
    render = tasks.function(render_part, describe=lambda a: f"tiles of slide {a[1]['url']}")
    slots = tasks.slots
    refs = []
    for s in todo:
        sib = slides_by_id[s["record"]["slide_id"]].siblings
        parts = [render.remote(cfg, s["record"], a, b, sib)
                 for a, b in split_range(s["start"], s["stop"], len(todo), slots)]
        refs.append(task.remote(cfg, dataset_url, s["record"], s["name"], s["start"], s["stop"],
                                s["digest"], sib, *parts))
    tasks.run(refs, done, f"write {len(todo)} shards", "shard", progress,
              rate=lambda: str(stats.rate))
    return entries, failures, stats


MIN_PART_TILES = 32
"""A shard is split into render tasks of at least this many tiles (task overhead ~10 ms)."""


def split_range(start: int, stop: int, shards: int, slots: int) -> list[tuple[int, int]]:
    """Sub-ranges of a shard's tiles to render in parallel when there are fewer shards than
    CPU slots (one big slide uses every core); [] when the shard task should render alone."""
    n = min(-(-slots // max(shards, 1)), (stop - start) // MIN_PART_TILES)
    if n <= 1:
        return []
    edges = [start + (stop - start) * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _manifest(cfg, dataset_url, digest, records, specs, entries, failures) -> dict:
    for sid, f in failures.items():
        rec = next(r for r in records if r["slide_id"] == sid)
        rec.update(status="failed", code=f["code"], reason=f["reason"])
        # Re-plan this slide next time rather than trusting the plan.
        slide_state(dataset_url).write(sid, rec)
    shard_rows = []
    for s in specs:
        r = s["record"]
        if r["status"] == "ok" and s["name"] in entries:
            e = entries[s["name"]]
            # index_sha256: shards written before indexes existed have none (read whole).
            shard_rows.append({k: e[k] for k in ("name", "slide_id", "samples", "bytes",
                                                  "sha256", "index_sha256") if k in e})
            r["shards"].append(s["name"])
    slides = []
    for r in records:
        row = {k: v for k, v in r.items() if k not in ("coords", "tissue", "config_digest",
                                                      "dicom_series")}
        slides.append(row)
    ok = [r for r in records if r["status"] == "ok"]
    totals = {"slides": len(records), "slides_ok": len(ok),
              "slides_failed": sum(r["status"] == "failed" for r in records),
              "slides_skipped": sum(r["status"] == "skipped" for r in records),
              "tiles": sum(s["samples"] for s in shard_rows), "shards": len(shard_rows),
              "bytes": sum(s["bytes"] for s in shard_rows)}
    return {"format": tile_manifest.FORMAT, "dataset": cfg.dataset, "mode": cfg.mode,
            "config": cfg.model_dump(mode="json", exclude=TileConfig.RUN_ONLY),
            "config_digest": digest, "shards": shard_rows, "slides": slides, "totals": totals}


def _tasks(cfg: TileConfig) -> Tasks:
    """Ray tasks, or local processes (``executor``; ``auto`` decides by ``local_reason``)."""
    return open_tasks(cfg.executor, cfg.ray, "tiling", cpus=cfg.task_cpus,
                      preload=("fusedist.tiling.plan",))


def run_tile(cfg: TileConfig, progress: bool = True) -> TileResult:
    """Tile every slide of ``cfg.input`` into ``<output>/<dataset>``; see the module doc."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    dataset_url = storage.join(cfg.output, cfg.dataset)
    digest = config_digest(cfg, TileConfig.RUN_ONLY)
    _check_existing(cfg, dataset_url, digest)
    slides = discover(cfg)
    _write_slide_map(dataset_url, slides)
    _clean_temp_files(dataset_url)
    with _tasks(cfg) as tasks:
        records = _plan_all(cfg, tasks, dataset_url, slides, digest, progress)
        specs = _assign_shards(cfg, records)
        _remove_stale(dataset_url, specs)
        for r in records:
            r["shards"] = []
        entries, failures, stats = _write_all(cfg, tasks, dataset_url, specs,
                                             {s.slide_id: s for s in slides}, progress)
    manifest = _manifest(cfg, dataset_url, digest, records, specs, entries, failures)
    tile_manifest.write(dataset_url, manifest)
    return TileResult(manifest, dataset_url, written_shards=stats.shards,
                      written_tiles=stats.rate.count, written_bytes=stats.bytes,
                      elapsed=time.perf_counter() - t0)
