"""Ingest: slides of the source that no tile manifest lists yet are tiled, cached and embedded.

Every stage here is the stage's own resumable function, which skips finished work: a slide's
shards are named ``<slide>-<part>`` and never depend on other slides (so an existing shard is
not rewritten), feature shards mirror tile shards by name, bags are per slide and current
bags are skipped. So ingesting N new slides writes their shards, features and bags and leaves
everything else byte-identical; only the manifests (which list the new shards) change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fusedist import storage
from fusedist.features import run_cache, run_embed
from fusedist.features.config import EmbedConfig, EncoderRef
from fusedist.formats import tile_manifest
from fusedist.formats.export_card import read_card
from fusedist.retrain.config import RetrainConfig
from fusedist.tiling import discover, run_tile
from fusedist.tracking import MlflowConfig

log = logging.getLogger("fusedist.retrain")


@dataclass
class IngestResult:
    """What the ingest did (``ingest.json`` of the run)."""

    new_slides: list[str] = field(default_factory=list)
    shards_written: dict[str, int] = field(default_factory=dict)
    features_written: dict[str, int] = field(default_factory=dict)
    bags_written: dict[str, int] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"new_slides": self.new_slides, "shards_written": self.shards_written,
                "features_written": self.features_written, "bags_written": self.bags_written,
                "failed": self.failed}


def source_slides(cfg: RetrainConfig) -> list[str]:
    """Slide ids of the source (as the tile stage names them)."""
    tcfg = next(iter(cfg.tile.values()), None)
    if tcfg is None:
        return []
    return [s.slide_id for s in discover(tcfg)]


def new_slides(cfg: RetrainConfig) -> list[str]:
    """Source slides that some tile dataset of the recipe does not list yet."""
    src = source_slides(cfg)
    seen = [tile_manifest.tiled_slides(storage.join(t.output, t.dataset))
            for t in cfg.tile.values()]
    return [s for s in src if any(s not in d for d in seen)]


def run_ingest(cfg: RetrainConfig, new: list[str], stage_mlflow: MlflowConfig,
               progress: bool = True) -> IngestResult:
    """Tile, cache and embed what is new (the stages skip everything that is done)."""
    res = IngestResult(new_slides=list(new))
    for name, tcfg in cfg.tile.items():
        t = run_tile(tcfg, progress=progress)
        res.shards_written[name] = t.written_shards
        res.failed += [{"stage": f"tile.{name}", "slide_id": f["slide_id"],
                        "reason": f["reason"]} for f in t.failed if f["slide_id"] in new]
        res.summaries.append(t.summary())
    # cache and embed: the same steps, each run nested under the retrain run in MLflow.
    for stage, stages, run, written in (("cache", cfg.cache, run_cache, res.features_written),
                                        ("embed", cfg.embed, run_embed, res.bags_written)):
        for name, scfg in stages.items():
            scfg = scfg.model_copy(update={"mlflow": nested_mlflow(stage_mlflow, scfg.mlflow)})
            out = run(scfg, progress=progress)
            written[name] = out.written
            res.failed += [{"stage": f"{stage}.{name}", **f} for f in out.failed]
            res.summaries.append(out.summary())
    return res


def embed_student(cfg: RetrainConfig, export_dir: str, stage_mlflow: MlflowConfig,
                  label: str, res: IngestResult, progress: bool = True) -> str:
    """Bags of every slide with the student exported at ``export_dir`` (current bags are
    skipped, so for the champion student only new slides are embedded). Returns its name."""
    assert cfg.student is not None
    ecfg: EmbedConfig = cfg.student.embed.model_copy(update={
        "encoders": [EncoderRef(name=export_dir)],
        "mlflow": nested_mlflow(stage_mlflow, cfg.student.embed.mlflow)})
    e = run_embed(ecfg, progress=progress)
    res.bags_written[label] = res.bags_written.get(label, 0) + e.written
    res.failed += [{"stage": label, **f} for f in e.failed]
    res.summaries.append(e.summary())
    return str(read_card(export_dir)[1]["name"])


def nested_mlflow(parent: MlflowConfig, own: MlflowConfig) -> MlflowConfig:
    """A stage's MLflow settings with the retrain run's parent tags added (its runs nest
    under the retrain run in the UI)."""
    return own.model_copy(update={"tags": {**own.tags, **parent.tags},
                                  "enabled": own.enabled and parent.enabled})
