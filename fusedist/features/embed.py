"""``fusedist embed``: grid tile shards (or slides) -> one HDF5 bag per slide per encoder.

Same engine as ``cache``; all encoders that share a resolution run in one pass over the tiles.
Bags carry the weights digest and a digest of the slide's source shards, so a re-run skips
slides whose bags are current and redoes only the rest (resumable per slide).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from fusedist import mlmodels, storage
from fusedist.config import ConfigError
from fusedist.features.check import check_embed, grid_manifest
from fusedist.features.config import EmbedConfig
from fusedist.features.engine.core import EngineSpec, EngineStats, Group
from fusedist.features.engine.plan import EnginePlan, execute, plan_engine, shard_progress
from fusedist.features.parts import ShardResult
from fusedist.formats.bags import Bag, bag_is_current, bag_url, write_bag
from fusedist.formats.slide_ids import encode_id
from fusedist.formats.tile_manifest import read_tile_manifest
from fusedist.lineage import OUTPUT, bags_ref, tiles_ref
from fusedist.models.refs import (actor_refs, load_encoders, resolve_ref, shared_export,
                                  stage_tracking_uri)
from fusedist.state import StageState
from fusedist.tracking import random_weights_line, start_run, warn_random_weights

log = logging.getLogger("fusedist.embed")


@dataclass
class EmbedResult:
    bags: dict[str, dict[str, str]] = field(default_factory=dict)  # encoder -> slide -> url
    written: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    tiles: int = 0
    elapsed: float = 0.0
    random_weights: list[str] = field(default_factory=list)  # encoders without a checkpoint
    engine: list[EngineStats] = field(default_factory=list)  # one per resolution group

    def summary(self) -> str:
        rate = self.tiles / self.elapsed if self.elapsed else 0.0
        lines = [f"embedded {sum(len(v) for v in self.bags.values())} bags for "
                 f"{len(self.bags)} encoder(s): {self.written} written, {self.skipped} "
                 f"already current; {self.tiles} tiles in {self.elapsed:.1f} s "
                 f"({rate:.1f} tiles/s)"]
        lines += [f"  FAILED {f['slide_id']}: {f['reason']}" for f in self.failed]
        lines += [x for x in [random_weights_line(self.random_weights)] if x]
        return "\n".join(lines)


def coords_of(keys: list[str]) -> np.ndarray:
    """Level-0 (x, y) from keys ``<slide_id>/<x>_<y>``."""
    xy = [k.rsplit("/", 1)[1].split("_") for k in keys]
    return np.asarray(xy, dtype=np.int64).reshape(-1, 2)


def _groups(encoders: list) -> dict[tuple[float, int], list]:
    """Encoders that see the same tiles (same mpp and input size) share one pass."""
    out: dict[tuple[float, int], list] = {}
    for e in encoders:
        out.setdefault((float(e.spec.mpp), int(e.spec.input_size)), []).append(e)
    return out


def _tiles_for(cfg: EmbedConfig, mpp: float, size: int, names: list[str]) -> str:
    """The grid tile dataset this group embeds: the given one (checked), or slides tiled now."""
    if cfg.tiles:
        tm = grid_manifest(cfg.tiles)
        tmpp, tsize = float(tm["config"]["tile_mpp"]), int(tm["config"]["tile_size"])
        if tsize != size or (abs(tmpp - mpp) > 1e-6 and not cfg.allow_mpp_mismatch):
            raise ConfigError(f"{names} expect {size} px tiles at {mpp:g} µm/px but {cfg.tiles} "
                              f"has {tsize} px at {tmpp:g} µm/px; tile with --set tile_size="
                              f"{size} --set tile_mpp={mpp:g} (or allow_mpp_mismatch=true)")
        return cfg.tiles.rstrip("/")
    # lazy: tiling imports scipy and PIL, which embedding a given tile dataset does not need
    from fusedist.features.slides import tile_grid

    res = tile_grid(cfg.slides, storage.join(cfg.output, "_tiles"), f"grid_{size}px_{mpp:g}um",
                    {"tile_size": size, "tile_mpp": mpp, "min_tissue": cfg.min_tissue},
                    ray=cfg.ray, storage=cfg.storage, progress=False)
    return res.dataset_url


def _slide_digest(slide: dict, shard_sha: dict[str, str]) -> str:
    return hashlib.sha256("".join(shard_sha[n] for n in slide["shards"]).encode()).hexdigest()


def _embed_group(cfg: EmbedConfig, plan: EnginePlan, tiles_url: str, encoders: list,
                 result: EmbedResult, progress: bool) -> None:
    tm = read_tile_manifest(tiles_url)
    shard_sha = {s["name"]: s["sha256"] for s in tm["shards"]}
    samples = {s["name"]: s["samples"] for s in tm["shards"]}
    slides = [s for s in tm["slides"] if s["status"] == "ok" and s["shards"]]
    for e in encoders:
        result.bags[e.spec.name] = {s["slide_id"]: bag_url(cfg.output, e.spec.name, s["slide_id"])
                                    for s in slides}
    stale, result.skipped = bags_to_do(cfg.output, {e.spec.name: e.weights_digest
                                                    for e in encoders}, slides, shard_sha)
    by_name = {e.spec.name: e for e in encoders}
    # slide -> encoders whose bag is missing or stale
    todo = {sid: [by_name[n] for n in names] for sid, names in stale.items()}
    by_id = {s["slide_id"]: s for s in slides}
    shard_list = [(n, samples[n], shard_sha[n]) for sid in todo for n in by_id[sid]["shards"]]
    spec = EngineSpec(tiles_url=tiles_url, mode="grid", image_key="img.jpg",
                      tile_px=int(tm["config"]["tile_size"]),
                      chunk=cfg.engine.batch_size,
                      encoders=tuple(actor_refs(cfg.encoders, encoders, _tracking_uri(cfg),
                                               cfg.output)),
                      device=plan.device, compile=cfg.engine.compile,
                      staging=storage.join(cfg.output, "_state", "parts", tm["dataset"]),
                      threads=plan.threads, storage_cfg=cfg.storage.model_dump())
    meta = {"tile_mpp": float(tm["config"]["tile_mpp"]),
            "tile_size": int(tm["config"]["tile_size"]), "dataset": tm.get("dataset", ""),
            "tiling": _recipe(tm["config"])}
    refs = _recorded_refs(cfg)
    # One group per slide: its finish call writes the slide's bags from all its shards.
    groups = {sid: Group(tuple(by_id[sid]["shards"]),
                         _BagJob(cfg.output, by_id[sid], meta, _slide_digest(by_id[sid], shard_sha),
                                 [_EncInfo(e.spec.name, e.weights_digest, e.random_weights,
                                           *refs.get(e.spec.name, (e.spec.name, None)))
                                  for e in todo[sid]]))
              for sid in todo}

    with shard_progress(len(todo), f"embed {tm['dataset']}", progress) as bar:
        def on_group(sid: str, entry: dict | None, error: str) -> None:
            bar.advance(entry["tiles"] if entry else 0)
            if error:
                result.failed.append({"slide_id": sid, "reason": error})
                return
            result.tiles += entry["tiles"]
            result.written += entry["bags"]

        result.engine.append(execute(plan, spec, shard_list, groups, _finish_slide, on_group,
                                     encoders))


def bag_state(output: str, encoder: str) -> StageState:
    """``<output>/_state/bags/<encoder>/<slide>.json``: a bag's done-entry (its weights and
    source digests and its size), written right after the bag by the same finish call."""
    return StageState(output, "bags", encoder)


def bags_to_do(output: str, weights: dict[str, str], slides: list[dict],
               shard_sha: dict[str, str]) -> tuple[dict[str, list[str]], int]:
    """({slide: [encoders whose bag is missing or stale]}, bags already current).

    A bag is current when its done-entry names this encoder's weights digest and the slide's
    source digest and the file is there with the size the entry recorded (one listing and
    concurrent small reads per encoder: ~10,000 HDF5 opens, several ranged GETs each on S3,
    were the cost). A bag with no entry (written before entries existed) is asked itself
    (:func:`bag_is_current`), so nothing made earlier is redone or trusted blindly."""
    digests = {s["slide_id"]: _slide_digest(s, shard_sha) for s in slides}
    todo: dict[str, list[str]] = {}
    skipped = 0
    for name, wd in weights.items():
        entries = bag_state(output, name).read_many(digests)
        sizes = storage.file_sizes(storage.join(output, name), ".h5")
        for sid, digest in digests.items():
            want = {"weights_digest": wd, "source_digest": digest}
            e, size = entries.get(sid), sizes.get(f"{encode_id(sid)}.h5")
            if size is None:
                current = False
            elif e is not None:
                current = e.get("bytes") == size and all(e.get(k) == v for k, v in want.items())
            else:
                current = bag_is_current(bag_url(output, name, sid), want)
            if current:
                skipped += 1
            else:
                todo.setdefault(sid, []).append(name)
    return todo, skipped


def _tracking_uri(cfg: EmbedConfig) -> str:
    return stage_tracking_uri(cfg.mlflow)


def _recipe(tile_config: dict) -> dict:
    """The tiling settings a bag records (``TileConfig.SLIDE_RECIPE``): what ``predict
    --slides`` needs to tile a new slide as this one was."""
    # lazy: tiling imports scipy and PIL (see _tiles_for)
    from fusedist.tiling import TileConfig

    return {k: tile_config[k] for k in TileConfig.SLIDE_RECIPE if k in tile_config}


def _recorded_refs(cfg: EmbedConfig) -> dict[str, tuple[str, str | None]]:
    """Encoder name -> (reference, weights) as bags record them: a registry name as is, an
    exported model's folder as an absolute path or URL (for a ``models:/`` model, its copy
    under the output), so a later process (``predict --slides`` on the fused model's card)
    can build the same encoder."""
    uri = _tracking_uri(cfg)
    out = {}
    for r in cfg.encoders:
        name = resolve_ref(r.name, uri)
        ref = r.name
        if mlmodels.is_registry_uri(ref):
            ref = shared_export(cfg.output, name)
        if ref != name and not storage.is_s3(ref):  # a local export folder or card
            ref = str(storage.local_path(ref).expanduser().resolve())
        out[name] = (ref, r.weights)
    return out


@dataclass(frozen=True)
class _EncInfo:
    name: str
    weights_digest: str
    random_weights: bool
    ref: str  # how to build it again: registry name or exported model folder
    weights: str | None  # the weights given at embed time (None: the entry's own)


@dataclass(frozen=True)
class _BagJob:
    """What the finish call of one slide needs to write its bags (plain data)."""

    output: str
    slide: dict
    meta: dict  # tile_mpp, tile_size, dataset
    digest: str
    encoders: list[_EncInfo]


def _finish_slide(sid: str, job: _BagJob, parts: dict[str, ShardResult]) -> dict:
    """Finish call (runs on a worker): one bag per encoder from the slide's shards in order."""
    ordered = [parts[n] for n in job.slide["shards"]]
    keys = [k for p in ordered for k in p.keys]
    coords = coords_of(keys)
    mpp0 = float(job.slide["mpp0"])
    tile_mpp, size = job.meta["tile_mpp"], job.meta["tile_size"]
    for e in job.encoders:
        feats = np.concatenate([p.features[e.name][:, 0] for p in ordered]).astype(np.float32)
        attrs = {"weights_digest": e.weights_digest, "source_digest": job.digest,
                 "source": job.meta["dataset"], "random_weights": e.random_weights,
                 "mpp0": mpp0, "patch_size_level0": int(round(size * tile_mpp / mpp0)),
                 # What `predict --slides` replays from the fused model's card.
                 "encoder_ref": e.ref, "tiling": job.meta["tiling"]}
        if e.weights:
            attrs["encoder_weights"] = e.weights
        bag = Bag(slide_id=sid, features=feats, coords=coords, encoder=e.name, mpp=tile_mpp,
                  tile_size=size, attrs=attrs)
        url = bag_url(job.output, e.name, sid)
        write_bag(url, bag)
        bag_state(job.output, e.name).write(sid, {
            "weights_digest": e.weights_digest, "source_digest": job.digest,
            "bytes": storage.size(url)})
    return {"tiles": len(keys), "bags": len(job.encoders)}


def run_embed(cfg: EmbedConfig, progress: bool = True, built: list | None = None
              ) -> EmbedResult:
    """Embed every slide of the tile dataset (or slide folder) with every encoder.
    ``built``: the encoders of ``cfg.encoders``, already built (and checked) by the caller
    (``predict --slides``), so they are not built a second time here."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    check_embed(cfg)  # missing tiles/slides fail here, before encoders load and Ray starts
    encoders = built if built is not None else load_encoders(cfg.encoders, _tracking_uri(cfg))
    plan = plan_engine(cfg.engine, cfg.ray)
    result = EmbedResult()
    with start_run(cfg.mlflow, run_name="embed", params=cfg,
                   tags={"fusedist.stage": "embed"}) as run:
        warn_random_weights(run, [e.spec.name for e in encoders if e.random_weights])
        result.random_weights = [e.spec.name for e in encoders if e.random_weights]
        lineage = []
        for (mpp, size), group in _groups(encoders).items():
            tiles_url = _tiles_for(cfg, mpp, size, [e.spec.name for e in group])
            _embed_group(cfg, plan, tiles_url, group, result, progress)
            if run.active:  # what this group read and wrote (the digests cost a listing)
                lineage += [tiles_ref(tiles_url)] + [
                    bags_ref(storage.join(cfg.output, e.spec.name), e.spec.name, OUTPUT)
                    for e in group]
        run.log_datasets(lineage)
        result.elapsed = time.perf_counter() - t0
        run.log_metrics({"bags_written": result.written, "bags_current": result.skipped,
                         "slides_failed": len(result.failed), "tiles": result.tiles,
                         "tiles_per_s": result.tiles / max(result.elapsed, 1e-9)})
    return result
