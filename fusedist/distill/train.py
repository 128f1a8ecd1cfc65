"""``fusedist distill``: XMAG cross-magnification distillation on Ray Train + DeepSpeed.

The driver (:func:`run_distill`) checks the data, opens the MLflow run and starts a
``TorchTrainer``; each worker runs :func:`train_loop`: ``deepspeed.initialize`` on the student
(+ heads; the teacher is cached features, never in the loop), then the loop below. Ray Train
restarts a failed worker group (``max_failures``) from the newest checkpoint, and running the
command again with the same ``run_name`` resumes a stopped run the same way. At the end the
EMA student is exported as an encoder and registered in MLflow (:func:`export_checkpoint`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.distill.augment import PairAugment
from fusedist.distill.checkpoint import (Checkpointer, TrainState, find_checkpoint,
                                         load_ema_student, sample_log_fraction)
from fusedist.distill.config import DistillConfig, ExportConfig
from fusedist.distill.data import DataInfo, DistillData, dataset_info, steps_per_epoch
from fusedist.distill.ema import EMA, step_with_ema
from fusedist.distill.export import export_student, register_in_mlflow
from fusedist.distill.losses import XmagObjective
from fusedist.distill.metrics import StepLogger, system_monitor, worker_tracker
from fusedist.distill.progress import StepReporter, distill_bar
from fusedist.distill.schedule import lr_at
from fusedist.execution.sharedfs import alive_nodes, check_storage_reachable
from fusedist.distill.stop import DistillStopped, last_committed, prune_unregistered, stoppable
from fusedist.distill.validation import Validator
from fusedist.formats.export_card import CARD
from fusedist.lineage import features_ref, tiles_ref
from fusedist.models import get_spec
from fusedist.models.student import XmagStudent
from fusedist.execution.rayrun import init_ray
from fusedist.state import StageState
from fusedist.tracking import random_weights_line, start_run, warn_random_weights

log = logging.getLogger("fusedist.distill")


# ----------------------------------------------------------------------------- DeepSpeed

def ds_config(cfg: DistillConfig, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO stage, precision, clipping, batch and AdamW from ``cfg``."""
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch,
        "gradient_accumulation_steps": cfg.batch.accumulation,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": o.clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bool(cuda and cfg.bf16)},  # CPU workers train in fp32
        # torch_adam: torch's AdamW instead of DeepSpeed's JIT-built fused Adam (its build
        # fails on CPU-only machines and on H100's '9.0a' arch string).
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas),
                                                  "eps": o.eps, "weight_decay": o.weight_decay,
                                                  "torch_adam": True}},
        "steps_per_print": 10**9,  # our own logger reports steps
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices only: biases, norms, tokens and position embeddings stay free."""
    decay, free = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "pos_embed" not in name and "token" not in name
             else free).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": free, "weight_decay": 0.0}]


def build_engine(cfg: DistillConfig, teacher_dim: int) -> tuple[Any, Any]:
    """``deepspeed.initialize`` on a fresh student, and its EMA (inside a Ray Train worker)."""
    import deepspeed

    torch.manual_seed(cfg.batch.seed)  # same head init on every rank (DeepSpeed also broadcasts)
    weights = cfg.student.weights
    if weights and storage.is_s3(weights):
        # e.g. `fusedist retrain`'s warm start from the champion: every node fetches its copy.
        storage.configure(cfg.storage)
        weights = str(storage.fetch_local(weights, subdir="models"))
    student = XmagStudent.from_registry(cfg.student.name, teacher_dim=teacher_dim,
                                        weights=weights, grid=cfg.student.grid)
    engine, _, _, _ = deepspeed.initialize(
        model=student, model_parameters=param_groups(student, cfg.optim.weight_decay),
        config=ds_config(cfg, torch.cuda.is_available()))
    return engine, EMA(engine.module, cfg.ema_decay)


# ----------------------------------------------------------------------------- worker loop

def _maybe_fail(cfg: DistillConfig, step: int, rank: int, ckpt: Checkpointer) -> None:
    """Test hook: ``fault.rank`` fails at ``fault.at_step``, on the first attempt only, once the
    checkpoint before it is committed (so the test knows where the run resumes): it hard-exits,
    or (``hang``) names its node in the marker and waits for the test to remove that node."""
    f = cfg.fault
    if f.at_step is None or step != f.at_step or rank != f.rank:
        return
    marker = storage.join(cfg.run_url(), "_fault", f"step-{step}-rank-{rank}")
    if storage.exists(marker):
        return
    ckpt.wait_committed()
    if f.mode == "hang":
        import ray

        storage.write_text(marker, ray.get_runtime_context().get_node_id() + "\n")
        log.error("fault injection: rank %d stops at step %d until its node is lost", rank, step)
        while True:
            time.sleep(1)
    storage.write_text(marker, "injected\n")
    log.error("fault injection: rank %d exits at step %d", rank, step)
    os._exit(17)


def _batch_seed(seed: int, epoch: int, batch: dict[str, Any]) -> int:
    # A function of the batch's identity, so a resumed run draws the same augmentations.
    ident = (seed, epoch, int(batch["__slot__"][0]), int(batch["__index__"][0]))
    return int.from_bytes(hashlib.sha256(repr(ident).encode()).digest()[:7], "little")


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: one rank of the XMAG run (Ray Train V2)."""
    import ray.train
    import ray.train.torch

    cfg = DistillConfig.model_validate(config["cfg"])
    info = DataInfo(**config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    storage.configure(cfg.storage)
    monitor = system_monitor(config.get("mlflow"), rank, ctx.get_local_rank(),
                             ctx.get_node_rank())
    device = ray.train.torch.get_device()
    engine, ema = build_engine(cfg, info.dim)
    ckpt = Checkpointer(cfg.run_url(), rank, world, cfg.sample_log,
                        sample_log_fraction(cfg.sample_log_keys, info.samples))
    state = ckpt.restore(engine, ema) or TrainState(meta=config["meta"])
    data = DistillData(cfg, info.teacher, rank, world, state.cursor,
                       pin_memory=device.type == "cuda", shards=info.train_shards)
    spe = data.steps_per_epoch
    total, warmup = spe * cfg.epochs, round(cfg.optim.warmup_epochs * spe)
    objective = XmagObjective(cfg.loss.global_weight, cfg.loss.local_weight)
    augment = PairAugment(flip_p=cfg.augment.flip_p, jitter_p=cfg.augment.jitter_p,
                          grid=cfg.student.grid, backend=cfg.augment.backend)
    logger = StepLogger(worker_tracker(config.get("mlflow"), rank), cfg.log_every,
                        cfg.global_batch, device)
    report = StepReporter(config.get("progress"), rank)  # the driver's progress bar
    validate = Validator(cfg, info, rank, world, device)  # the EMA student on held-out slides
    gen = torch.Generator(device=device)
    for epoch in range(state.epoch, cfg.epochs):
        for batch in data.epoch(epoch, state.step):
            _maybe_fail(cfg, state.step, rank, ckpt)
            lr = lr_at(state.step, total, cfg.optim.lr, warmup, cfg.optim.schedule,
                       cfg.optim.min_lr)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            gen.manual_seed(_batch_seed(cfg.batch.seed, epoch, batch))
            images = batch["image"].to(device, non_blocking=True).float().div_(255.0)
            targets = batch["target"].to(device, non_blocking=True).float()
            images, targets = augment(images, targets, gen)
            out = objective(engine(engine.module.normalize(images)), targets)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(out["loss"])
            step_with_ema(engine.step, ema, engine.module, boundary, cfg.ema_update)
            data.consumed(batch)
            ckpt.samples.add(epoch, state.step, batch["__key__"])
            if not boundary:
                continue
            state.step += 1
            state.samples += cfg.global_batch
            logger.step(state.step, out, lr, epoch)
            report(state.step, logger.last)
            if validate.due(state.step, total):
                state.validation = validate(ema.module, state.step)
                logger.log(validate.last, state.step)
            epoch_done = state.step % spe == 0
            if epoch_done:
                data.end_epoch()
                state.epoch = epoch + 1
            if epoch_done or state.step % cfg.checkpoint.every_steps == 0:
                ckpt.save(engine, ema, state, data.cursor, {**logger.last, **validate.last})
    ckpt.wait_committed()
    logger.close()
    if monitor is not None:
        monitor.stop_system_metrics()
    report(state.step, logger.last, final=True)


# ----------------------------------------------------------------------------- driver

@dataclass
class DistillResult:
    run_url: str
    checkpoint: str | None
    steps: int
    epochs: int
    metrics: dict[str, Any] = field(default_factory=dict)
    export_dir: str | None = None
    encoder: str | None = None
    model_version: str | None = None
    mlflow_run_id: str | None = None
    elapsed: float = 0.0
    random_weights: list[str] = field(default_factory=list)  # student/teacher without weights
    validation: dict[str, Any] | None = None  # the last checkpoint's validation of the EMA

    def summary(self) -> str:
        lines = [f"distill run {self.run_url}: {self.steps} steps, {self.epochs} epoch(s) in "
                 f"{self.elapsed:.1f} s; last checkpoint {self.checkpoint}"]
        if self.metrics:
            lines.append("  " + ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items()
                                          if isinstance(v, (int, float))))
        if v := self.validation:
            lines.append(f"  EMA student on {v['tiles']} held-out validation tiles at step "
                         f"{v['step']}: global cos {v['global_cos']:.4f}, local cos "
                         f"{v['local_cos']:.4f}")
        if self.export_dir:
            lines.append(f"  exported EMA student '{self.encoder}' to {self.export_dir}"
                         + (f" (MLflow version {self.model_version})" if self.model_version
                            else ""))
        lines += [x for x in [random_weights_line(self.random_weights)] if x]
        return "\n".join(lines)


def _absolute(cfg: DistillConfig) -> DistillConfig:
    """Local paths made absolute (Ray Train workers run in their own working directory) and
    the S3 endpoint resolved here, so workers need no environment of ours."""
    def fix(url: str) -> str:
        return url if "://" in url else str(Path(url).expanduser().resolve())

    storage_cfg = cfg.storage.model_copy(update={"endpoint_url": storage.endpoint_url()})
    return cfg.model_copy(update={"tiles": fix(cfg.tiles), "features": fix(cfg.features),
                                  "storage_path": fix(cfg.storage_path),
                                  "storage": storage_cfg})


def ray_storage(cfg: DistillConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig. pyarrow's S3FileSystem ignores
    AWS_ENDPOINT_URL, so the endpoint is passed explicitly; credentials stay with the AWS
    chain of each process (never serialised into the job)."""
    if not storage.is_s3(cfg.storage_path):
        return cfg.storage_path, None
    import pyarrow.fs

    bucket, prefix = storage.split_s3(cfg.storage_path)
    kw: dict[str, Any] = {"region": cfg.storage.region or os.environ.get("AWS_DEFAULT_REGION")
                          or "us-east-1"}
    if ep := storage.endpoint_url():
        u = urlparse(ep)
        kw.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    return f"{bucket}/{prefix}".rstrip("/"), pyarrow.fs.S3FileSystem(**kw)


def make_trainer(cfg: DistillConfig, loop_config: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    # DeepSpeed picks CUDA if it can import it; CPU workers must say so.
    env = {} if s.use_gpu else {"DS_ACCELERATOR": "cpu"}
    path, fs = ray_storage(cfg)
    return stoppable(TorchTrainer)(  # SIGTERM stops it like Ctrl-C (fusedist.distill.stop)
        train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=cfg.checkpoint.num_to_keep),
                             worker_runtime_env={"env_vars": env}))


def _fit(trainer: Any, cfg: DistillConfig) -> Any:
    """``trainer.fit()``; a SIGINT/SIGTERM stops it and raises :class:`DistillStopped` saying
    which checkpoint is kept and how to resume."""
    import signal

    try:
        return trainer.fit()
    except Exception:
        if trainer.stopped_by is None:
            raise
    finally:
        # Ray's handlers point at a controller that is gone once fit returns.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    prune_unregistered(cfg.run_url())  # the workers are dead: what they left unregistered goes
    ckpt = last_committed(cfg.run_url())
    kept = "no checkpoint was committed yet, so a re-run starts from step 0"
    if ckpt is not None:
        step = storage.read_json(storage.join(ckpt, "fusedist_state.json"))["step"]
        kept = f"kept the last committed checkpoint {ckpt} (step {step})"
    name = signal.Signals(trainer.stopped_by).name
    raise DistillStopped(trainer.stopped_by,
                         f"distill run {cfg.run_name} stopped by {name}; {kept}. Resume by "
                         f"running the same command again (same run_name={cfg.run_name} and "
                         f"storage_path={cfg.storage_path})")


def _checkpoint_url(cfg: DistillConfig, ckpt: Any) -> str | None:
    if ckpt is None:
        return None
    return f"s3://{ckpt.path}" if storage.is_s3(cfg.storage_path) else str(ckpt.path)


def _guard_run(cfg: DistillConfig, meta: dict) -> None:
    """A re-run resumes ``run_name`` only when it trains the same thing: the same student
    architecture and init, teacher and teacher weights, and data. Resuming a checkpoint of
    another teacher or dataset would silently mix two trainings into one export."""
    import hashlib
    import json

    keys = ("student", "teacher", "teacher_dim", "grid", "teacher_weights_digest",
            "data_digest", "init_weights")
    guarded = {k: meta.get(k) for k in keys}
    if meta.get("validation"):  # only then: runs without validation keep their digest
        guarded["validation_slides"] = meta["validation"]["slides"]
    digest = hashlib.sha256(json.dumps(guarded, sort_keys=True).encode()).hexdigest()
    StageState(cfg.run_url()).guard(
        digest, overwrite=False, what=f"distill run {cfg.run_name!r}",
        differs="student, teacher, data or validation slides (validation.fraction/seed)",
        fix="choose another run_name, or delete that folder to start the run over")


def run_distill(cfg: DistillConfig, progress: bool = True) -> DistillResult:
    """Train (or resume) the run ``cfg.run_name`` and export its EMA student."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    cfg = _absolute(cfg)
    info = dataset_info(cfg)
    spe = steps_per_epoch(info.samples, cfg.scaling.num_workers, cfg.batch.loader_workers,
                          cfg.batch.micro_batch, cfg.batch.accumulation)
    split = info.split or {}
    if spe == 0:
        held = (f" (after holding out {len(split['slides'])} validation slide(s); "
                "validation.fraction=0 trains on all)" if split.get("slides") else "")
        raise ConfigError(f"{info.samples} training samples{held} do not fill one step of "
                          f"global batch {cfg.global_batch}; lower batch.micro_batch or "
                          "scaling.num_workers")
    if cfg.validation.fraction > 0 and not split.get("slides"):
        log.warning("validation.fraction=%g but the data has %d slide(s): nothing is held out "
                    "and the run is not validated", cfg.validation.fraction,
                    split.get("train_slides", 0))
    student_spec = get_spec(cfg.student.name)
    student_random = cfg.student.weights in (None, "random")
    meta = {"student": cfg.student.name, "teacher": info.teacher, "teacher_dim": info.dim,
            "grid": cfg.student.grid, "teacher_weights_digest": info.teacher_weights_digest,
            "data_digest": info.data_digest, "run_name": cfg.run_name,
            "init_weights": cfg.student.weights or "random", "mpp": student_spec.mpp,
            "teacher_random_weights": info.teacher_random_weights}
    if split.get("slides"):
        meta["validation"] = {k: split[k] for k in ("slides", "fraction", "seed")}
    init_ray(cfg.ray)
    check_storage_reachable(cfg.storage_path, cfg.storage_shared, alive_nodes())
    _guard_run(cfg, meta)
    storage.write_json(storage.join(cfg.run_url(), "validation.json"), split)
    log.info("distill %s: %d samples, %d steps/epoch x %d epochs, global batch %d on %d "
             "worker(s)", cfg.run_name, info.samples, spe, cfg.epochs, cfg.global_batch,
             cfg.scaling.num_workers)
    # system_metrics=False: the training workers sample their nodes (metrics.system_monitor).
    with start_run(cfg.mlflow, run_name=f"distill-{cfg.run_name}", params=cfg,
                   tags={"fusedist.stage": "distill", "fusedist.run_name": cfg.run_name,
                         "fusedist.teacher": info.teacher}, system_metrics=False) as run:
        random_models = {*([cfg.student.name] if student_random else []),
                         *([info.teacher] if info.teacher_random_weights else [])}
        warn_random_weights(run, random_models)
        if run.active:
            run.log_datasets([tiles_ref(cfg.tiles), features_ref(cfg.features)])
        run.log_dict(cfg, "config/distill.yaml")
        run.log_dict(split, "validation/split.json")
        run.log_metrics({"samples": info.samples, "steps_per_epoch": spe,
                         "global_batch": cfg.global_batch,
                         "val/slides": len(split.get("slides", [])),
                         "val/tiles": split.get("tiles", 0)})
        sm = ({"interval": cfg.mlflow.system_metrics_interval} if cfg.mlflow.system_metrics
              else None)
        mlflow = ({"run_id": run.run_id, "tracking_uri": run.tracking_uri,
                   "system_metrics": sm} if run.active else None)
        with distill_bar(spe * cfg.epochs, enabled=progress) as bar:
            trainer = make_trainer(cfg, {"cfg": cfg.model_dump(mode="json"),
                                         "data": info.to_dict(), "meta": meta,
                                         "mlflow": mlflow, "progress": bar})
            prune_unregistered(cfg.run_url())  # folders a stopped attempt left half-uploaded
            result = _fit(trainer, cfg)
        if result.error is not None:
            # Chained: the CLI finds a storage failure (ENOSPC...) inside the workers' error.
            raise RuntimeError(f"distill run {cfg.run_name} failed: {result.error}"
                               ) from result.error
        ckpt = _checkpoint_url(cfg, result.checkpoint)
        out = DistillResult(run_url=cfg.run_url(), checkpoint=ckpt, steps=0, epochs=0,
                            metrics=dict(result.metrics or {}), mlflow_run_id=run.run_id,
                            random_weights=sorted(random_models))
        if ckpt is not None:
            state = storage.read_json(storage.join(ckpt, "fusedist_state.json"))
            out.steps, out.epochs = int(state["step"]), int(state["epoch"])
            out.validation = state.get("validation")
        export_dir = cfg.export.output or storage.join(cfg.run_url(), "export")
        if cfg.export.enabled and ckpt is not None:
            # A re-run of a finished run finds the export done and its registered version.
            out.export_dir, out.encoder, out.model_version = export_checkpoint(
                ckpt, export_dir, cfg.export.name, run, cfg.export.registered_model,
                cfg.export.alias)
        out.elapsed = time.perf_counter() - t0
        run.log_metrics({"elapsed_s": out.elapsed, "steps_total": out.steps})
    return out


# ----------------------------------------------------------------------------- export

def _exported(export_dir: str, checkpoint: str, name: str | None) -> bool:
    """Whether ``export_dir`` already holds the export of ``checkpoint`` (named ``name``)."""
    url = storage.join(export_dir, "card.json")
    if not storage.exists(url):
        return False
    card = storage.read_json(url)
    return card.get("checkpoint") == checkpoint and name in (None, card.get("name"))


def export_checkpoint(checkpoint: str, out_dir: str, name: str | None, tracker: Any,
                      registered_model: str, alias: str) -> tuple[str, str, str | None]:
    """EMA student of ``checkpoint`` -> an encoder folder; registered in MLflow via
    ``tracker`` (no-op trackers skip it). Returns (folder, encoder name, model version).

    A folder that already holds this checkpoint's export is kept as it is (a re-export would
    only change its ``created`` time), so the registration finds its version unchanged."""
    if _exported(out_dir, checkpoint, name):
        encoder = storage.read_json(storage.join(out_dir, CARD))["name"]
        return out_dir, encoder, register_in_mlflow(tracker, out_dir, registered_model, alias)
    student, state = load_ema_student(checkpoint)
    m = state.meta
    card = {"teacher": m.get("teacher"), "teacher_weights_digest": m.get("teacher_weights_digest"),
            "data_digest": m.get("data_digest"), "distill_run": m.get("run_name"),
            "step": state.step, "checkpoint": checkpoint}
    if state.validation:  # the EMA student's validation at this checkpoint, and its slides
        card["validation"] = {**state.validation, **m.get("validation", {})}
    if name:
        card["name"] = name
    export_student(student, out_dir, card)
    encoder = storage.read_json(storage.join(out_dir, CARD))["name"]
    version = register_in_mlflow(tracker, out_dir, registered_model, alias)
    return out_dir, encoder, version


def run_export(cfg: ExportConfig, progress: bool = True) -> tuple[str, str, str | None]:
    """``fusedist export``: a checkpoint (or a run's newest) -> encoder folder + MLflow."""
    storage.configure(cfg.storage)
    ckpt = find_checkpoint(cfg.checkpoint)
    out_dir = cfg.output or storage.join(ckpt.rstrip("/").rsplit("/", 1)[0], "export")
    meta = storage.read_json(storage.join(ckpt, "fusedist_state.json"))["meta"]
    with start_run(cfg.mlflow, run_name="export", params=cfg,
                   tags={"fusedist.stage": "export"}) as run:
        random_init = str(meta.get("init_weights", "random")).startswith("random")
        warn_random_weights(run, {*([meta["student"]] if random_init else []),
                                  *([meta["teacher"]] if meta.get("teacher_random_weights")
                                    else [])})
        return export_checkpoint(ckpt, out_dir, cfg.name, run, cfg.registered_model,
                                 cfg.alias)
