"""Config of ``fusedist fuse``: which bags and labels, which task, which methods, how to train.

Defaults follow methods.md (§2 LogitProd and experts, §3 Meta-Encoder, §4 FuseCPath); the
recipes in ``configs/fuse/`` shrink epochs and cluster counts for small synthetic cohorts.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from fusedist.config import RayConfig, StorageConfig, StrictModel
from fusedist.fidelity import Fidelity, apply_preset
from fusedist.fusion.methods import registry
from fusedist.tracking import MlflowConfig

Task = Literal["classification", "tile_classification", "survival", "regression"]

META_STRATEGIES = ("self_attention", "cross_attention", "token_attention", "contrastive")


class ExpertConfig(StrictModel):
    """One head per frozen encoder (methods.md §2): gated ABMIL for bags, the tile MLP for tiles."""

    epochs: int = Field(20, gt=0)
    """Epochs for classification and regression experts (methods.md: 20)."""

    survival_epochs: int = Field(50, gt=0)
    """Epochs for survival experts (methods.md: 50)."""

    lr: float = Field(2e-4, gt=0)
    """Adam learning rate (methods.md: 2e-4)."""

    weight_decay: float = Field(1e-5, ge=0)
    """Adam weight decay (methods.md: 1e-5)."""

    hidden: int = Field(512, gt=0)
    """ABMIL embedding width (methods.md: 512)."""

    dropout: float = Field(0.25, ge=0, lt=1)
    """Dropout after the ABMIL embedding (methods.md: 0.25)."""

    max_tiles: int | None = Field(4096, gt=0)
    """During training, a bag larger than this is subsampled (a fresh random subset every
    epoch) to bound memory; evaluation always uses every tile. ``null``: never subsample."""

    tile_batch_size: int = Field(256, gt=0)
    """Batch size of tile-level heads (tile classification)."""

    # Released-code behaviours of the ABMIL experts (docs/methods.md, divergences); the
    # tile MLP and the concat / Meta-Encoder heads are not affected.
    attention_bias: bool = False
    """Biases on the gated attention's sigmoid branch and scorer (its ReLU branch never has
    one). Released: none (``false``); the saved model's card records the choice."""

    init: Literal["xavier_normal", "torch"] = "xavier_normal"
    """``xavier_normal`` (released): every Linear of the ABMIL head Xavier-normal, biases 0;
    ``torch``: PyTorch's default (Kaiming-uniform) init."""

    schedule: Literal["warm_restarts", "constant"] = "warm_restarts"
    """``warm_restarts`` (released): cosine warm restarts per epoch, T0 = 10, x2, down to
    1e-6 (methods.md §2's gate schedule); ``constant``: Adam at ``lr`` throughout."""

    select_best: bool = True
    """Keep the epoch with the lowest validation loss (released), on ``val_fraction`` of the
    expert's own training slides (never the evaluated fold); ``false``: train on every
    training slide and keep the last epoch. The final refit holds no slides out: it trains on
    every slide for the median of the folds' best epochs."""

    val_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of an expert's training slides held out to pick its best epoch
    (``select_best``)."""


class LogitProdSurvivalConfig(StrictModel):
    """How the survival gate trains (methods.md §2 "Survival"); the classification gate's
    ``lr``, ``batch_size`` and ``max_epochs`` apply too."""

    penalty: Literal["mean_weight", "per_bin"] = "mean_weight"
    """``mean_weight`` (released): the penalty is w̄ᵀRw̄ of each sample's gate weights
    averaged over the outcome bins; ``per_bin``: the mean over bins of wₜᵀRwₜ."""

    weight_decay: float = Field(1e-3, ge=0)
    """Adam weight decay of the survival gate (released: 1e-3)."""

    min_lr: float = Field(1e-7, ge=0)
    """Floor of the warm-restart schedule (released: 1e-7; the classification gate: 1e-6)."""

    stop_on: Literal["c_index", "nll"] = "c_index"
    """Early stopping on the validation ``c_index`` (released; higher is better) or the
    validation NLL-survival."""

    patience: int = Field(100, gt=0)
    """Epochs without a better validation score before stopping (released: 100)."""

    gradients: bool = True
    """A correction: the NLL reaches the gate through the fused hazards. ``false`` is the
    released code, whose fused hazards carry no gradient, so only the penalty trains its
    survival gate (for a bit-faithful released run)."""


class LogitProdConfig(StrictModel):
    """LogitProd gate over the experts' logits (methods.md §2)."""

    gate: Literal["linear", "mlp"] = "linear"
    """``linear`` (3M+2 -> M, zero-initialised) or a small ``mlp``."""

    lam: float = Field(0.1, ge=0)
    """Weight of the diversity penalty mean(wᵀRw)."""

    error: Literal["nll", "brier", "zero_one"] = "nll"
    """Per-sample expert error that R correlates (out-of-fold)."""

    shrink: float = Field(0.1, ge=0, le=1)
    """Shrinkage of R toward mean(diag)·I."""

    gate_data: Literal["oof", "in_fold"] = "oof"
    """What the gate trains on: ``oof`` = the experts' out-of-fold logits on the training
    folds, from an inner cross-validation (sound default); ``in_fold`` = logits of the experts
    trained on those same slides, as the released code does (optimistic, cheaper)."""

    lr: float = Field(1e-5, gt=0)
    """Adam learning rate (methods.md: 1e-5)."""

    weight_decay: float = Field(1e-4, ge=0)
    """Adam weight decay (methods.md: 1e-4)."""

    batch_size: int = Field(16, gt=0)
    """Gate batch size (methods.md: 16)."""

    max_epochs: int = Field(600, gt=0)
    """Upper bound on gate epochs (methods.md: 600); early stopping usually ends sooner."""

    patience: int = Field(100, gt=0)
    """Epochs without a better validation loss before stopping (best state is restored;
    released: 100)."""

    drop_last: bool = True
    """Released: the gate's loaders drop their last partial batch (training: a different
    remainder each epoch; validation: the tail of the held-out set). A set smaller than one
    batch is used whole (the released loops would step on nothing). ``false``: every sample,
    every epoch."""

    logs: Literal["exact", "clamped"] = "exact"
    """A correction: ``exact`` log-softmax / log-sigmoid. ``clamped`` (released): every log
    as the released code takes it, in float32 — the classification product exact, the
    survival outcome law and its hazards clamped at 1e-12, the NLL-survival's hazards at
    [1e-7, 1 - 1e-7], the error correlation's p_y at 1e-8 (docs/methods.md). The same at
    normal logit scales; differs once a probability nears its eps. The card records it."""

    survival: LogitProdSurvivalConfig = Field(default_factory=LogitProdSurvivalConfig)
    """The survival gate's training settings."""

    val_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the gate's training samples held out for early stopping."""

    expert_fallback: bool = True
    """After training, if one expert alone (one-hot weights: a member of the weighted-product
    family) has a lower training objective than the fitted gate, use that expert. Makes the
    paper's guarantee (never worse than the best expert on the training objective) hold for
    the gate actually used, not just for the optimum."""


class MetaEncoderConfig(StrictModel):
    """Meta-Encoder feature fusion (methods.md §3), fused per tile before an ABMIL head."""

    strategies: list[Literal["self_attention", "cross_attention", "token_attention",
                             "contrastive"]] = Field(default_factory=lambda: list(META_STRATEGIES))
    """Strategies to compare (``concat`` is the baseline method ``concat``)."""

    embed_dim: int = Field(1024, gt=0)
    """Attention width of ``self_attention``/``cross_attention`` (as released: 1024)."""

    token_dim: int = Field(256, gt=0)
    """Common width of FM tokens (``token_attention``) and projections (``contrastive``)."""

    contrastive_weight: float = Field(0.1, ge=0)
    """Weight w of the pairwise InfoNCE term of ``contrastive``."""

    epochs: int | None = Field(None, gt=0)
    """Training epochs; default: the experts' (so the comparison is like for like)."""

    lr: float | None = Field(None, gt=0)
    """Adam learning rate; default: the experts'."""

    select_best: bool = False
    """As ``experts.select_best``, for the Meta-Encoder and concat heads: in each fold keep
    the epoch with the lowest loss on ``experts.val_fraction`` of the fold's training slides;
    the refit then trains on every slide for the median of the folds' best epochs."""


class FuseCPathConfig(StrictModel):
    """FuseCPath (methods.md §4): clustered sub-bags, RRT student, collaborative distillation."""

    n_clusters: int = Field(50, gt=1)
    """Multi-view clusters per slide; slides with fewer non-empty clusters are skipped."""

    n_bags: int = Field(50, gt=0)
    """Sub-bags per slide."""

    per_cluster: int = Field(10, gt=0)
    """Tiles each sub-bag takes from every cluster."""

    clustering: Literal["kmeans", "spectral"] = "kmeans"
    """faiss k-means on the standardised, concatenated views, or multi-view spectral."""

    slide_embeddings: dict[str, str] = Field(default_factory=dict)
    """Slide-level teachers: name -> CSV (``slide_id`` + feature columns) or .npz
    (``slide_ids``, ``features``). Empty: each feature encoder's mean-pooled bag is a teacher."""

    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the cross-entropy term (1 - alpha goes to the teachers' KL)."""

    temperature: float = Field(3.0, gt=0)
    """Distillation temperature T."""

    epochs: int = Field(60, gt=0)
    """Epochs (methods.md: 60)."""

    lr: float = Field(1e-4, gt=0)
    """SGD learning rate (methods.md: 1e-4, cosine to 0.01 lr)."""

    batch_size: int = Field(64, gt=0)
    """Sub-bags per step (methods.md: 64)."""

    region_num: int = Field(8, gt=0)
    """Regions of the RRT re-embedding encoder."""

    topk: int | None = Field(16, gt=0)
    """Attention scores below each row's top-k are masked out (``null``: dense)."""

    topk_ties: Literal["keep", "exact"] = "keep"
    """``keep`` (released): every score tied with the k-th largest survives (zero-padded
    regions are all ties); ``exact``: exactly k per row. docs/methods.md, divergences."""

    subbag_rule: Literal["released", "cycle"] = "released"
    """``released``: clusters in order of first appearance, each list shuffled, repeated and
    reshuffled (a block can repeat a tile); ``cycle``: clusters by id, one shuffle walked
    cyclically (every tile used equally often). docs/methods.md, divergences."""


class FinalConfig(StrictModel):
    """The fused model refitted on every labelled slide after cross-validation."""

    enabled: bool = True
    """Refit and write ``<output>/model/`` (safetensors per component + ``card.json``), and
    log it on the fuse run as an MLflow pyfunc model (``fused_model``)."""

    methods: list[str] | None = None
    """Result rows to refit (e.g. ``[logitprod, meta.self_attention]``); default: the best
    method by the primary metric, plus LogitProd when it ran."""

    registered_model: str | None = None
    """Register the fused model (an ``mlflow.pyfunc`` model logged on the fuse run) as a new
    version of this MLflow registered model, e.g. ``fused-classifier``; ``None``: log it on
    the run only. ``fusedist predict --model models:/<name>@<alias>`` and
    ``mlflow.pyfunc.load_model`` then find it (the run needs ``mlflow.enabled``)."""

    alias: str | None = "champion"
    """Alias moved to the new version (MLflow 3 aliases, not stages); ``None`` or ``latest``
    (MLflow's own name for the newest version) moves none."""

    min_spread: float = Field(0.02, ge=0)
    """A refitted component whose predictions on its own training slides vary less than this
    is flagged ``flat`` (card, run summary, model-version tag; ``retrain`` never promotes
    it): the std over slides of the class probabilities (classification), of the risk over
    the number of time bins (survival), or of each target over that target's std
    (regression). A classifier that gives every training slide the same class is flagged
    too. 0 turns the check off."""


class FuseConfig(StrictModel):
    """Experts, LogitProd, Meta-Encoder, FuseCPath and baselines over slide bags, evaluated by
    grouped, stratified K-fold cross-validation."""

    fidelity: Fidelity = "default"
    """``released`` sets every released-code switch (``fusedist.fidelity.FUSE_RELEASED``:
    the expert ABMIL, the LogitProd gates, FuseCPath) to the released behaviour, to reproduce
    the papers' numbers; ``default`` keeps fusedist's corrections (survival-gate gradients,
    exact logs, out-of-fold gate data, the expert fallback) and its cheaper k-means clustering.
    Keys set explicitly win over the preset (docs/methods.md, divergences)."""

    bags: str
    """Root of bag folders, one per encoder: ``<bags>/<encoder>/<slide_id>.h5`` (fusedist,
    TRIDENT and CLAM layouts are read)."""

    labels: str
    """CSV with the task's columns, keyed by slide (``slide_id``, optional ``patient_id``)
    or by patient (``patient_id`` and no ``slide_id``: a clinical table, joined to the bags
    through ``slides``)."""

    slides: str | None = None
    """Slide table (CSV or Parquet: ``slide_id``, ``path``, ``patient_id``; the one ``tile``
    and ``embed`` read) giving each slide's patient: needed for labels keyed by patient;
    with slide-keyed labels it fills the patient ids the labels lack."""

    unit: Literal["auto", "slide", "patient"] = "auto"
    """What one sample is: a ``slide`` (its bag), or a ``patient`` (the bags of all its
    slides pooled per encoder: tiles concatenated in slide-id order, as CLAM and PORPOISE do
    for TCGA); folds, metrics, predictions.csv and the fused model are then per patient.
    ``auto``: ``patient`` when ``labels`` is keyed by patient, else ``slide``."""

    task: Task = "classification"
    """``classification`` (slide), ``tile_classification``, ``survival`` (``time`` +
    ``event``) or ``regression`` (numeric targets)."""

    target: str | list[str] = "label"
    """Label column (classification), or target columns / one glob such as ``gene_*``
    (regression). Survival reads ``time`` and ``event`` (see ``time_column``/``event_column``)."""

    missing_values: list[str] = Field(
        default_factory=lambda: ["", "NA", "N/A", "nan", "NaN", "None", "null"])
    """Label cells that mean "no value" (compared after stripping whitespace; the empty cell
    is always missing). A slide whose target cell is one of them is excluded with the reason,
    never trained as a class of its own."""

    time_column: str = "time"
    """Survival time column."""

    event_column: str = "event"
    """Survival event column (1 = event observed, 0 = censored)."""

    encoders: list[str] | None = None
    """Encoder folders under ``bags`` to use; default: every folder that holds bags."""

    output: str = "fuse-output"
    """Where results, plots, predictions and the report go (folder or ``s3://``)."""

    folds: int = Field(5, ge=2)
    """Outer cross-validation folds (stratified, grouped by patient)."""

    inner_folds: int = Field(3, ge=2)
    """Inner folds on each outer training set: out-of-fold logits for the LogitProd gate and R,
    and the validation score that picks the best single expert."""

    seed: int = 0
    """Seeds folds, subsampling and every model's initialisation."""

    methods: list[str] = Field(default_factory=lambda: list(registry.DEFAULT))
    """Methods besides the per-encoder experts (``best_expert``, ``mean_ensemble``,
    ``concat``, ``logitprod``, ``meta``, ``fusecpath``, or any registered with
    ``fusedist.fusion.methods.registry.register``); ones that do not apply to the task are
    recorded as such and skipped."""

    survival_bins: int = Field(4, ge=2)
    """Discrete-time bins (quantiles of uncensored times on each training fold)."""

    survival_alpha: float = Field(0.4, ge=0, le=1)
    """Weight of the uncensored term of the NLL-survival loss."""

    tile_labels: str | None = None
    """Tile classification: CSV ``slide_id, x, y, label`` (level-0 coords); default: every tile
    takes its slide's label."""

    tiles_per_slide: int = Field(64, gt=0)
    """Tile classification: tiles sampled per slide (seeded)."""

    thumbnails: str | None = None
    """The tile dataset the bags came from (its ``thumbnails/<slide_id>.png`` and the level-0
    sizes in its ``manifest.json``), or a plain folder of ``<slide_id>.png``, for the
    attention heatmaps; default: heatmaps over a blank canvas."""

    heatmaps: int = Field(2, ge=0)
    """Slides (per expert) to draw attention heatmaps for."""

    experts: ExpertConfig = Field(default_factory=ExpertConfig)
    """Expert heads."""

    logitprod: LogitProdConfig = Field(default_factory=LogitProdConfig)
    """LogitProd gate."""

    meta: MetaEncoderConfig = Field(default_factory=MetaEncoderConfig)
    """Meta-Encoder strategies."""

    fusecpath: FuseCPathConfig = Field(default_factory=FuseCPathConfig)
    """FuseCPath."""

    final: FinalConfig = Field(default_factory=FinalConfig)
    """The fused model written after cross-validation."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where heads train; ``auto`` uses a GPU when the fold task got one."""

    fold_cpus: float = Field(1.0, gt=0)
    """CPUs per fold task (its torch threads): on Ray the folds run in parallel as Ray tasks,
    locally on a pool of processes, one per ``fold_cpus`` cores (``executor``)."""

    fold_gpus: float = Field(0.0, ge=0)
    """GPUs per fold task (heads are small: fractions such as 0.25 share a GPU)."""

    executor: Literal["auto", "ray", "local"] = "auto"
    """Where the outer folds run. ``ray``: one Ray task per fold (a private local Ray is
    started when none is running or configured). ``local``: no Ray, a pool of processes on
    this machine, one per ``fold_cpus`` cores (at most one per fold; a single one runs the
    folds in this process), which saves Ray's start and stop (~5-15 s on a laptop, more than
    the folds of a small cohort take). ``auto``: Ray when ``ray.address`` or ``RAY_ADDRESS``
    is set (a cluster, a RayJob) or this process already runs Ray (``fusedist demo``, a
    notebook), else local. Every fold trains on ``fold_cpus`` torch threads either way, and
    ``predictions.csv`` and the fused model are byte-identical."""

    bags_in_memory_gb: float = Field(8.0, ge=0)
    """The most bag features (float32, every encoder together) held in RAM. A larger cohort
    is packed, slide after slide, into one memory-mapped file per encoder under
    ``<output>/_features/`` and read a slide at a time (the page cache keeps what fits), so
    fuse's memory does not grow with the cohort: the paper's 10,000 slides x 3 encoders are
    ~1.3 TB. Results are identical either way; ``0`` always packs. On a multi-node cluster a
    packed cohort needs ``output`` on S3 or a shared filesystem (fold tasks read the files)."""

    train_slides: list[str] | None = None
    """Train only on these slides (ids from ``labels``): in every outer fold the training
    samples are the fold's training samples of these slides, and the refitted model
    (``final``) is fitted on these slides only. The cohort, the fold assignment and every test
    fold stay those of all labelled slides, so two runs that differ only here are scored on
    the same held-out slides. ``fusedist retrain`` uses it to score the champion's recipe on
    the slides the champion was trained on; ``null``: every labelled slide."""

    overwrite: bool = False
    """Discard finished folds of an earlier run with a different config and start over."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Where Ray runs."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """S3 endpoint and retries."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """Experiment tracking."""

    # Fields that change where/how a run executes but not its results (excluded from the
    # digest that guards resumption).
    RUN_ONLY: ClassVar[set[str]] = {"output", "thumbnails", "heatmaps", "final", "device",
                                    "fold_cpus", "fold_gpus", "overwrite", "ray", "storage",
                                    "mlflow", "bags_in_memory_gb", "executor"}

    @model_validator(mode="before")
    @classmethod
    def _fidelity(cls, data: object) -> object:
        return apply_preset(data, "fuse")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        import difflib

        known = registry.names()
        for m in v:
            if m not in known:
                near = difflib.get_close_matches(m, known, n=1)
                raise ValueError(f"unknown method {m!r}"
                                 + (f". Did you mean {near[0]!r}?" if near else "")
                                 + f" (known: {known})")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("target: give at least one column")
        return v

    @model_validator(mode="after")
    def _check(self) -> "FuseConfig":
        if self.task == "classification" or self.task == "tile_classification":
            if isinstance(self.target, list) and len(self.target) != 1:
                raise ValueError(f"task {self.task} takes one label column, got {self.target}; "
                                 "set target: label")
        if self.task == "tile_classification" and self.unit == "patient":
            raise ValueError("unit: patient pools slides into one sample; tile_classification "
                             "samples tiles of one slide: use unit: slide (or auto)")
        if self.encoders is not None and len(set(self.encoders)) != len(self.encoders):
            raise ValueError(f"encoders lists a name twice: {self.encoders}")
        if self.final.registered_model and not (self.final.enabled and self.mlflow.enabled):
            raise ValueError(f"final.registered_model={self.final.registered_model!r} needs "
                             "final.enabled and mlflow.enabled (the model is registered from "
                             "the fuse run); enable both, or unset final.registered_model")
        return self
