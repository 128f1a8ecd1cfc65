"""Configs of ``fusedist cache`` and ``fusedist embed`` (they share the inference engine)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from fusedist.config import RayConfig, StorageConfig, StrictModel
from fusedist.tracking import MlflowConfig


class EncoderRef(StrictModel):
    """An encoder from the registry, optionally with its weights."""

    name: str
    """Registry name (``fusedist.models.list_encoders()``), e.g. ``uni2-h`` or ``test-vit``."""

    weights: str | None = None
    """Local safetensors/.pt file or ``hf-hub:`` id; default: the entry's own source.
    ``random``: random weights of the real architecture (benchmarks; flagged in logs/MLflow)."""


def _refs(v):
    """Accept ``[uni, {name: virchow2, weights: ...}]`` as well as full mappings."""
    if isinstance(v, str):
        v = [v]
    return [{"name": x} if isinstance(x, str) else x for x in v]


class EngineConfig(StrictModel):
    """How the inference engine runs (Ray Data: CPU decode tasks -> encoder actors)."""

    batch_size: int = Field(256, gt=0)
    """Encoder inputs (224 px tiles) per forward; pairs samples count 16 each. Large on GPUs
    (e.g. 1024), small on CPU."""

    min_actors: int = Field(1, gt=0)
    """Encoder actors the pool starts with (Ray Data ``ActorPoolStrategy(min_size=...)``)."""

    max_actors: int | None = Field(None, gt=0)
    """Most encoder actors (``max_size``): Ray Data adds actors up to this while there is work,
    and on an autoscaling cluster their GPU requests make the autoscaler bring up GPU nodes.
    Default: ``min_actors`` (a fixed pool). The GPU recipes set the GPUs the worker group can
    reach (e.g. 16 for 2 nodes x 8)."""

    gpus_per_actor: float = Field(1.0, ge=0)
    """GPUs each actor requests when the device is ``cuda``."""

    cpus_per_actor: float | None = Field(None, gt=0)
    """CPUs each actor holds; its torch uses that many threads. Default: 1 on ``cuda`` (the
    GPU computes); on ``cpu`` the largest node's CPUs minus ``decode_cpus``, so the model gets
    all the cores that decoding does not need."""

    decode_cpus: float = Field(0.25, gt=0)
    """CPUs for JPEG decoding. On ``cpu``: what all decode tasks hold together (at most one
    per encoder actor runs at once, each ``decode_cpus / max_actors``), so decode tasks placed
    first can never keep an actor from its node; decoding a 224 px JPEG costs ~1/50 of a ViT-S
    forward, so a quarter CPU keeps the encoders fed. On ``cuda``: per decode task, as many
    tasks as Ray Data schedules (a GPU eats far more tiles per second than one task decodes)."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where encoders run. ``cuda``: actors request ``gpus_per_actor`` GPUs each, whether or
    not a GPU node is up yet (an autoscaling cluster starts GPU nodes for them); the GPU
    recipes set it. ``auto``: ``cuda`` when the Ray cluster has GPUs when the stage starts,
    else ``cpu``; on a cluster joined by address that has no GPU yet this logs a warning,
    because an autoscaling cluster has none until something asks for one."""

    compile: bool = False
    """``torch.compile`` the encoders (worth it on GPUs for long runs)."""

    executor: Literal["auto", "ray", "local"] = "auto"
    """``ray``: Ray Data (decode tasks, an autoscaling pool of encoder actors; a private local
    Ray is started when none is running or configured). ``local``: no Ray, the loop a user
    would write: DataLoader workers decode, the encoders run in this process on every core or
    its GPU (``fusedist.features.engine.local``), saving Ray's start and the actor's own
    imports and encoder build (~10-30 s on a laptop). ``auto``: Ray when ``ray.address`` or
    ``RAY_ADDRESS`` is set (a cluster, a RayJob) or this process already runs Ray
    (``fusedist demo``), else local. Outputs are byte-identical either way."""

    decode_workers: int | None = Field(None, gt=0)
    """DataLoader workers that decode with ``executor: local``. Default: 1 on CPU (decoding
    a tile costs ~1/50 of a ViT-S forward; the model keeps every core), up to 8 on a GPU."""


    @model_validator(mode="after")
    def _pool_bounds(self) -> "EngineConfig":
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(f"engine.max_actors ({self.max_actors}) is below "
                             f"engine.min_actors ({self.min_actors}); raise max_actors")
        return self


class _EngineStage(StrictModel):
    """Sections every engine stage shares."""

    engine: EngineConfig = Field(default_factory=EngineConfig)
    """Batch size, actors, device."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Where Ray runs."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """S3 endpoint and retries."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """Experiment tracking."""


class CacheConfig(_EngineStage):
    """Tile shards -> teacher feature shards, all teachers in one pass over the data."""

    tiles: str
    """A tile dataset folder (with manifest.json), e.g. ``data/tiles/pairs``."""

    output: str = "data/features"
    """Root for feature datasets; writes ``<output>/<teacher>/<dataset>/``."""

    teachers: list[EncoderRef]
    """Teachers to run, e.g. ``[uni2-h]`` or ``[{name: uni, weights: /models/uni.bin}]``."""

    overwrite: bool = False
    """Replace features made with other weights (otherwise that is an error)."""


    @field_validator("teachers", mode="before")
    @classmethod
    def _teacher_refs(cls, v):
        return _refs(v)

    RUN_ONLY: ClassVar[set[str]] = {"overwrite", "engine", "ray", "storage", "mlflow"}


class EmbedConfig(_EngineStage):
    """Grid tile shards (or slides) -> one HDF5 bag per slide per encoder."""

    tiles: str | None = None
    """A ``grid`` tile dataset folder; or give ``slides`` to tile them first."""

    slides: str | None = None
    """Slides to tile at each encoder's resolution first (into ``<output>/_tiles/``): a
    folder, a slide file or a slide table (``fusedist tile``'s ``input``)."""

    output: str = "data/bags"
    """Root for bags: ``<output>/<encoder>/<slide_id>.h5``."""

    encoders: list[EncoderRef]
    """Encoders to embed with (all in one pass over the tiles)."""

    min_tissue: float = Field(0.5, ge=0, le=1)
    """With ``slides``: minimum tissue fraction of a tile."""

    allow_mpp_mismatch: bool = False
    """Embed tiles whose mpp differs from the encoder's (normally an error)."""


    @field_validator("encoders", mode="before")
    @classmethod
    def _encoder_refs(cls, v):
        return _refs(v)

    @model_validator(mode="after")
    def _one_source(self) -> "EmbedConfig":
        if (self.tiles is None) == (self.slides is None):
            raise ValueError("give exactly one of 'tiles' (a grid tile dataset) or 'slides' "
                             "(slides to tile first)")
        return self
