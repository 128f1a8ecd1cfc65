"""Configuration of ``fusedist tile``."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from fusedist.config import RayConfig, StorageConfig, StrictModel
from fusedist.tiling.slide import SLIDE_EXTENSIONS
from fusedist.tiling.tissue import TissueConfig


class TileConfig(StrictModel):
    """Whole-slide images -> WebDataset tile shards (``pairs`` for XMAG, or a ``grid``)."""

    input: str
    """A slide file, a directory (local path or s3:// prefix) searched recursively (a slide's
    id: its file name without the slide extension), or a slide table ``.csv``/``.parquet``
    (``slide_id``, ``path``, optional ``patient_id``, ``mpp``: docs/formats.md)."""

    output: str = "data/tiles"
    """Root for tile datasets; this run writes ``<output>/<dataset>/``."""

    dataset: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the dataset folder (letters, digits, ``_.-``)."""

    mode: Literal["pairs", "grid"] = "pairs"
    """``pairs``: a 20x region (hi.jpg) with the same region at 5x (lo.jpg), for XMAG.
    ``grid``: one tile per position (img.jpg) at ``tile_mpp``."""

    hi_size: int = Field(896, gt=0)
    """pairs: side of hi.jpg in pixels (896 = a 4x4 grid of 224 px teacher tiles)."""

    hi_mpp: float = Field(0.5, gt=0)
    """pairs: resolution of hi.jpg in µm/px (0.5 = 20x)."""

    lo_size: int = Field(224, gt=0)
    """pairs: side of lo.jpg in pixels; the same region, so lo mpp = hi_size*hi_mpp/lo_size."""

    tile_size: int = Field(224, gt=0)
    """grid: tile side in pixels."""

    tile_mpp: float = Field(0.5, gt=0)
    """grid: tile resolution in µm/px."""

    overlap: int = Field(0, ge=0)
    """grid: overlap between neighbouring tiles, in tile pixels."""

    min_tissue: float = Field(0.5, ge=0.0, le=1.0)
    """Keep a tile only if at least this fraction of it is tissue."""

    max_tiles_per_slide: int | None = Field(None, gt=0)
    """Keep at most this many tiles per slide (a seeded, reproducible subset)."""

    seed: int = 0
    """Seed of the ``max_tiles_per_slide`` subset."""

    mpp_override: float | None = Field(None, gt=0)
    """Level-0 µm/px for slides whose metadata has neither mpp nor objective power."""

    force_mpp: bool = False
    """Use ``mpp_override`` even when the slide's metadata has an mpp (wrong metadata)."""

    mpp_tolerance: float = Field(0.15, ge=0.0, le=1.0)
    """A slide up to this much coarser than the target (e.g. 0.55 vs 0.5 µm/px) is upsampled
    slightly instead of failing."""

    jpeg_quality: int = Field(90, ge=50, le=100)
    """JPEG quality of the tile images."""

    resample: Literal["reduce", "lanczos"] = "reduce"
    """How a region read from the pyramid is shrunk to the tile size. ``reduce``: each output
    pixel is the mean of a whole k x k block for the integer part k of the factor (exact for a
    40x slide tiled at 20x, as the scanner's own pyramid levels are made), then Lanczos only for
    what is left of a non-integer factor (Pillow's two-step ``reducing_gap=1``); ~6x cheaper than
    ``lanczos``, which resamples the whole factor with Lanczos (tiles of fusedist before this
    option). Pairs' ``lo.jpg`` is Lanczos from ``hi`` either way. See docs/formats.md."""

    reader: Literal["auto", "openslide"] = "auto"
    """How tile regions are read. ``auto``: tiled JPEG TIFF and SVS pyramids are decoded tile
    by tile with Pillow and regions assembled from a small cache of decoded tiles (~2x faster),
    for regions wholly inside a level; the first region of each slide is checked against
    OpenSlide and any difference turns it off for that slide. Everything else (other formats
    and compressions, edge regions) is read by OpenSlide. ``openslide``: OpenSlide for every
    region (fusedist before this option). The tiles are the same bytes either way."""

    samples_per_shard: int = Field(1000, gt=0)
    """Tiles per shard (pairs are ~200 KB each: 5000 makes ~1 GB shards)."""

    extensions: list[str] = Field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    """File extensions treated as slides when ``input`` is a directory."""

    thumbnails: bool = True
    """Write ``thumbnails/<slide_id>.png`` with the tissue mask and kept tiles outlined."""

    overwrite: bool = False
    """Allow re-tiling into a dataset folder made with a different config (replaces it)."""

    task_cpus: float = Field(1.0, gt=0)
    """CPUs each task reserves (Ray's ``num_cpus``; with ``executor: local``, processes =
    cores / task_cpus)."""

    executor: Literal["auto", "ray", "local"] = "auto"
    """Where the plan and write tasks run. ``ray``: Ray tasks (a private local Ray is started
    when none is running or configured). ``local``: a pool of processes on this machine and no
    Ray at all, which saves Ray's start and stop (~4-10 s on a laptop, more than tiling a few
    slides takes). ``auto``: Ray when ``ray.address`` or ``RAY_ADDRESS`` is set (a cluster, a
    RayJob) or this process already runs Ray (``fusedist demo``, a notebook), else local.
    Shards and manifest are byte-identical either way."""

    tissue: TissueConfig = Field(default_factory=TissueConfig)
    """Tissue detection settings."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Where Ray runs."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """S3 endpoint, retries and multipart settings."""

    @model_validator(mode="after")
    def _check(self) -> "TileConfig":
        if self.mode == "pairs" and self.hi_size % 4:
            raise ValueError(f"hi_size={self.hi_size} must be divisible by 4 (the teacher sees "
                             "a 4x4 grid of sub-tiles); use e.g. 896")
        if self.mode == "grid" and self.overlap >= self.tile_size:
            raise ValueError(f"overlap={self.overlap} must be smaller than tile_size="
                             f"{self.tile_size}")
        return self

    @field_validator("extensions")
    @classmethod
    def _dots(cls, v: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else f".{e.lower()}" for e in v]

    # Everything that changes the bytes of a shard; the rest (where, how fast) does not.
    RUN_ONLY: ClassVar[set[str]] = {"input", "output", "thumbnails", "overwrite", "task_cpus",
                                    "ray", "storage", "reader", "executor"}

    # What decides a grid slide's tiles and their pixels, whatever the cohort: embed records
    # these in every bag (attribute ``tiling``) and ``predict --slides`` tiles new slides with
    # them. Not recorded: where shards go and how they are cut, and the mpp fixes of one
    # cohort's metadata (``mpp_override``, ``force_mpp``), which say nothing about new slides.
    SLIDE_RECIPE: ClassVar[tuple[str, ...]] = (
        "tile_size", "tile_mpp", "overlap", "min_tissue", "max_tiles_per_slide", "seed",
        "mpp_tolerance", "jpeg_quality", "resample", "tissue")

    @property
    def out_size(self) -> int:
        return self.hi_size if self.mode == "pairs" else self.tile_size

    @property
    def target_mpp(self) -> float:
        return self.hi_mpp if self.mode == "pairs" else self.tile_mpp

    @property
    def lo_mpp(self) -> float:
        return self.hi_size * self.hi_mpp / self.lo_size

    @property
    def step_px(self) -> int:
        """Distance between neighbouring tiles in output pixels."""
        return self.out_size - (self.overlap if self.mode == "grid" else 0)
