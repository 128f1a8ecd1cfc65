"""``fusedist cache``: run every teacher once over tile shards and keep their features.

Feature shards mirror tile shards one to one (same names, keys and order) in one folder per
teacher, ``<output>/<teacher>/<dataset>/``. Each shard is published atomically, then its
done-entry; the folder's ``manifest.json`` lists only shards that are done. A re-run skips
done shards, so a killed run finishes where it stopped and gives the same bytes.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from fusedist import shards, storage
from fusedist.features.config import CacheConfig
from fusedist.features.engine.core import EngineSpec, EngineStats, Group
from fusedist.features.engine.plan import execute, plan_engine, shard_progress
from fusedist.features.parts import ShardResult
from fusedist.formats import feature_manifest
from fusedist.formats.tile_manifest import read_tile_manifest
from fusedist.lineage import OUTPUT, features_ref, tiles_ref
from fusedist.models.refs import actor_refs, load_encoders, stage_tracking_uri
from fusedist.state import StageState, mismatch_error
from fusedist.tracking import random_weights_line, start_run, warn_random_weights

log = logging.getLogger("fusedist.cache")


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


@dataclass
class TeacherInfo:
    name: str
    url: str  # <output>/<teacher>/<dataset>
    digest: str
    dim: int
    random_weights: bool


@dataclass
class CacheResult:
    manifests: dict[str, dict]
    failed: list[dict] = field(default_factory=list)
    written: int = 0
    tiles: int = 0
    elapsed: float = 0.0
    engine_seconds: float = 0.0  # decode + encoders + writes, without start-up and loading
    random_weights: list[str] = field(default_factory=list)  # teachers without a checkpoint
    engine: EngineStats = field(default_factory=EngineStats)

    def summary(self) -> str:
        rate = self.tiles / self.elapsed if self.elapsed else 0.0
        lines = [f"cached {len(self.manifests)} teacher(s): "
                 + ", ".join(f"{t} ({m['totals']['shards']} shards, {m['totals']['samples']} "
                             f"samples, dim {m['dim']})" for t, m in self.manifests.items()),
                 f"this run: {self.written} shard(s) embedded, {self.tiles} tiles in "
                 f"{self.elapsed:.1f} s ({rate:.1f} tiles/s)"]
        lines += [f"  FAILED {f['name']}: {f['reason']}" for f in self.failed]
        lines += [x for x in [random_weights_line(self.random_weights)] if x]
        return "\n".join(lines)


def _state(t: TeacherInfo) -> StageState:
    return StageState(t.url, "shards")


def _done_entries(t: TeacherInfo, tile_shards: list[dict], overwrite: bool) -> dict[str, dict]:
    """The current done-entries of ``t`` by shard name: one listing and concurrent reads (a
    request per shard one after another took minutes on S3 at 10,000 slides)."""
    listed = shards.listed_shards(t.url)
    entries = _state(t).read_many(s["name"] for s in tile_shards)
    return {s["name"]: e for s in tile_shards
            if (e := _valid_entry(t, s, overwrite, entries.get(s["name"]), listed)) is not None}


def _valid_entry(t: TeacherInfo, shard: dict, overwrite: bool, e: dict | None,
                 listed: dict[str, bool]) -> dict | None:
    """The shard's done-entry ``e`` if it is current for this teacher's weights and source
    shard and the shard is whole on storage (``shards.shard_written``)."""
    if e is None:
        return None
    if e.get("weights_digest") != t.digest and not overwrite:
        raise mismatch_error(t.url, f"features of {t.name}",
                             f"set of weights (other weights: digest "
                             f"{e.get('weights_digest', '?')[:12]} vs {t.digest[:12]})")
    current = (e.get("weights_digest") == t.digest and e.get("source_sha256") == shard["sha256"]
               and shards.shard_written(shard["name"], e, listed))
    return e if current else None


def _write(t: TeacherInfo, res: ShardResult, source: dict) -> dict:
    feats = res.features[t.name].astype(np.float16)  # design.md: feature shards are float16
    if feats.shape[1] == 1:  # grid: one vector per tile, (D,)
        feats = feats[:, 0]
    samples = ((k, {f"{t.name}.npy": npy_bytes(f)}) for k, f in zip(res.keys, feats))
    info = shards.write_shard(storage.join(t.url, res.name), samples)
    # The hash of the tile bytes actually read (the engine failed the shard had it differed).
    entry = {"name": res.name, "source_sha256": res.sha256 or source["sha256"],
             "weights_digest": t.digest,
             **info}
    _state(t).write(res.name, entry)
    return entry


def _finish_shard(name: str, payload: tuple[list[TeacherInfo], dict],
                  results: dict[str, ShardResult]) -> dict:
    """Finish call (runs on a worker): write the shard's feature shards and done-entries for
    the teachers that lack them; returns {teacher: done-entry}."""
    teachers, source = payload
    return {t.name: _write(t, results[name], source) for t in teachers}


def _manifest(t: TeacherInfo, cfg: CacheConfig, tile_manifest: dict, failed: list[dict],
              per_sample: list[int], done: dict[str, dict]) -> dict:
    keys = ("name", "samples", "bytes", "sha256", "index_sha256", "source_sha256")
    rows = [{k: e[k] for k in keys if k in e}  # no index_sha256: written before indexes
            for s in tile_manifest["shards"] if (e := done.get(s["name"])) is not None]
    return {"format": feature_manifest.FORMAT, "teacher": t.name, "weights_digest": t.digest,
            "random_weights": t.random_weights, "dim": t.dim, "dtype": "float16",
            "sample_shape": [*per_sample, t.dim], "mode": tile_manifest["mode"],
            "dataset": tile_manifest["dataset"], "source": cfg.tiles.rstrip("/"),
            "source_config_digest": tile_manifest["config_digest"], "shards": rows,
            "failed": failed,
            "totals": {"shards": len(rows), "samples": sum(r["samples"] for r in rows),
                       "bytes": sum(r["bytes"] for r in rows), "failed": len(failed)}}


def run_cache(cfg: CacheConfig, progress: bool = True) -> CacheResult:
    """Cache every teacher's features for the tile dataset ``cfg.tiles``."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    tm = read_tile_manifest(cfg.tiles)
    uri = stage_tracking_uri(cfg.mlflow)  # models:/ teachers resolve where the run logs
    encoders = load_encoders(cfg.teachers, uri)  # wrong weights fail here, before any work
    teachers = [TeacherInfo(e.spec.name, storage.join(cfg.output, e.spec.name, tm["dataset"]),
                            e.weights_digest, e.spec.dim, e.random_weights)
                for e in encoders]
    # Done-entries are read once; writes add to this, and the manifests are built from it.
    done = {t.name: _done_entries(t, tm["shards"], cfg.overwrite) for t in teachers}
    todo = [s for s in tm["shards"] if any(s["name"] not in done[t.name] for t in teachers)]
    by_name = {s["name"]: s for s in tm["shards"]}
    plan = plan_engine(cfg.engine, cfg.ray)
    refs = actor_refs(cfg.teachers, encoders, uri, cfg.output)
    if not plan.local:
        encoders = []  # Ray actors build their own: free the driver's copies
    per = 16 if tm["mode"] == "pairs" else 1
    spec = EngineSpec(tiles_url=cfg.tiles.rstrip("/"), mode=tm["mode"],
                      image_key="hi.jpg" if tm["mode"] == "pairs" else "img.jpg",
                      tile_px=tm["config"]["lo_size"] if tm["mode"] == "pairs" else
                      tm["config"]["tile_size"],
                      chunk=max(1, cfg.engine.batch_size // per),
                      encoders=tuple(refs),
                      device=plan.device, compile=cfg.engine.compile,
                      staging=storage.join(cfg.output, "_state", "parts", tm["dataset"]),
                      threads=plan.threads, storage_cfg=cfg.storage.model_dump())
    # One group per shard: its finish call writes each teacher's shard that is not done yet.
    groups = {s["name"]: Group((s["name"],), ([t for t in teachers if s["name"] not in
                                               done[t.name]], s)) for s in todo}
    result = CacheResult(manifests={})
    with start_run(cfg.mlflow, run_name=f"cache-{tm['dataset']}", params=cfg,
                   tags={"fusedist.stage": "cache"}) as run:
        warn_random_weights(run, [t.name for t in teachers if t.random_weights])
        result.random_weights = [t.name for t in teachers if t.random_weights]
        with shard_progress(len(todo), "cache", progress) as bar:
            def on_group(name: str, entries: dict | None, error: str) -> None:
                if error:
                    result.failed.append({"name": name, "reason": error})
                    log.error("shard %s failed: %s", name, error)
                    bar.advance(0)
                    return
                for t, e in entries.items():
                    done[t][name] = e
                result.written += 1
                result.tiles += by_name[name]["samples"]
                bar.advance(by_name[name]["samples"])

            t_engine = time.perf_counter()
            result.engine = execute(plan, spec, [(s["name"], s["samples"], s.get("sha256"))
                                                 for s in todo], groups, _finish_shard,
                                    on_group, encoders)
            result.engine_seconds = time.perf_counter() - t_engine
        per_sample = [16] if tm["mode"] == "pairs" else []
        for t in teachers:
            m = _manifest(t, cfg, tm, result.failed, per_sample, done[t.name])
            feature_manifest.write(t.url, m)
            result.manifests[t.name] = m
            run.log_dict(m, f"manifests/{t.name}.json")
        if run.active:
            run.log_datasets([tiles_ref(cfg.tiles), *(features_ref(t.url, OUTPUT)
                                                      for t in teachers)])
        result.elapsed = time.perf_counter() - t0
        run.log_metrics({"tiles": result.tiles, "shards_written": result.written,
                         "shards_failed": len(result.failed),
                         "tiles_per_s": result.tiles / max(result.elapsed, 1e-9)})
    return result
