"""The cohort ``fusedist fuse`` works on, as plain arrays: what every fold, task and method
reads. ``fusion.data`` builds and checks it (``load_cohort``) and makes the folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fusedist.fusion.units import SEP


@dataclass
class Cohort:
    """Everything a fold needs, as plain arrays (it travels to Ray tasks).

    Slide-level tasks have one sample per slide; ``tile_classification`` has one sample per
    sampled tile (``sample_slide`` maps a sample to its slide). With ``unit: patient`` each
    "slide" below is a patient: ``slide_ids`` are patient ids and each per-slide array is
    the patient's slides pooled (fusedist.fusion.units); ``members`` lists those slides.
    """

    task: str
    slide_ids: list[str]
    """The id of each unit: slide ids, or patient ids with ``unit: patient``."""
    patient_ids: list[str]
    encoders: list[str]
    """Encoders with an expert (all, or for tile tasks the feature group)."""
    dims: dict[str, int]
    bags: dict[str, Sequence[np.ndarray]]
    """encoder -> per-slide features (N_i, D) float32, each encoder's own tiles (a list, or
    packed on disk past ``bags_in_memory_gb``: fusedist.fusion.store)."""
    coords: dict[str, Sequence[np.ndarray]]
    feature_group: list[str]
    """Encoders that share tiles, so per-tile feature fusion (concat, Meta-Encoder,
    FuseCPath) can combine them."""
    aligned: dict[str, Sequence[np.ndarray]]
    """feature_group encoder -> per-slide features on the tiles all of them share (views of
    ``bags``: fusedist.fusion.store.Picked)."""
    aligned_coords: Sequence[np.ndarray]
    y: np.ndarray | None = None
    """Class ids (S,) int64, or regression targets (S, G) float32."""
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    tile_extent: dict[str, float] = field(default_factory=dict)
    """encoder -> tile side in level-0 px (for heatmaps)."""
    encoder_info: dict[str, dict] = field(default_factory=dict)
    """encoder -> what a fused model's card records: dim, mpp, tile size, weights digest."""
    exclusions: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sample_slide: np.ndarray | None = None
    """Tile tasks: slide index of each sample."""
    sample_index: np.ndarray | None = None
    """Tile tasks: row of each sample in its slide's aligned features."""
    unit: str = "slide"
    """``slide`` or ``patient`` (FuseConfig.unit, decided)."""
    members: list[list[str]] | None = None
    """Patient unit: the slides pooled into each unit, in pooling (slide-id) order."""
    member_sizes: dict[str, list[list[int]]] | None = None
    """Patient unit: encoder -> per unit, the tiles each member slide contributes."""

    def unit_slides(self, i: int) -> list[str]:
        """The slides of unit ``i`` (itself, for slide units)."""
        return [self.slide_ids[i]] if self.members is None else self.members[i]

    def unit_label(self, i: int) -> str:
        """What predictions.csv and folds.csv write as unit ``i``'s slide_id: the slide, or
        the patient's slides joined by ``;``."""
        return SEP.join(self.unit_slides(i))

    def columns(self) -> list[Sequence[np.ndarray]]:
        """The per-slide sequences that may be packed on disk (fusedist.fusion.store)."""
        return [*self.bags.values(), *self.coords.values(), self.aligned_coords]

    @property
    def num_samples(self) -> int:
        return len(self.slide_ids) if self.sample_slide is None else len(self.sample_slide)

    @property
    def sample_groups(self) -> list[str]:
        """Patient of each sample (folds never split a patient)."""
        if self.sample_slide is None:
            return self.patient_ids
        return [self.patient_ids[i] for i in self.sample_slide]
