"""``SynthConfig``: the recipe of a synthetic slide data set (``configs/synth/*.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fusedist.config import StorageConfig, StrictModel
from fusedist.synth.cues import CUES, LabelParams
from fusedist.synth.ink import PenConfig
from fusedist.synth.slide import RenderOptions


class SynthConfig(StrictModel):
    """Synthetic H&E-like slides with labels driven by several independent visual cues."""

    output: str
    """Directory URL for the slides (local path, ``file://`` or ``s3://``): writes
    ``<output>/<slide_id>.tiff``, ``labels.csv`` (one row per slide: every target and cue),
    ``slides.csv`` (a slide table: slide_id, path relative to it, patient_id), ``clinical.csv``
    (one row per patient: patient_id, label, time, event), ``masks/<slide_id>.png`` and
    ``synth_manifest.json`` (what was written, so re-runs skip finished slides)."""

    num_slides: int = Field(8, ge=1)
    """Number of slides (ids ``<id_prefix>-0000``, ``<id_prefix>-0001``, ...)."""

    id_prefix: str = Field("synth", pattern=r"^[A-Za-z0-9_.]+$")
    """Slide ids start with this (e.g. ``heldout`` for slides kept apart from a cohort);
    ``layout: flat`` only."""

    layout: Literal["flat", "gdc"] = "flat"
    """``flat``: ``<output>/<slide_id>.tiff``, ids ``<id_prefix>-0000``... ``gdc``: the way
    the GDC client downloads TCGA: one UUID folder per file, ``<uuid>/<slide_id>.svs``, with
    TCGA-style ids ``TCGA-XX-XXXX-01Z-00-DX1.<UUID>`` (dots included; a patient's second slide
    is ``DX2``) and ``patient_id`` = the first 12 characters, as users write labels from such
    names. The pixels, labels and patients are those of ``flat`` with the same seed."""

    size: int = Field(8192, ge=256)
    """Level-0 width in pixels (and height, unless ``height`` is set)."""

    height: int | None = Field(None, ge=256)
    """Level-0 height in pixels; default: ``size`` (square slides)."""

    mpp: float = Field(0.25, gt=0.0)
    """Level-0 resolution in µm per pixel (0.25 = 40x, 0.5 = 20x). Written to the TIFF
    resolution tags; OpenSlide reports it as ``openslide.mpp-x``/``mpp-y``."""

    num_classes: int = Field(2, ge=2, le=16)
    """Number of classes of the ``label`` column."""

    seed: int = Field(0, ge=0)
    """Seed of everything: the same config gives byte-identical slides and labels."""

    tile_size: int = Field(512, ge=64)
    """TIFF tile edge in pixels (a multiple of 32 and of ``mask_downsample``)."""

    jpeg_quality: int = Field(85, ge=50, le=100)
    """JPEG quality of the tiles (scanners use ~80-90)."""

    level_downsample: int = Field(4, ge=2)
    """Downsample between pyramid levels (levels 1, 4, 16, 64 with the default)."""

    min_level_size: int = Field(256, ge=16)
    """A further pyramid level is added while its longer side is at least this many pixels."""

    mask_downsample: int = Field(32, ge=8)
    """Downsample of the tissue masks ``masks/<slide_id>.png`` relative to level 0
    (a multiple of 8); each mask pixel covers ``mask_downsample``^2 level-0 pixels."""

    tissue_fraction: float = Field(0.5, gt=0.02, lt=0.98)
    """Mean share of the slide area covered by tissue."""

    tissue_fraction_jitter: float = Field(0.2, ge=0.0)
    """Per-slide log-normal spread of the tissue fraction (a nuisance unrelated to labels)."""

    glands: bool = True
    """Draw gland-like structures (a pale lumen lined by a ring of nuclei)."""

    stain_jitter: float = Field(0.08, ge=0.0)
    """Per-slide log-normal spread of overall stain intensity (a nuisance unrelated to labels)."""

    pen: PenConfig = Field(default_factory=PenConfig)
    """Pen strokes (blue, green, black ink) drawn over some slides; off by default."""

    class_separation: float = Field(0.8, ge=0.0)
    """Scale of the class prototypes in units of cue noise: prototype[k, c] =
    separation * cos(2 pi k / K + pi/4 + pi c / 2). Larger = easier classes."""

    prototypes: list[list[float]] | None = None
    """Explicit class prototypes (num_classes rows x 4 cues in the order nuclear_density,
    nuclear_size, stain_hue, gland_texture); overrides ``class_separation``."""

    cue_noise: dict[str, float] = Field(default_factory=dict)
    """Per-cue noise sd around the class prototype (default nuclear_density 0.9,
    nuclear_size 1.0, stain_hue 1.1, gland_texture 1.0): each cue alone is only partly
    informative, so fusing views that see different cues helps."""

    slide_noise: float = Field(0.25, ge=0.0)
    """Extra cue noise per slide on top of the patient's cues (slides of one patient differ)."""

    paired_fraction: float = Field(0.25, ge=0.0, le=1.0)
    """Share of slides that come two per patient (``patient_id`` groups them for folds)."""

    risk_weights: dict[str, float] = Field(default_factory=dict)
    """Survival risk = sum of weight * cue + noise (default nuclear_density 0.5,
    nuclear_size 0.4, stain_hue -0.2, gland_texture -0.4)."""

    risk_noise: float = Field(0.5, ge=0.0)
    """sd of the risk noise that no cue explains."""

    weibull_shape: float = Field(1.5, gt=0.0)
    """Shape of the Weibull event times (1 = exponential)."""

    median_survival: float = Field(36.0, gt=0.0)
    """Median event time (months) of a patient with average risk."""

    follow_up: float = Field(120.0, gt=0.0)
    """Censoring times are uniform on [0, follow_up] months (~30% censored by default)."""

    num_genes: int = Field(8, ge=0)
    """Number of regression targets ``gene_0..gene_{G-1}`` (linear in the cues + noise)."""

    gene_noise: float = Field(0.5, ge=0.0)
    """sd of the gene-target noise."""

    workers: int = Field(1, ge=1)
    """Slides rendered in parallel (processes); each slide uses one core."""

    storage: StorageConfig = StorageConfig()
    """How ``output`` is written (S3 endpoint, retries)."""

    @field_validator("cue_noise", "risk_weights")
    @classmethod
    def _known_cues(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(CUES))
        if unknown:
            raise ValueError(f"unknown cue(s) {unknown}; cues are {list(CUES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        if self.mask_downsample % 8:
            raise ValueError(f"mask_downsample ({self.mask_downsample}) must be a multiple of 8")
        if self.tile_size % self.mask_downsample or self.tile_size % self.level_downsample:
            raise ValueError(f"tile_size ({self.tile_size}) must be a multiple of "
                             f"mask_downsample ({self.mask_downsample}) and level_downsample "
                             f"({self.level_downsample})")
        if self.tile_size % 16:
            raise ValueError("tile_size must be a multiple of 16 (JPEG 2x2 chroma subsampling)")
        if self.prototypes is not None:
            shape = (len(self.prototypes), {len(r) for r in self.prototypes})
            if shape != (self.num_classes, {len(CUES)}):
                raise ValueError(f"prototypes must be {self.num_classes} rows of {len(CUES)} "
                                 f"values (cues {list(CUES)})")
        return self

    @property
    def width_height(self) -> tuple[int, int]:
        return self.size, self.height or self.size

    def render_options(self, tissue_fraction: float | None = None,
                       marked: bool = False) -> RenderOptions:
        """How each slide is drawn; ``marked``: with the ``pen`` strokes."""
        return RenderOptions(
            tile_size=self.tile_size, jpeg_quality=self.jpeg_quality,
            level_downsample=self.level_downsample, min_level_size=self.min_level_size,
            mask_downsample=self.mask_downsample,
            tissue_fraction=self.tissue_fraction if tissue_fraction is None else tissue_fraction,
            glands=self.glands, stain_jitter=self.stain_jitter,
            pen_strokes=self.pen.strokes if marked else 0, pen_colours=tuple(self.pen.colours),
            pen_width_um=self.pen.width_um,
        )

    def label_params(self) -> LabelParams:
        return LabelParams(
            num_classes=self.num_classes, class_separation=self.class_separation,
            prototypes=self.prototypes, cue_noise=self.cue_noise, slide_noise=self.slide_noise,
            paired_fraction=self.paired_fraction, risk_weights=self.risk_weights,
            risk_noise=self.risk_noise, weibull_shape=self.weibull_shape,
            median_survival=self.median_survival, follow_up=self.follow_up,
            num_genes=self.num_genes, gene_noise=self.gene_noise, id_prefix=self.id_prefix,
        )
