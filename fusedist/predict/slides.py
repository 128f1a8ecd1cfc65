"""``fusedist predict --slides``: tile and embed new slides the way the fused model's training
bags were made, then predict them from those bags (exactly as ``--bags``).

The model's card records, per encoder, what its training bags came from (``fusedist embed``
writes it into every bag, ``fuse`` copies it into the card): the encoder reference (registry
name, or the exported XMAG student's folder), the weights given, the tile mpp and size, and the
tiling recipe (tissue detection, ``min_tissue``, overlap, resampling, JPEG quality:
``TileConfig.SLIDE_RECIPE``). Encoders that share a recipe share one ``fusedist tile`` run into
``<output>/tiles/<dataset>/``; ``fusedist embed`` then writes ``<output>/bags/<encoder>/``.
Both stages resume per slide (a re-run re-tiles and re-embeds nothing that is current), and
``predict``'s own ``_state/`` skips slides already predicted.

A slide that cannot be tiled (unreadable file, no mpp), has no tissue tile at some encoder's
resolution, or fails to embed is returned as failed with the reason; the rest proceed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.features import EmbedConfig, run_embed
from fusedist.features.config import EncoderRef
from fusedist.models.refs import load_encoders, stage_tracking_uri
from fusedist.predict.config import PredictConfig, SlideEncoder
from fusedist.features.slides import tile_grid
from fusedist.tiling import TileConfig
from fusedist.tiling.job import discover

log = logging.getLogger("fusedist")


@dataclass
class _Plan:
    """One card encoder, resolved: how to build it and the tiling recipe of its slides."""

    name: str
    ref: str
    weights: str | None
    recipe: dict  # TileConfig fields (SLIDE_RECIPE), tile_mpp and tile_size included
    mpp_mismatch: bool  # the card's mpp differs from the encoder's own (embedded anyway)


@dataclass
class SlidesResult:
    bags: str  # <output>/bags
    thumbnails: str | None  # a tile dataset with thumbnails/ (for the heatmaps)
    failed: dict[str, str] = field(default_factory=dict)  # slide_id -> reason
    tiled: list[str] = field(default_factory=list)  # every slide the tiler saw


def _fix(e: str, what: str) -> str:
    return (f"give it with `--set encoders.{e}.{what}=...`, or embed the slides yourself "
            f"(`fusedist embed -e <encoder>`) and predict with `--bags`")


def plan_encoders(cfg: PredictConfig, card: dict) -> list[_Plan]:
    """Resolve every encoder the card names; a ConfigError names what is missing and the fix
    before any slide is touched."""
    unknown = sorted(set(cfg.encoders) - set(card["encoders"]))
    if unknown:
        raise ConfigError(f"encoders: {unknown} are not in the model's card (it names "
                          f"{sorted(card['encoders'])})")
    defaults = TileConfig(input=".", mode="grid").model_dump(mode="json")
    plans = []
    for e, info in card["encoders"].items():
        info = info or {}
        over = cfg.encoders.get(e) or SlideEncoder()
        mpp = over.mpp or info.get("mpp")
        size = over.tile_size or info.get("tile_size")
        for what, v in (("mpp", mpp), ("tile_size", size)):
            if not v:
                raise ConfigError(f"model card: encoder {e!r} records no {what} (its training "
                                  f"bags did not carry one), so --slides cannot tile new "
                                  f"slides for it; {_fix(e, what)}")
        recorded = info.get("tiling")
        if not recorded:
            log.warning("predict: the model's card records no tiling recipe for %s (bags made "
                        "before fusedist recorded it, or by another tool): tiling with "
                        "fusedist's defaults (min_tissue %g); set encoders.%s.min_tissue if "
                        "its training bags used other settings", e, defaults["min_tissue"], e)
        recipe = {k: defaults[k] for k in TileConfig.SLIDE_RECIPE}
        recipe.update({k: v for k, v in (recorded or {}).items() if k in recipe})
        if recorded and "ink" not in recipe["tissue"]:
            # Bags tiled before fusedist removed pen ink kept it: tile new slides alike.
            recipe["tissue"] = {**recipe["tissue"], "ink": {"enabled": False}}
        recipe.update(tile_mpp=float(mpp), tile_size=int(size))
        if over.min_tissue is not None:
            recipe["min_tissue"] = over.min_tissue
        plans.append(_Plan(e, over.ref or info.get("ref") or e,
                           over.weights or info.get("weights"), recipe, False))
    return plans


def _check_encoders(plans: list[_Plan], card: dict, tracking_uri: str) -> dict:
    """Build each encoder once: it must be the card's (name, weights digest, input size).
    Returns them by name, for ``embed`` to use as they are (no second build)."""
    built = {}
    for p in plans:
        try:
            (enc,) = load_encoders([EncoderRef(name=p.ref, weights=p.weights)], tracking_uri)
        except ConfigError as err:
            raise ConfigError(f"model card: encoder {p.name!r} (built from {p.ref!r}): {err}; "
                              f"if it lives elsewhere now, {_fix(p.name, 'ref')}") from None
        if enc.spec.name != p.name:
            raise ConfigError(f"encoders.{p.name}: {p.ref!r} is encoder {enc.spec.name!r}, "
                              f"not the model's {p.name!r}; point it at {p.name!r}'s export "
                              "or registry name")
        want = (card["encoders"].get(p.name) or {}).get("weights_digest")
        if want and enc.weights_digest != want:
            raise ConfigError(f"encoder {p.name!r} ({p.ref}) has weights digest "
                              f"{enc.weights_digest} but the model was trained on {want}; "
                              f"give the model's weights with `--set encoders.{p.name}."
                              "weights=<file>`")
        if int(enc.spec.input_size) != p.recipe["tile_size"]:
            raise ConfigError(f"model card: encoder {p.name!r} was trained on "
                              f"{p.recipe['tile_size']} px tiles but takes "
                              f"{enc.spec.input_size} px inputs; {_fix(p.name, 'tile_size')}")
        p.mpp_mismatch = abs(float(enc.spec.mpp) - p.recipe["tile_mpp"]) > 1e-6
        built[p.name] = enc
    return built


def _dataset_name(recipe: dict) -> str:
    """Readable and unique per recipe: a tile dataset refuses another config."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return f"grid_{recipe['tile_size']}px_{recipe['tile_mpp']:g}um_{digest}"


def embed_slides(cfg: PredictConfig, card: dict, progress: bool = True) -> SlidesResult:
    """Tile ``cfg.slides`` once per tiling recipe and embed them with the card's encoders into
    ``<output>/bags``; returns where the bags are and the slides that failed, with why."""
    # Bad input (a duplicate id, a missing file) fails before any encoder is built.
    discover(TileConfig(input=cfg.slides, mode="grid", storage=cfg.storage))
    plans = plan_encoders(cfg, card)
    built = _check_encoders(plans, card, stage_tracking_uri(cfg.mlflow))
    groups: dict[str, list[_Plan]] = {}
    for p in plans:
        groups.setdefault(json.dumps(p.recipe, sort_keys=True), []).append(p)
    bags = storage.join(cfg.output, "bags")
    # Heatmaps draw over the tiling of the encoders whose tiles the model aligns.
    lead = next((p.name for p in plans if p.name in card.get("feature_group", [])),
                plans[0].name)
    result = SlidesResult(bags=bags, thumbnails=cfg.thumbnails)
    problems: dict[str, list[str]] = {}
    for key, group in groups.items():
        recipe = json.loads(key)
        names = [p.name for p in group]
        tiled = tile_grid(cfg.slides, storage.join(cfg.output, "tiles"), _dataset_name(recipe),
                          recipe, mpp_override=cfg.mpp_override, ray=cfg.ray,
                          storage=cfg.storage, progress=progress)
        if lead in names and result.thumbnails is None:
            result.thumbnails = tiled.dataset_url
        at = f"{recipe['tile_mpp']:g} µm/px, {recipe['tile_size']} px (for {', '.join(names)})"
        for s in tiled.manifest["slides"]:
            sid = s["slide_id"]
            if s["status"] == "skipped":
                continue  # another file of a DICOM series: that slide is the first file
            result.tiled.append(sid)
            if s["status"] == "failed":  # the same words from every recipe: said once
                problems.setdefault(sid, []).append(f"tiling failed [{s['code']}]: "
                                                    f"{s['reason']}")
            elif not s.get("shards"):
                problems.setdefault(sid, []).append(
                    f"no tile at {at} has tissue >= {recipe['min_tissue']:g} (a lower "
                    f"`--set encoders.{names[0]}.min_tissue=...` would tile it)")
        ecfg = EmbedConfig(tiles=tiled.dataset_url, output=bags,
                           encoders=[EncoderRef(name=p.ref, weights=p.weights) for p in group],
                           allow_mpp_mismatch=any(p.mpp_mismatch for p in group),
                           engine=cfg.engine, ray=cfg.ray, storage=cfg.storage,
                           mlflow=cfg.mlflow.model_copy(update={
                               "run_name": cfg.mlflow.run_name or "embed (predict --slides)"}))
        emb = run_embed(ecfg, progress=progress, built=[built[p.name] for p in group])
        log.info("%s", emb.summary())
        for f in emb.failed:
            problems.setdefault(f["slide_id"], []).append(f"embedding ({', '.join(names)}) "
                                                          f"failed: {f['reason']}")
    result.tiled = sorted(set(result.tiled))
    result.failed = {sid: "; ".join(dict.fromkeys(r)) for sid, r in sorted(problems.items())}
    return result
