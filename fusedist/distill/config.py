"""Config of ``fusedist distill`` (XMAG on Ray Train + DeepSpeed) and ``fusedist export``.

One config scales from one CPU worker to many GPU nodes: change ``scaling.num_workers`` and
``scaling.use_gpu``. The global batch is ``micro_batch x accumulation x num_workers``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fusedist.config import RayConfig, StorageConfig, StrictModel
from fusedist.fidelity import Fidelity, apply_preset
from fusedist.tracking import MlflowConfig


class StudentConfig(StrictModel):
    """The trainable 5x student (a registry ViT plus two projection heads)."""

    name: str = "dinov2-vitb14"
    """Registry name of the backbone, e.g. ``dinov2-vitb14`` (the paper) or ``test-vit``."""

    weights: str | None = None
    """Initial backbone weights: a local file, an ``s3://`` object (each worker fetches a
    copy) or an ``hf-hub:`` id; ``None``: seeded random init (flagged in the log and as an
    MLflow tag)."""

    grid: int = Field(4, gt=0)
    """Teacher tiles per side: the student's patch grid is pooled into ``grid x grid`` blocks."""


class LossConfig(StrictModel):
    """Weights of the two negative-cosine terms (methods.md §1)."""

    global_weight: float = Field(1.0, ge=0)
    """Weight of global_head(CLS) vs the mean teacher tile embedding."""

    local_weight: float = Field(0.5, ge=0)
    """Weight of local_head(block j) vs teacher tile j, averaged over all B x 16 pairs."""


class AugmentConfig(StrictModel):
    """Paired augmentation: flips move the 4x4 target grid with the image; jitter is colour."""

    flip_p: float = Field(0.5, ge=0, le=1)
    """Probability of each of the horizontal and vertical flips."""

    jitter_p: float = Field(0.5, ge=0, le=1)
    """Probability of colour jitter per sample (brightness/contrast/saturation 0.95-1.05,
    hue +-0.05)."""

    backend: Literal["tensor", "pil"] = "tensor"
    """Where the jitter runs. ``tensor``: on the batch's float tensors on its device, the
    ops in a fixed order (fusedist). ``pil`` (released): per image on uint8 PIL images on
    the CPU, as torchvision's ColorJitter — each op rounds to 8 bits, the hue moves in steps
    of 1/255 of a turn, the ops in a random order; much slower (docs/methods.md)."""


class OptimConfig(StrictModel):
    """AdamW, gradient clipping and the learning-rate schedule."""

    lr: float = Field(5e-4, gt=0)
    """Peak learning rate (for the global batch; not rescaled when the worker count changes)."""

    min_lr: float = Field(1e-6, ge=0)
    """Learning rate at the end of the cosine decay."""

    weight_decay: float = Field(0.05, ge=0)
    """AdamW weight decay, on weight matrices only (not biases, norms, tokens)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""

    clip: float = Field(1.0, ge=0)
    """Gradient clipping (global norm); 0 turns it off."""

    schedule: Literal["cosine", "paper", "constant"] = "cosine"
    """``cosine``: linear warm-up then cosine to ``min_lr`` (default); ``paper``: the released
    XMAG config (warm-up epochs == total epochs, a linear ramp over the whole run);
    ``constant``: warm-up then flat."""

    warmup_epochs: float = Field(1.0, ge=0)
    """Linear warm-up length in epochs (converted to optimiser steps)."""


class BatchConfig(StrictModel):
    """Batching and data loading (per worker)."""

    micro_batch: int = Field(48, gt=0)
    """Samples per forward/backward on one worker (DeepSpeed ``train_micro_batch_size_per_gpu``)."""

    accumulation: int = Field(1, gt=0)
    """Micro-batches accumulated per optimiser step."""

    loader_workers: int = Field(4, ge=0)
    """DataLoader processes per training worker (JPEG decode happens there). A mid-epoch resume
    needs the same number as the run it resumes."""

    shuffle_buffer: int = Field(1000, gt=0)
    """Shuffle buffer of each reader slot (samples)."""

    interleave: int = Field(4, gt=0)
    """Shards (slides) each slot reads round-robin, so a batch mixes slides."""

    seed: int = 0
    """Seed of the shard order, shuffle buffers and augmentation."""


class ScalingSection(StrictModel):
    """Ray Train workers: one per GPU (or per CPU slot on a machine without GPUs)."""

    num_workers: int = Field(1, gt=0)
    """Training workers (ranks). The paper: 24 (GPUs)."""

    use_gpu: bool = False
    """One GPU per worker; bf16 and NCCL. ``false``: CPU, fp32, gloo (tests, the demo)."""

    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs each worker reserves (give it the loader workers' share on real runs)."""

    resources_per_worker: dict[str, float] = {}
    """Extra Ray resources per worker (e.g. ``{accelerator_type:H100: 0.001}``)."""


class CheckpointSection(StrictModel):
    """How often checkpoints are written and how many are kept."""

    every_steps: int = Field(500, gt=0)
    """Optimiser steps between checkpoints; one is also written at the end of every epoch."""

    num_to_keep: int = Field(3, gt=0)
    """Checkpoints kept in storage (older ones are deleted by Ray Train)."""


class ValidationSection(StrictModel):
    """A slide-level hold-out: the EMA student's teacher cosines on slides it never trains on.

    The split is by slide (a slide's tiles are all on one side), deterministic (a hash of the
    slide id and ``seed``) and recorded in ``<run>/validation.json``, the MLflow run and the
    export card. Every ``every_steps`` optimiser steps and at the end, the EMA student's
    ``val/global_cos`` and ``val/local_cos`` (the two terms of the XMAG objective, without
    augmentation) are computed on all validation tiles, sharded across the ranks."""

    fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the slides held out (rounded to whole slides; at least one when > 0 and the
    dataset has two or more slides, never all of them). ``0``: no validation, every slide
    trains (the paper trains on all its data)."""

    every_steps: int = Field(500, gt=0)
    """Optimiser steps between validations; one also runs after the last step."""

    seed: int = 0
    """Seed of the split (independent of ``batch.seed``, so the training order can change
    without moving slides between train and validation)."""


class FaultConfig(StrictModel):
    """Fault injection for tests: a rank fails once, the run must survive it."""

    at_step: int | None = Field(None, ge=0)
    """Optimiser step at whose start the rank fails (first attempt only); ``None``: off."""

    rank: int = Field(1, ge=0)
    """The rank that fails."""

    mode: Literal["exit", "hang"] = "exit"
    """``exit``: the rank's process hard-exits. ``hang``: the rank writes its Ray node id into
    the marker (``<run>/_fault/step-<s>-rank-<r>``) and stops there, so a test can remove that
    node, as a lost pod would take it (tests/test_cluster.py)."""


class ExportSection(StrictModel):
    """What happens to the EMA student at the end."""

    enabled: bool = True
    """Export the EMA student (and register it in MLflow) when training finishes."""

    output: str | None = None
    """Export folder; default ``<storage_path>/<run_name>/export``."""

    name: str | None = None
    """Encoder registry name of the export; default ``xmag-<backbone>-<sha8>``."""

    registered_model: str = "xmag-student"
    """MLflow registered-model name (a new version per export)."""

    alias: str = "champion"
    """MLflow alias moved to the new version (MLflow 3: aliases, not stages), e.g.
    ``champion``. ``latest`` is MLflow's own name for the newest version: nothing is set."""


class DistillConfig(StrictModel):
    """XMAG distillation: 5x student images + cached 20x teacher features -> a 5x encoder."""

    fidelity: Fidelity = "default"
    """``released`` sets every released-code switch (``fusedist.fidelity.DISTILL_RELEASED``:
    ``ema_update: before_step``, ``optim.schedule: paper``) to reproduce the paper's run;
    ``default`` keeps fusedist's EMA order and its warm-up + cosine schedule. Keys set
    explicitly win over the preset (docs/methods.md, divergences)."""

    tiles: str
    """A ``pairs`` tile dataset folder (``lo.jpg`` is the student input)."""

    features: str
    """The teacher's feature dataset that mirrors ``tiles`` (``<features>/<teacher>/<dataset>``)."""

    teacher: str | None = None
    """Expected teacher name (checked against the feature manifest); ``None``: take it from
    the manifest."""

    student: StudentConfig = Field(default_factory=StudentConfig)
    """Backbone and its initial weights."""

    epochs: int = Field(10, gt=0)
    """Passes over the data."""

    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Micro-batch, accumulation, loader workers, seed."""

    optim: OptimConfig = Field(default_factory=OptimConfig)
    """AdamW, clipping, LR schedule."""

    loss: LossConfig = Field(default_factory=LossConfig)
    """Global/local loss weights."""

    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Paired flips and colour jitter."""

    ema_decay: float = Field(0.999, ge=0, le=1)
    """Decay of the EMA student (the model that is exported)."""

    ema_update: Literal["after_step", "before_step"] = "after_step"
    """``after_step`` (a correction): the EMA averages the weights each optimiser step
    produced, the last step included. ``before_step`` (released): it is updated before the
    step, so it lags one step behind (its first update averages the initial weights in)."""

    zero_stage: Literal[0, 1, 2] = 2
    """DeepSpeed ZeRO stage (2: optimizer states and gradients partitioned across ranks)."""

    bf16: bool = True
    """bf16 mixed precision on GPUs (CPU workers always train in fp32)."""

    scaling: ScalingSection = Field(default_factory=ScalingSection)
    """Workers, GPUs, resources per worker."""

    max_failures: int = Field(3, ge=0)
    """Worker-group restarts Ray Train allows (each resumes from the last checkpoint)."""

    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    """Checkpoint cadence and retention."""

    validation: ValidationSection = Field(default_factory=ValidationSection)
    """Held-out validation slides and how often the EMA student is evaluated on them."""

    storage_path: str = "data/runs"
    """Where runs live (a folder or ``s3://bucket/prefix``): ``<storage_path>/<run_name>/``
    holds the checkpoints, the committed sample log and the export. Multi-node needs S3 or a
    shared filesystem (checked at start: see ``storage_shared``)."""

    storage_shared: bool = False
    """``storage_path`` is a local path on a filesystem every node mounts (NFS, Lustre, EFS,
    ...). Known network filesystems are detected; set this for others. A multi-node run on a
    node-local folder is refused before any work (``fusedist.execution.sharedfs``)."""

    run_name: str = "xmag"
    """Run name. Running again with the same name resumes that run from its last checkpoint."""

    sample_log: bool = True
    """Record the keys every rank trained on, committed with each checkpoint
    (``<run>/sample_log/``), so an epoch can be audited: each sample exactly once."""

    sample_log_keys: int | None = Field(100_000, gt=0)
    """Most keys the sample log records per epoch. An epoch with more samples logs a fixed
    subset of about this many (``fusedist.distill.checkpoint.logs_key``: a hash of the key, the
    same keys in every epoch, on every rank and after a resume), so the audit stays exact for
    that subset: ~11 MB per epoch at the paper's 3.49M samples, ~0.1 % of a checkpoint. ``null``
    logs every key (~370 MB per epoch there, ~4 % of each checkpoint)."""

    log_every: int = Field(1, gt=0)
    """Optimiser steps between metric logs (per-step losses, lr, img/s)."""

    fault: FaultConfig = Field(default_factory=FaultConfig)
    """Test-only fault injection."""

    export: ExportSection = Field(default_factory=ExportSection)
    """Export + MLflow registration of the EMA student."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Where Ray runs."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """S3 endpoint and retries (also used for Ray Train's checkpoint storage)."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """Experiment tracking (rank 0 logs the metrics)."""

    @model_validator(mode="before")
    @classmethod
    def _fidelity(cls, data: object) -> object:
        return apply_preset(data, "distill")

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("run_name must be a plain folder name (no '/', not hidden)")
        return v

    @model_validator(mode="after")
    def _fault_rank(self) -> "DistillConfig":
        if self.fault.at_step is not None and self.fault.rank >= self.scaling.num_workers:
            raise ValueError(f"fault.rank={self.fault.rank} but only "
                             f"{self.scaling.num_workers} worker(s); pick a rank below that")
        return self

    @property
    def global_batch(self) -> int:
        return self.batch.micro_batch * self.batch.accumulation * self.scaling.num_workers

    def run_url(self) -> str:
        return self.storage_path.rstrip("/") + "/" + self.run_name


class ExportConfig(StrictModel):
    """``fusedist export``: a distill checkpoint's EMA student -> an encoder folder (+ MLflow)."""

    checkpoint: str
    """A checkpoint folder (holds ``fusedist_state.json``), or a run folder (its newest
    checkpoint is used); local or ``s3://``."""

    output: str | None = None
    """Export folder; default ``<checkpoint>/../export``."""

    name: str | None = None
    """Encoder registry name; default ``xmag-<backbone>-<sha8>``."""

    registered_model: str = "xmag-student"
    """MLflow registered-model name."""

    alias: str = "champion"
    """MLflow alias moved to the new version (``latest``: MLflow's own, nothing is set)."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """S3 endpoint and retries."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """Where the export is logged and registered."""
