"""``fusedist demo``: the pipeline end to end on embedded defaults (local Ray, local files).

It goes the way a TCGA user goes: synthetic slides laid out as the GDC client downloads them,
with the two tables such a user has, a slide table (``slides/slides.csv``: slide_id, path,
patient_id, as a LIMS export gives) and a clinical table keyed by patient
(``slides/clinical.csv``: patient_id, label, time, event) -> ``tile`` of the slide table (pairs
for XMAG and a grid for bags) -> a streaming read of the shards -> ``cache`` (two seeded
``test-*`` teachers on the pairs) -> ``embed`` (slide bags from two encoders) -> ``distill`` (a
tiny XMAG student on 2 Ray workers with DeepSpeed, exported and registered in MLflow) ->
``embed`` at 5x with that student -> ``fuse`` (experts, LogitProd, Meta-Encoder, FuseCPath and
baselines, cross-validated, for classification and survival per patient: a patient's slides
pooled, folds by patient) -> ``predict --slides``: the classification model on held-out
synthetic patients (another seed, not in the labels ``fuse`` saw), tiled and embedded as its
card records, one prediction per patient -> a Markdown report with the results tables, plots
and the held-out predictions. Everything is logged to a local MLflow store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import yaml
from pydantic import Field

from fusedist import storage
from fusedist.config import RayConfig, StorageConfig, StrictModel
from fusedist.distill.config import (BatchConfig, CheckpointSection, DistillConfig, OptimConfig,
                                     ScalingSection, StudentConfig, ValidationSection)
from fusedist.distill.split import split_by_slide
from fusedist.features import CacheConfig, EmbedConfig, EngineConfig, run_cache, run_embed
from fusedist.features.slides import tile_grid
from fusedist.formats import tile_manifest
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.metrics import classification_metrics
from fusedist.predict import PredictConfig, run_predict
from fusedist.fusion.run import run_fuse
from fusedist.execution.rayrun import init_ray
from fusedist.synth import SynthConfig, synthesize
from fusedist.synth.dataset import CLINICAL, LABELS, SLIDES
from fusedist.synth.ink import PenConfig
from fusedist.tiling import TileConfig, run_tile
from fusedist.tracking import MlflowConfig


SYNTH_RECIPE = "synth.yaml"  # <workdir>/synth.yaml: the synth config of the demo's slides


class DemoConfig(StrictModel):
    """Embedded defaults for the demo: small enough for a 2-core laptop."""

    workdir: str = "demo-output"
    """Where everything goes: a local folder, or ``s3://bucket/prefix`` (slides, shards, report)."""

    num_slides: int = Field(18, gt=0)
    """Synthetic slides to make (fusion's folds need a few patients per class)."""

    size: int = Field(4096, ge=1024)
    """Level-0 side of each synthetic slide in pixels (at 0.25 µm/px, i.e. 40x)."""

    num_classes: int = Field(2, ge=2)
    """Classes of the synthetic slide-level task."""

    seed: int = 0
    """Seed of the synthetic data."""

    pen: PenConfig = Field(default_factory=lambda: PenConfig(strokes=2, width_um=40.0,
                                                             slide_fraction=0.25))
    """Pen strokes on some synthetic slides (a quarter: blue, green and black ink), which
    ``tile`` takes out of the tissue; ``pen.strokes=0`` for ink-free slides."""
    layout: Literal["gdc", "flat"] = "gdc"
    """How the synthetic slides are laid out: ``gdc``, the way the GDC client downloads TCGA
    (one UUID folder per file, ``TCGA-XX-XXXX-01Z-00-DX1.<UUID>.svs``, two slides for some
    patients: the cohort a user brings first); ``flat``: ``synth-0000.tiff``, ...
    (``fusedist synth``'s ``layout``)."""

    ray: RayConfig = Field(default_factory=lambda: RayConfig())
    """Where Ray runs (default: a private local Ray)."""

    teachers: list[str] = Field(default_factory=lambda: ["test-vit", "test-vit-reg"])
    """Teachers whose features are cached (registry names; ``test-*`` are seeded random)."""

    encoders: list[str] = Field(default_factory=lambda: ["test-vit", "test-convnext"])
    """Encoders that embed slide bags."""

    distill_steps: int = Field(200, ge=1)
    """Optimizer steps of the demo's XMAG student (rounded up to whole epochs); the first
    teacher's features are the targets."""

    fuse_folds: int = Field(3, ge=2)
    """Cross-validation folds of the fuse step."""

    fuse_tasks: list[Literal["classification", "survival", "regression"]] = Field(
        default_factory=lambda: ["classification", "survival"])
    """Tasks the fuse step evaluates (labels from the synthetic cues). ``classification`` and
    ``survival`` are per patient, as TCGA's labels are: ``slides/clinical.csv`` (keyed by
    patient_id) joined to the bags through ``slides/slides.csv``, ``unit: auto`` (-> patient:
    a patient's slides pooled, folds and predictions per patient). ``regression`` (targets
    ``gene_*``, which are per slide) reads the slide-keyed ``slides/labels.csv`` with ``unit:
    slide``."""

    heldout_slides: int = Field(4, ge=0)
    """Held-out synthetic slides (seed ``seed + 1``, in ``heldout/`` with their own
    ``slides.csv`` and ``clinical.csv``, laid out as ``layout`` says (ids ``heldout-*`` when
    flat), not in the labels ``fuse`` uses) that the classification model predicts from the
    raw slides (``predict --slides heldout/slides.csv``, grouped into patients by that table:
    one row per patient); 0 skips that stage."""

    distill_workers: int = Field(2, ge=1)
    """Ray Train workers (DeepSpeed ranks, gloo on CPU) for the student."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """S3 options when ``workdir`` is on S3."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """Tracking; default: a SQLite store in ``<workdir>/mlruns`` (or ``./mlruns`` for S3)."""


@dataclass
class StageTime:
    name: str
    seconds: float
    detail: str


def _read_back(dataset_url: str) -> int:
    """Stream every sample of a dataset once through the training reader."""
    # lazy: the shard reader imports torch, which loading the demo's config must not
    from fusedist.data import ShardReader

    return sum(1 for _ in ShardReader(dataset_url, shuffle=False))


def run_demo(cfg: DemoConfig, progress: bool = True) -> str:
    """Run the demo; returns the URL of its report."""
    # lazy: imports torch, Ray Train and DeepSpeed, which the demo's config must not
    from fusedist.distill.train import run_distill

    storage.configure(cfg.storage)
    root = cfg.workdir.rstrip("/")
    slides, tiles = storage.join(root, "slides"), storage.join(root, "tiles")
    times: list[StageTime] = []

    t = time.perf_counter()
    synth = SynthConfig(output=slides, num_slides=cfg.num_slides, size=cfg.size,
                        num_classes=cfg.num_classes, seed=cfg.seed, pen=cfg.pen,
                        layout=cfg.layout,
                        # Several slides per case, as in TCGA: folds must keep them together.
                        paired_fraction=0.4,
                        storage=cfg.storage)
    synthesize(synth, progress=progress)
    # The recipe of these slides, so more of the same cohort is one command away
    # (`fusedist synth -c <workdir>/synth.yaml --num-slides 22`: docs/retrain.md).
    storage.write_text(storage.join(root, SYNTH_RECIPE), yaml.safe_dump(
        synth.model_dump(mode="json", exclude={"storage"}), sort_keys=False))
    heldout = storage.join(root, "heldout")
    if cfg.heldout_slides:
        synthesize(synth.model_copy(update={"output": heldout, "num_slides": cfg.heldout_slides,
                                            "seed": cfg.seed + 1, "id_prefix": "heldout"}),
                   progress=progress)
    times.append(StageTime("synth", time.perf_counter() - t,
                           f"{cfg.num_slides} slides of {cfg.size} px + {SLIDES}, {CLINICAL}"
                           f" and {LABELS}"
                           + (f"; {cfg.heldout_slides} held-out slides" if cfg.heldout_slides
                              else "")))

    # One Ray for the whole pipeline: every stage below finds it running and reuses it.
    t = time.perf_counter()
    started = init_ray(cfg.ray)
    times.append(StageTime("ray start", time.perf_counter() - t,
                           "once, shared by every stage" if started else "already running"))

    # Every stage that reads slides reads them from the slide table, as a TCGA user's would.
    table = storage.join(slides, SLIDES)
    summaries = []
    for mode, extra in (("pairs", {}), ("grid", {"tile_mpp": 0.5, "tile_size": 224})):
        t = time.perf_counter()
        if mode == "grid":  # the grid the encoders take (as `embed --slides` tiles it)
            res = tile_grid(table, tiles, mode, extra, samples_per_shard=256, ray=cfg.ray,
                            storage=cfg.storage, progress=progress)
        else:
            res = run_tile(TileConfig(input=table, output=tiles, dataset=mode, mode=mode,
                                      samples_per_shard=256, ray=cfg.ray, storage=cfg.storage),
                           progress=progress)
        summaries.append(res.summary())
        tot = res.manifest["totals"]
        inked = sum(r.get("ink_fraction", 0) > 0 for r in res.manifest["slides"])
        times.append(StageTime(f"tile ({mode})", time.perf_counter() - t,
                               f"{tot['tiles']} tiles in {tot['shards']} shards, "
                               f"{tot['slides_failed']} slides failed, pen ink removed on "
                               f"{inked} slides (see thumbnails/)"))

    t = time.perf_counter()
    n = _read_back(storage.join(tiles, "pairs"))
    times.append(StageTime("read (pairs)", time.perf_counter() - t,
                           f"streamed {n} samples through the training reader"))

    mlflow = _mlflow(cfg)
    t = time.perf_counter()
    cache = run_cache(CacheConfig(tiles=storage.join(tiles, "pairs"),
                                  output=storage.join(root, "features"), teachers=cfg.teachers,
                                  engine=EngineConfig(batch_size=64), ray=cfg.ray,
                                  storage=cfg.storage, mlflow=mlflow), progress=progress)
    summaries.append(cache.summary())
    times.append(StageTime("cache", time.perf_counter() - t,
                           f"{len(cfg.teachers)} teachers, {cache.tiles} pairs "
                           f"(16 sub-tiles each), {len(cache.failed)} shards failed"))

    t = time.perf_counter()
    emb = run_embed(EmbedConfig(tiles=storage.join(tiles, "grid"),
                                output=storage.join(root, "bags"), encoders=cfg.encoders,
                                engine=EngineConfig(batch_size=64), ray=cfg.ray,
                                storage=cfg.storage, mlflow=mlflow), progress=progress)
    summaries.append(emb.summary())
    times.append(StageTime("embed", time.perf_counter() - t,
                           f"{emb.written + emb.skipped} bags ({len(cfg.encoders)} encoders), "
                           f"{len(emb.failed)} slides failed"))

    t = time.perf_counter()
    dist = run_distill(_distill_config(cfg, root, tiles, mlflow), progress=progress)
    summaries.append(dist.summary())
    loss = dist.metrics.get("loss")
    times.append(StageTime("distill", time.perf_counter() - t,
                           f"{dist.steps} steps on {cfg.distill_workers} workers"
                           + (f", final loss {loss:.3f}" if loss is not None else "")
                           + f"; exported as {dist.encoder}"))

    t = time.perf_counter()
    emb5 = run_embed(EmbedConfig(slides=table, output=storage.join(root, "bags"),
                                 encoders=[dist.export_dir], min_tissue=0.4,
                                 engine=EngineConfig(batch_size=64), ray=cfg.ray,
                                 storage=cfg.storage, mlflow=mlflow), progress=progress)
    summaries.append(emb5.summary())
    times.append(StageTime("embed (5x student)", time.perf_counter() - t,
                           f"{emb5.written + emb5.skipped} bags from 5x tiles with the student"))

    fused = []
    for task in cfg.fuse_tasks:
        t = time.perf_counter()
        res = run_fuse(_fuse_config(cfg, root, slides, tiles, task, mlflow), progress=progress)
        fused.append(res)
        times.append(StageTime(f"fuse ({task})", time.perf_counter() - t,
                               f"{len(res.methods)} methods x {cfg.fuse_folds} folds; best "
                               f"{res.primary_metric}: {res.best()}"))

    predicted = None
    model = next((r.model for r in fused if r.task == "classification" and r.model), None)
    if cfg.heldout_slides and model:
        t = time.perf_counter()
        predicted = _predict_heldout(cfg, root, heldout, model, mlflow, progress)
        what = "patients" if predicted["unit"] == "patient" else "slides"
        times.append(StageTime("predict (held-out slides)", time.perf_counter() - t,
                               f"{cfg.heldout_slides} held-out slides tiled and embedded, "
                               f"{len(predicted['predicted'])} {what} predicted from the raw "
                               f"slides, {len(predicted['failed'])} failed"))

    report = storage.join(root, "report.md")
    storage.write_text(report, _report(cfg, times, summaries, fused, predicted))
    return report


def _predict_heldout(cfg: DemoConfig, root: str, heldout: str, model: str,
                     mlflow: MlflowConfig, progress: bool) -> dict:
    """``fusedist predict --slides heldout/slides.csv --patients heldout/slides.csv``: the
    classification model on the held-out slides; a patient model (the demo's) pools each
    patient's slides as the table groups them and predicts one row per patient (the result's
    ``unit``)."""
    table = storage.join(heldout, SLIDES)
    pcfg = PredictConfig(model=model, slides=table, patients=table,
                         output=storage.join(root, "predict"),
                         engine=EngineConfig(batch_size=64), ray=cfg.ray, storage=cfg.storage,
                         mlflow=mlflow)
    return run_predict(pcfg, progress=progress)


def _heldout_vs_cv(rows: list[dict], truth: dict[str, str], method: str, probs: list[str],
                   cv: dict | None, key: str = "slide_id") -> list[str]:
    """The held-out units' AUC, balanced accuracy and accuracy for ``method``, beside the
    cross-validated estimate of the same method (``cv``: its summary, metric -> (mean, std)):
    how far the CV number carries to units no fold ever saw. ``key``: the predictions'
    unit column (``patient_id`` for a patient model, whose ``truth`` is per patient)."""
    import numpy as np

    what = "patients" if key == "patient_id" else "slides"
    classes = [c[5:] for c in probs]
    mine = [r for r in rows if r["method"] == method and r[key] in truth
            and truth[r[key]] in classes]
    if not mine:
        return []
    y = np.array([classes.index(truth[r[key]]) for r in mine])
    p = np.array([[float(r[c]) for c in probs] for r in mine])
    got = classification_metrics(y, p)
    acc = float((p.argmax(1) == y).mean())

    def fmt(v: float) -> str:
        return "n/a" if not np.isfinite(v) else f"{v:.3f}"

    lines = [f"| `{method}` | AUC | balanced accuracy | accuracy | {what} |",
             "|---|---:|---:|---:|---|"]
    if cv:
        lines.append("| cross-validation (mean ± std over folds) | "
                     + " | ".join(f"{cv[k][0]:.3f} ± {cv[k][1]:.3f}" if k in cv else "n/a"
                                  for k in ("auc", "balanced_accuracy"))
                     + " | | the labelled cohort |")
    counts = ", ".join(f"{int((y == i).sum())} of class {c}" for i, c in enumerate(classes))
    lines += [f"| held-out {what} (the refit model) | {fmt(got['auc'])} | "
              f"{fmt(got['balanced_accuracy'])} | {acc:.3f} | {len(y)} ({counts}) |", "",
              f"A handful of held-out {what} gives a rough check only (AUC is undefined "
              "without both classes); it says whether the refit model carries the folds' "
              f"estimate to {what} no fold saw.", ""]
    return lines


def _heldout_truth(root: str, key: str) -> dict[str, str]:
    """Held-out unit -> true label: per patient from ``heldout/clinical.csv``, per slide from
    ``heldout/labels.csv``."""
    import csv
    import io

    name = CLINICAL if key == "patient_id" else LABELS
    text = storage.read_text(storage.join(root, "heldout", name))
    return {r[key]: r["label"] for r in csv.DictReader(io.StringIO(text))}


def _predict_section(cfg: DemoConfig, root: str, result: dict,
                     classification=None) -> list[str]:
    """The held-out predictions table: one row per unit (per patient for a patient model: its
    slides pooled), the model's first (best) component's label and probabilities, LogitProd's
    per-expert weights; true labels from the synthesis; then the held-out scores beside the
    CV estimate (``classification``: that FuseResult)."""
    import csv
    import io
    import json

    out = storage.join(root, "predict")
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(out,
                                                                        "predictions.csv")))))
    patient = result["unit"] == "patient"
    key = "patient_id" if patient else "slide_id"
    truth = _heldout_truth(root, key)
    primary = manifest["methods"][0]
    head = list(rows[0]) if rows else []
    probs = [c for c in head if c.startswith("prob_")]
    weights = [c for c in head if c.startswith("weight_")]
    unit = ("patient | slides" if patient else "slide")
    lines = ["## Held-out slides: `fusedist predict --slides`", "",
             f"{cfg.heldout_slides} synthetic slides that `fuse` never saw (`heldout/`, seed "
             f"{cfg.seed + 1}), tiled and embedded as the classification model's card records "
             f"(`predict/tiles/`, `predict/bags/`), then predicted"
             + (" per patient (the model was fused per patient: `heldout/slides.csv` groups "
                "the slides, a patient's slides are pooled; true labels from "
                "`heldout/clinical.csv`)" if patient else "")
             + f". Label and probabilities: `{primary}` (the model's first component: the "
             "CV's best); weights: LogitProd's per-expert weights.", "",
             f"| {unit} | true label | predicted | "
             + " | ".join(f"p({c[5:]})" for c in probs) + " | "
             + " | ".join(f"w({c[7:]})" for c in weights) + " |",
             "|---|" + "---:|" * patient + "---|---|" + "---:|" * (len(probs) + len(weights))]
    by = {(r[key], r["method"]): r for r in rows}
    for uid in manifest["predicted"]:
        r, lp = by[(uid, primary)], by.get((uid, "logitprod"), {})
        n = f" {len(r['slide_id'].split(';'))} |" if patient else ""
        lines.append(f"| {uid} |{n} {truth.get(uid, '')} | {r['predicted']} | "
                     + " | ".join(f"{float(r[c]):.3f}" for c in probs) + " | "
                     + " | ".join(f"{float(lp[c]):.3f}" if lp.get(c) else "" for c in weights)
                     + " |")
    lines += [f"- failed {f['slide_id']}: {f['reason']}" for f in result["failed"]]
    lines += [""] + _heldout_vs_cv(rows, truth, primary, probs, classification.summary.get(
        primary) if classification is not None else None, key)
    if classification is not None and classification.flat:
        lines += [f"**FLAT REFIT {m}**: {why}." for m, why in classification.flat.items()]
        lines.append("")
    lines += ["", "Attention heatmaps of each expert: [predict/heatmaps/](predict/heatmaps/); "
              "every component's predictions: [predict/predictions.csv](predict/predictions.csv)"
              "; [predict/summary.md](predict/summary.md).", ""]
    return lines


def _labels(slides: str, task: str) -> tuple[str, str]:
    """(labels, unit) of a fuse task. Classification and survival: the clinical table, one
    row per patient (TCGA's labels are per case), so ``unit: auto`` makes each patient one
    sample; regression's ``gene_*`` targets differ between a patient's slides, so it reads
    the slide-keyed ``labels.csv`` with ``unit: slide``."""
    if task == "regression":
        return storage.join(slides, LABELS), "slide"
    return storage.join(slides, CLINICAL), "auto"


def _fuse_config(cfg: DemoConfig, root: str, slides: str, tiles: str, task: str,
                 mlflow: MlflowConfig):
    """The fuse step on every bag the demo made (two 20x encoders + the 5x student, which
    joins the logit-level methods), sized for a few dozen tiles per slide; the slide table
    joins the labels' patients to their slides' bags."""
    labels, unit = _labels(slides, task)
    return FuseConfig(
        bags=storage.join(root, "bags"), labels=labels, slides=storage.join(slides, SLIDES),
        unit=unit, task=task,
        target="gene_*" if task == "regression" else "label",
        output=storage.join(root, "fuse", task), folds=cfg.fuse_folds, inner_folds=2,
        seed=cfg.seed, thumbnails=storage.join(tiles, "grid"), heatmaps=1,
        experts={"epochs": 10, "survival_epochs": 10, "hidden": 128},
        logitprod={"lr": 1e-2, "max_epochs": 200, "patience": 30},
        # Long enough to fit: at 6 epochs the folds ranked slides (AUC 0.96) but the refit
        # called one class for every slide; each fold's validation split picks the epoch,
        # the refit trains the folds' median (docs/methods.md, "The final refit").
        meta={"epochs": 30, "select_best": True, "embed_dim": 128, "token_dim": 64},
        fusecpath={"n_clusters": 4, "n_bags": 4, "per_cluster": 4, "region_num": 2, "topk": 8,
                   "epochs": 10, "lr": 0.01, "batch_size": 8},
        ray=cfg.ray, storage=cfg.storage, mlflow=mlflow)


def _distill_config(cfg: DemoConfig, root: str, tiles: str, mlflow: MlflowConfig):
    """A tiny XMAG run: the first teacher's cached features, a seeded test student, the
    default validation split (about a tenth of the slides held out and validated on).

    The micro-batch shrinks with the training pairs so even a very small demo fills a step on
    every worker (Ray Train ranks must take the same number of steps)."""
    val = ValidationSection()
    manifest = tile_manifest.read_manifest(storage.join(tiles, "pairs"))
    n_pairs = split_by_slide(manifest, val.fraction, val.seed).train_tiles
    teacher = cfg.teachers[0]
    micro = max(1, min(4, n_pairs // cfg.distill_workers))
    steps_per_epoch = max(1, n_pairs // (micro * cfg.distill_workers))
    return DistillConfig(
        tiles=storage.join(tiles, "pairs"),
        features=storage.join(root, "features", teacher, "pairs"), teacher=teacher,
        student=StudentConfig(name="test-vit"),
        epochs=math.ceil(cfg.distill_steps / steps_per_epoch),
        batch=BatchConfig(micro_batch=micro,
                          loader_workers=1, shuffle_buffer=64),
        optim=OptimConfig(lr=1e-3, warmup_epochs=0.5),
        scaling=ScalingSection(num_workers=cfg.distill_workers),
        checkpoint=CheckpointSection(every_steps=10, num_to_keep=2), validation=val,
        storage_path=storage.join(root, "runs"), run_name="xmag-demo", ray=cfg.ray,
        storage=cfg.storage, mlflow=mlflow)


def _mlflow(cfg: DemoConfig) -> MlflowConfig:
    """The demo's runs go to a SQLite store beside its outputs unless told otherwise."""
    if cfg.mlflow.tracking_uri or storage.is_s3(cfg.workdir):
        return cfg.mlflow
    db = storage.local_path(cfg.workdir).resolve() / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return cfg.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{db}"})


def tracking_uri(cfg: DemoConfig) -> str:
    return _mlflow(cfg).tracking_uri or "./mlruns"


def _fuse_section(res) -> list[str]:
    """A fuse run's table and plots, linked relative to the demo's report."""
    rel = f"fuse/{res.task}"
    lines = [f"## Fusion: {res.task} ({res.primary_metric}, mean ± std over folds)", "",
             res.table_md, ""]
    if "feature_fusion_per_logitprod" in res.ratios:
        lines += [f"LogitProd's gate trained "
                  f"{res.ratios['feature_fusion_per_logitprod']:.1f}x faster than feature "
                  "fusion (measured).", ""]
    plot = {"classification": "roc.png", "survival": "km.png"}.get(res.task, "regression.png")
    lines += [f"![{res.task}]({rel}/plots/{plot})",
              f"![per fold]({rel}/plots/folds_{res.primary_metric}.png)", "",
              f"Full report: [{rel}/report.md]({rel}/report.md) (attention heatmaps, "
              "exclusions, out-of-fold predictions).", ""]
    return lines


def _report(cfg: DemoConfig, times: list[StageTime], summaries: list[str],
            fused: list | None = None, predicted: dict | None = None) -> str:
    lines = ["# fusedist demo", "", f"Work directory: `{cfg.workdir}`", ""]
    # One line up front: the stages' summaries each carry it, the reader should not dig.
    random_line = next((ln for s in summaries for ln in s.splitlines()
                        if ln.startswith("RANDOM WEIGHTS")), None)
    if random_line:
        lines += [f"**{random_line}**", ""]
    lines += ["| stage | seconds | result |", "|---|---:|---|"]
    lines += [f"| {s.name} | {s.seconds:.1f} | {s.detail} |" for s in times]
    lines += [f"| total | {sum(s.seconds for s in times):.1f} | |", ""]
    for res in fused or []:
        lines += _fuse_section(res)
    if predicted is not None:
        cls = next((r for r in fused or [] if r.task == "classification"), None)
        lines += _predict_section(cfg, cfg.workdir.rstrip("/"), predicted, cls)
    lines += ["", "## Tiling summaries", "", "```", *summaries, "```", "",
              "Thumbnails with the kept tiles outlined: `tiles/<dataset>/thumbnails/`.",
              "Shards and their manifest: `tiles/<dataset>/manifest.json` "
              "(format in docs/formats.md).",
              "Teacher features: `features/<teacher>/pairs/`; slide bags: "
              "`bags/<encoder>/<slide_id>.h5`; the XMAG run (checkpoints, sample log, "
              "export): `runs/xmag-demo/`.", "",
              f"MLflow: `mlflow ui --backend-store-uri {tracking_uri(cfg)}`", ""]
    return "\n".join(lines)
