"""``synthesize``: a whole synthetic data set (slides, masks, labels) at a URL, resumably.

Beside the slides go three tables: ``labels.csv`` (one row per slide, every target and cue),
and the two a TCGA user starts from, ``slides.csv`` (a slide table, as a LIMS export gives:
slide_id, path relative to the table, patient_id) and ``clinical.csv`` (one row per patient:
patient_id, label, time, event).

Per slide the spec (cues, seed, geometry, rendering options, generator and codec versions)
has a digest. ``synth_manifest.json`` records the digest, size and sha256 of every finished
slide and is rewritten after each one, so a killed run resumes where it stopped and a re-run
with the same config renders nothing and leaves every byte as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from fusedist import storage
from fusedist.formats.slide_table import SlideRow, write_slide_table
from fusedist.synth.config import SynthConfig
from fusedist.synth.cues import SlideLabels, clinical_csv, labels_csv, make_labels
from fusedist.synth.fields import tissue_mask
from fusedist.synth.slide import GENERATOR_VERSION, RenderOptions, make_slide

MANIFEST = "synth_manifest.json"
LABELS = "labels.csv"
"""One row per slide: slide_id, patient_id, label, time, event, gene_*, cue_*."""
SLIDES = "slides.csv"
"""The slide table (slide_id, path relative to it, patient_id): what ``tile`` and ``fuse``'s
``slides`` read."""
CLINICAL = "clinical.csv"
"""One row per patient (patient_id, label, time, event): labels keyed by patient."""
log = logging.getLogger(__name__)


@dataclass
class SlideSpec:
    """Everything that determines one slide's pixels and labels."""

    labels: SlideLabels
    seed: int
    width: int
    height: int
    mpp: float
    options: RenderOptions
    path: str = ""
    """Where the slide goes, relative to the output (``<slide_id>.tiff`` when empty)."""

    @property
    def slide_id(self) -> str:
        return self.labels.slide_id

    def digest(self) -> str:
        options = asdict(self.options)
        if not self.options.pen_strokes:  # unmarked: the digest of slides before pens existed
            options = {k: v for k, v in options.items() if not k.startswith("pen_")}
        payload = {
            "generator": GENERATOR_VERSION, "tifffile": tifffile.__version__,
            "jpeg": imagecodecs.__version__, "seed": self.seed, "cues": self.labels.cues,
            "size": [self.width, self.height], "mpp": self.mpp, "options": options,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def mask(self) -> np.ndarray:
        """The slide's tissue mask (what ``masks/<slide_id>.png`` holds, True = tissue)."""
        o = self.options
        return tissue_mask(self.width, self.height, self.seed, o.tissue_fraction,
                           o.mask_downsample)

    def ink_args(self) -> dict | None:
        """``ink_mask(**ink_args)`` is where this slide's strokes are; None: no strokes."""
        o = self.options
        if not o.pen_strokes:
            return None
        return {"width": self.width, "height": self.height, "mpp": self.mpp, "seed": self.seed,
                "strokes": o.pen_strokes, "colours": list(o.pen_colours),
                "width_um": o.pen_width_um, "downsample": o.mask_downsample}


def slide_seed(seed: int, index: int) -> int:
    """Independent 32-bit seed of slide ``index`` in a data set seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _hex(seed: int, *what: object) -> str:
    return hashlib.sha256(":".join(map(str, ("fusedist.synth.gdc", seed, *what))).encode()
                          ).hexdigest()


def _uuid(h: str) -> str:
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def gdc_names(seed: int, rows: list[SlideLabels]) -> list[tuple[SlideLabels, str]]:
    """``rows`` renamed the way TCGA slides come from the GDC: slide id
    ``TCGA-<TSS>-<participant>-01Z-00-DX<n>.<UUID>``, patient id its first 12 characters
    (``DX2`` is a patient's second slide), each with its path ``<file uuid>/<slide_id>.svs``.
    Seeded, so a data set's names are the same on every run."""
    barcodes: dict[str, str] = {}
    slides: dict[str, int] = {}
    out = []
    for i, r in enumerate(rows):
        if r.patient_id not in barcodes:
            salt = 0
            while True:  # distinct patients get distinct barcodes, however unlikely a clash
                h = int(_hex(seed, r.patient_id, salt), 16)
                code = "".join(_ALNUM[(h >> (6 * k)) % 36] for k in range(6))
                barcode = f"TCGA-{code[:2]}-{code[2:]}"
                if barcode not in barcodes.values():
                    break
                salt += 1
            barcodes[r.patient_id] = barcode
        slides[r.patient_id] = slides.get(r.patient_id, 0) + 1
        sid = (f"{barcodes[r.patient_id]}-01Z-00-DX{slides[r.patient_id]}."
               f"{_uuid(_hex(seed, 'slide', i)).upper()}")
        folder = _uuid(_hex(seed, "file", i))
        out.append((dataclasses.replace(r, slide_id=sid, patient_id=sid[:12]),
                    f"{folder}/{sid}.svs"))
    return out


def slide_specs(cfg: SynthConfig) -> list[SlideSpec]:
    """Labels and render parameters of every slide of ``cfg`` (cheap: no pixels)."""
    rows = make_labels(cfg.seed, cfg.num_slides, cfg.label_params())
    named = (gdc_names(cfg.seed, rows) if cfg.layout == "gdc"
             else [(r, f"{r.slide_id}.tiff") for r in rows])
    width, height = cfg.width_height
    out = []
    for i, (row, path) in enumerate(named):
        jitter = math.exp(np.random.default_rng([cfg.seed, 0x715, i]).normal(
            0, cfg.tissue_fraction_jitter))
        frac = round(float(np.clip(cfg.tissue_fraction * jitter, 0.1, 0.9)), 4)
        marked = np.random.default_rng([cfg.seed, 0x1A5, i]).random() < cfg.pen.slide_fraction
        out.append(SlideSpec(row, slide_seed(cfg.seed, i), width, height, cfg.mpp,
                             cfg.render_options(frac, marked), path))
    return out


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_done(spec: SlideSpec, entry: dict | None, url: str, mask_url: str) -> bool:
    """A slide is done when the manifest matches its spec and the files are there intact."""
    if not entry or entry.get("digest") != spec.digest():
        return False
    if not (storage.exists(url) and storage.exists(mask_url)):
        return False
    if storage.is_s3(url):  # a HEAD is cheap; hashing would mean a download
        return storage.size(url) == entry.get("bytes")
    return _sha256(storage.local_path(url)) == entry.get("sha256")


def _render(spec: SlideSpec, tiff: str, mask: str, show_tiles: bool) -> dict[str, Any]:
    """Render one slide to local files (runs in a worker process when ``workers > 1``)."""
    bar = None
    if show_tiles:
        from tqdm import tqdm
        t = spec.options.tile_size
        bar = tqdm(total=math.ceil(spec.width / t) * math.ceil(spec.height / t), unit="tile",
                   desc=spec.slide_id, leave=False)
    try:
        info = make_slide(tiff, (spec.width, spec.height), spec.mpp, spec.labels.cues,
                          spec.seed, spec.options, mask_path=mask, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return {"levels": info.downsamples, "tissue_fraction": round(info.tissue_fraction, 4),
            "n_nuclei": info.n_nuclei, "n_glands": info.n_glands,
            "seconds": round(info.seconds, 2), "bytes": os.path.getsize(tiff),
            "sha256": _sha256(tiff)}


def _publish(local: str, url: str) -> None:
    if storage.is_s3(url):
        storage.upload_file(local, url)
    else:
        dest = storage.local_path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, dest)  # same filesystem: the staging dir lives in the output dir


def _staging_dir(output: str) -> tempfile.TemporaryDirectory:
    if storage.is_s3(output):
        return tempfile.TemporaryDirectory(prefix="fusedist-synth-")
    root = storage.local_path(output)
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".synth-staging-", dir=root)


def _read_manifest(url: str) -> dict[str, dict]:
    if not storage.exists(url):
        return {}
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return dict(storage.read_json(url)["slides"])
    return {}


def synthesize(cfg: SynthConfig, progress: bool = True) -> list[dict]:
    """Write the data set described by ``cfg`` and return one record per slide.

    Slides go to ``<output>/<slide_id>.tiff`` (``layout: gdc``: ``<uuid>/<slide_id>.svs``),
    masks to ``<output>/masks/<slide_id>.png``; ``<output>/labels.csv`` holds slide_id,
    patient_id, label, time, event, gene_*, cue_*, ``slides.csv`` the slide table and
    ``clinical.csv`` one row per patient (:func:`write_tables`).
    Finished slides whose spec is unchanged are skipped (``record["skipped"]``); slides that
    an earlier run of this output recorded but the config no longer has (a smaller
    ``num_slides``) are deleted, so a later ``fusedist tile`` of the folder sees only these.
    ``tissue_mask(**record["mask_args"])`` regenerates a slide's mask.
    """
    storage.configure(cfg.storage)
    out = cfg.output.rstrip("/")
    specs = slide_specs(cfg)
    manifest_url = storage.join(out, MANIFEST)
    manifest = _read_manifest(manifest_url)
    urls = {s.slide_id: _urls(out, s.slide_id, s.path) for s in specs}
    todo = [s for s in specs if not _is_done(s, manifest.get(s.slide_id), *urls[s.slide_id])]
    if len(todo) < len(specs):
        log.info("synth: %d of %d slides already done at %s", len(specs) - len(todo),
                 len(specs), out)
    _drop_stale(out, manifest, {s.slide_id for s in specs})

    from tqdm import tqdm
    seconds: dict[str, float] = {}
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), unit="slide", desc="synth",
               disable=not progress)

    def save_manifest() -> None:
        storage.write_json(manifest_url, {"generator": GENERATOR_VERSION,
                                          "slides": dict(sorted(manifest.items()))})

    with _staging_dir(out) as stage:
        def finish(spec: SlideSpec, result: dict[str, Any]) -> None:
            tiff_url, mask_url = urls[spec.slide_id]
            _publish(os.path.join(stage, f"{spec.slide_id}.png"), mask_url)
            _publish(os.path.join(stage, f"{spec.slide_id}.tiff"), tiff_url)
            seconds[spec.slide_id] = result.pop("seconds")  # timings would break byte-identity
            # path: only where it is not the flat layout's, so those manifests keep their bytes
            where = {"path": spec.path} if spec.path != f"{spec.slide_id}.tiff" else {}
            manifest[spec.slide_id] = {"digest": spec.digest(), **where, **result}
            save_manifest()  # after every slide: a killed run resumes from here
            bar.update(1)

        def paths(spec: SlideSpec) -> tuple[str, str]:
            return (os.path.join(stage, f"{spec.slide_id}.tiff"),
                    os.path.join(stage, f"{spec.slide_id}.png"))

        if cfg.workers > 1 and len(todo) > 1:
            # spawn, not fork: the caller may hold threads (boto3, Ray, tqdm) and BLAS pools.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(cfg.workers, len(todo)), mp_context=ctx) as pool:
                futures = [(s, pool.submit(_render, s, *paths(s), False)) for s in todo]
                for spec, fut in futures:
                    finish(spec, fut.result())
        else:
            for spec in todo:
                finish(spec, _render(spec, *paths(spec), progress))
    bar.close()
    if set(manifest) != {s.slide_id for s in specs}:  # stale entries were dropped
        manifest = {s.slide_id: manifest[s.slide_id] for s in specs}
        save_manifest()
    write_tables(out, specs)
    return [_record(s, urls[s.slide_id], manifest[s.slide_id], seconds.get(s.slide_id))
            for s in specs]


def write_tables(out: str, specs: list[SlideSpec]) -> None:
    """``labels.csv``, ``slides.csv`` and ``clinical.csv`` of ``specs`` under ``out``.

    The slide table's paths are relative to it (read_slide_table joins them to its folder),
    so the data set can be moved or copied to S3 and still be read."""
    rows = [s.labels for s in specs]
    storage.write_text(storage.join(out, LABELS), labels_csv(rows))
    write_slide_table(storage.join(out, SLIDES),
                      [SlideRow(s.slide_id, s.path or f"{s.slide_id}.tiff", s.labels.patient_id)
                       for s in specs])
    storage.write_text(storage.join(out, CLINICAL), clinical_csv(rows))


def _urls(out: str, slide_id: str, path: str = "") -> tuple[str, str]:
    """(slide, mask) URLs of a slide: at ``path`` under ``out`` (default the flat layout's)."""
    return (storage.join(out, path or f"{slide_id}.tiff"),
            storage.join(out, "masks", f"{slide_id}.png"))


def _drop_stale(out: str, manifest: dict[str, dict], keep: set[str]) -> None:
    """Delete slides this output's manifest recorded that the config no longer makes."""
    for slide_id in sorted(set(manifest) - keep):
        log.info("synth: removing %s (not in this config any more)", slide_id)
        for url in _urls(out, slide_id, manifest[slide_id].get("path", "")):
            storage.delete(url)
        del manifest[slide_id]


def _record(spec: SlideSpec, urls: tuple[str, str], entry: dict, seconds: float | None) -> dict:
    lab, o = spec.labels, spec.options
    return {
        "slide_id": lab.slide_id, "patient_id": lab.patient_id, "label": lab.label,
        "time": lab.time, "event": lab.event, **lab.genes,
        **{f"cue_{k}": v for k, v in lab.cues.items()},
        "url": urls[0], "mask_url": urls[1], "width": spec.width, "height": spec.height,
        "mpp": spec.mpp, "seed": spec.seed,
        "mask_args": {"width": spec.width, "height": spec.height, "seed": spec.seed,
                      "tissue_fraction": o.tissue_fraction, "downsample": o.mask_downsample},
        **({"ink_args": spec.ink_args()} if spec.ink_args() else {}),
        **{k: v for k, v in entry.items() if k != "digest"},
        "skipped": seconds is None, "seconds": seconds,
    }
