"""``fusedist predict``'s config: the fused model, the slides (their bags, or the slides
themselves) and where the predictions go."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from fusedist.config import RayConfig, StorageConfig, StrictModel
from fusedist.features.config import EngineConfig
from fusedist.tracking import MlflowConfig


class SlideEncoder(StrictModel):
    """How ``predict --slides`` builds and feeds one encoder the model's card names, where the
    card's record does not serve (a moved export folder, bags from TRIDENT/CLAM)."""

    ref: str | None = None
    """Registry name or exported model folder (local or ``s3://``); default: the card's."""

    weights: str | None = None
    """Weights file or ``hf-hub:`` id; default: the card's, else the registry entry's own."""

    mpp: float | None = Field(None, gt=0)
    """Tile µm/px; default: the card's (the training bags')."""

    tile_size: int | None = Field(None, gt=0)
    """Tile side in pixels; default: the card's."""

    min_tissue: float | None = Field(None, ge=0, le=1)
    """Minimum tissue fraction of a tile; default: the card's tiling recipe, else 0.5."""


class PredictConfig(StrictModel):
    """Apply a fused model to new slides' bags."""

    model: str
    """The fused model: a ``fuse`` output's ``model/`` folder (local or ``s3://``), or a
    registered one, ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` (``fuse``
    with ``final.registered_model``)."""

    tracking_uri: str | None = None
    """MLflow server (or store URI) whose registry resolves ``models:/`` models; default:
    ``MLFLOW_TRACKING_URI``, else the local ``./mlruns/mlflow.db`` every stage logs to."""

    bags: str | None = None
    """Root of ``<encoder>/<slide_id>.h5`` bags for every encoder the model's card names."""

    slides: str | None = None
    """Or: slides (a folder or ``s3://`` prefix, or a slide table: ``fusedist tile``'s
    ``input``) to tile and embed first, as the model's card
    records for each encoder, into ``<output>/tiles/`` and ``<output>/bags/``."""

    output: str = "predict-output"
    """Where predictions.csv, heatmaps/, summary.md and manifest.json go."""

    slide_ids: list[str] | None = None
    """Slide ids to predict; default: every slide with a bag for the model's encoders."""

    patients: str | None = None
    """Slide table (``slide_id``, ``patient_id``; the one ``fuse`` took as ``slides``) that
    groups the slides into patients, for a model fused with ``unit: patient`` (its card says
    so): each patient's slides are pooled and predicted as one, one row per patient.
    Default: ``slides`` when that is a slide table."""

    thumbnails: str | None = None
    """Tile dataset (its ``thumbnails/``) or folder of ``<slide_id>.png`` for the heatmaps."""

    heatmaps: bool = True
    """Draw each expert component's attention over every slide."""

    device: str = Field("cpu", pattern="^(cpu|cuda|auto)$")
    """Where the heads run."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """S3 endpoint and retries."""

    encoders: dict[str, SlideEncoder] = {}
    """With ``slides``: per card encoder, what to use instead of the card's record (e.g.
    ``{xmag-student: {ref: /models/export}}`` for a moved export folder)."""

    mpp_override: float | None = Field(None, gt=0)
    """With ``slides``: level-0 µm/px for slides whose metadata has none (else they fail)."""

    engine: EngineConfig = Field(default_factory=EngineConfig)
    """With ``slides``: how the encoders run (batch size, actors, device)."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """With ``slides``: where Ray runs the tiling and embedding."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """With ``slides``: tracking of the tile and embed runs."""

    @field_validator("encoders", mode="before")
    @classmethod
    def _encoder_refs(cls, v):
        return {k: {"ref": x} if isinstance(x, str) else x for k, x in (v or {}).items()}

    @model_validator(mode="after")
    def _one_source(self) -> "PredictConfig":
        if (self.bags is None) == (self.slides is None):
            raise ValueError("give exactly one of 'bags' (embedded slides) or 'slides' (slides "
                             "to tile and embed first)")
        return self
