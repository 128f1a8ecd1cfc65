"""``fusedist predict``: apply a fused model (``fuse``'s ``<output>/model/``) to new slides.

From ``--bags`` (fusedist, TRIDENT or CLAM layout, one folder per encoder the card names), or
from ``--slides``: tiled and embedded first as the card records (:mod:`.slides`), into
``<output>/tiles/`` and ``<output>/bags/``, then predicted exactly as ``--bags``.
Every slide is one unit: its result lands in ``<output>/_state/<slide>.json`` as soon as it
is predicted, so a re-run skips finished slides and gives the same ``predictions.csv``. A slide
that fails (a missing or unreadable bag, a bag of other weights) is recorded in
``manifest.json`` with the reason; the rest proceed (exit 1). Bags whose encoder weights
digest differs from the card's are refused, naming the encoder and the fix.

Output::

    predictions.csv   slide_id, method, the task's prediction columns, the predicted label
                      (classification), LogitProd's per-expert weights (weight_<encoder>)
    heatmaps/         attention of each expert component over the slide (thumbnail if given)
    summary.md        counts, failures, the model card's CV metrics
    manifest.json     the model, every slide's status
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from fusedist import mlmodels, storage
from fusedist.formats.bags import BagError, list_bags, read_bag
from fusedist.config import ConfigError
from fusedist.formats.slide_ids import encode_id
from fusedist.formats.slide_table import is_slide_table, patients, read_slide_table
from fusedist.fusion import report as rp
from fusedist.fusion.data import tile_extent
from fusedist.fusion.methods.experts import HeadFitted
from fusedist.fusion.model import (CARD, SlideError, is_patient_model, load_model,
                                   prediction_columns, weight_experts)
from fusedist.fusion.units import no_shared_ids
from fusedist.predict.config import PredictConfig
from fusedist.predict.slides import embed_slides
from fusedist.state import StageState

log = logging.getLogger("fusedist")


# --------------------------------------------------------------------------- inputs

def _check_digest(card: dict, enc: str, bag, url: str) -> None:
    want = (card["encoders"].get(enc) or {}).get("weights_digest")
    got = bag.attrs.get("weights_digest")
    if want and got != want:
        raise SlideError(f"{url}: encoder {enc!r} weights digest {got} differs from the "
                         f"model's {want}; re-embed this slide with the encoder the model "
                         f"was trained on (`fusedist embed -e {enc}` with its weights), or "
                         "use a model fused on these bags")


def _check_weights(card: dict, todo: dict[str, dict[str, str]]) -> None:
    """Refuse the run (ConfigError) when an encoder's bags come from other weights than the
    model's: checked on each encoder's first bag, before any slide is predicted."""
    for e in card["encoders"]:
        url = next((u[e] for u in todo.values() if u.get(e)), None)
        if url is None:
            continue
        try:
            _check_digest(card, e, read_bag(url), url)
        except SlideError as err:
            raise ConfigError(str(err)) from None
        except (BagError, OSError, ValueError):
            continue  # that slide fails on its own below; the others may be fine


# ---------------------------------------------------------------------------- output

def _row(card: dict, pred: np.ndarray) -> list[object]:
    if card["task"] == "survival":
        return [f"{float(pred):.6g}"]
    if card["task"] == "regression":
        return [f"{v:.6g}" for v in pred]
    classes = card["targets"]["classes"]
    ok = np.isfinite(pred).all()
    return [f"{v:.6g}" for v in pred] + [classes[int(np.argmax(pred))] if ok else ""]


def _read_slide(card: dict, slide_id: str, urls: dict[str, str]) -> dict:
    bags = {}
    for e, url in urls.items():
        try:
            bags[e] = read_bag(url, slide_id)
        except (BagError, OSError, ValueError) as err:
            raise SlideError(f"{err} (re-run `fusedist embed -e {e}` for this slide)") from None
        _check_digest(card, e, bags[e], url)
    return bags


def predict_slide(model, card: dict, slide_id: str, urls: dict[str, str], device) -> dict:
    """Every component's prediction for one slide (JSON-able), and attention for heatmaps."""
    return predict_unit(model, card, slide_id, {slide_id: urls}, device)


def predict_unit(model, card: dict, unit_id: str, slides: dict[str, dict[str, str]], device,
                 patient: bool = False) -> dict:
    """Every component's prediction for one unit: a slide, or (``patient``) a patient whose
    slides (``slides``: slide -> encoder -> bag URL, pooled in slide-id order) are one
    sample, as in a ``unit: patient`` fuse run (``FusedModel.predict_unit``)."""
    per_slide = {s: _read_slide(card, s, slides[s])
                 for s in (sorted(slides) if patient else slides)}
    p = model.predict_unit(per_slide, unit_id, slides, device, patient)
    x, pooled = p.inputs, p.pooled
    bags = pooled.bags
    out = {"slide_id": ";".join(p.slides), "methods": {}, "attention": {}}
    if patient:
        out["patient_id"] = unit_id
    for name, (pred, weights) in p.methods.items():
        rec = {"pred": pred.tolist()}
        if weights is not None:
            rec["weights"] = weights.tolist()
        out["methods"][name] = rec
    if x.attention_for:
        for e, f in _experts(model).items():
            attn = f.predict(x, device).attention
            if attn:
                out["attention"][e] = {"coords": bags[e].coords.tolist(),
                                       "attention": attn[0].tolist(),
                                       "extent": tile_extent(bags[e])}
                if patient:  # to draw each slide on its own (coords repeat across slides)
                    out["attention"][e]["slides"] = [[s, n] for s, n in
                                                     zip(p.slides, pooled.sizes[e])]
    return out


def _experts(model) -> dict:
    """Encoder -> the single-encoder bag heads inside the model's components (their
    attention is what the heatmaps show)."""
    found = {}

    def visit(f) -> None:
        if isinstance(f, HeadFitted):
            if f.view == "bags" and len(f.encoders()) == 1:
                found.setdefault(f.encoders()[0], f)
            return
        for attr in ("expert", "experts"):
            sub = getattr(f, attr, None)
            for g in (sub.values() if isinstance(sub, dict) else [sub] if sub else []):
                visit(g)

    for f in model.components.values():
        visit(f)
    return found


def _predictions_csv(card: dict, results: list[dict]) -> str:
    experts = weight_experts(card)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    patient = is_patient_model(card)  # one row per patient, its slides joined by ;
    w.writerow(prediction_columns(card))
    for r in results:
        for name in card["methods"]:
            rec = r["methods"][name]
            weights = [f"{v:.6g}" for v in rec["weights"]] if "weights" in rec else \
                [""] * len(experts)
            w.writerow(([r["patient_id"]] if patient else []) + [r["slide_id"], name]
                       + _row(card, np.asarray(rec["pred"])) + weights)
    return buf.getvalue()


# ------------------------------------------------------------------------------- run

def _card_url(folder: str) -> str:
    """The model's card, a ConfigError naming the fix when there is none."""
    card_url = storage.join(folder, CARD)
    if not storage.exists(card_url):
        raise ConfigError(f"model: {card_url} does not exist; point `--model` at a fuse "
                          "output's model/ folder (written when final.enabled is true) "
                          "or at a registered one, models:/<name>@<alias>")
    return card_url


def check(cfg: PredictConfig) -> None:
    """The inputs ``run_predict`` would refuse first, checked before torch and Ray load: a
    model folder without a card, a patient-unit model without the slide table that groups the
    slides (a registered model is checked when it is downloaded)."""
    storage.configure(cfg.storage)
    if mlmodels.is_registry_uri(cfg.model):
        return
    card = json.loads(storage.read_text(_card_url(cfg.model)))
    if is_patient_model(card):
        _patient_table(cfg)


def _model_digest(card_text: str) -> str:
    return hashlib.sha256(card_text.encode()).hexdigest()


def _targets(cfg: PredictConfig, card: dict, failed: dict[str, str] | None = None
             ) -> dict[str, dict[str, str]]:
    """slide_id -> encoder -> bag URL, for the slides to predict (minus ``failed``: slides
    ``--slides`` could not tile or embed)."""
    index = {}
    for e in card["encoders"]:
        folder = storage.join(cfg.bags, e)
        try:
            urls = list_bags(folder)
        except FileNotFoundError:
            urls = {}
        if not urls and failed is None:
            raise ConfigError(f"bags: no bags for encoder {e!r} under {folder}; the model "
                              f"needs every encoder it names ({sorted(card['encoders'])}): run "
                              f"`fusedist embed -e {e}` on these slides")
        index[e] = urls
    slides = cfg.slide_ids or sorted(set().union(*(set(v) for v in index.values())))
    return {s: {e: index[e].get(s) for e in index} for s in slides if s not in (failed or {})}


def run_predict(cfg: PredictConfig, progress: bool = True) -> dict:
    """Predict every slide; returns the manifest (``failed`` lists the slides that failed)
    and the model's ``unit`` (``patient``: ``predicted`` lists patients)."""
    from tqdm import tqdm

    # lazy: fusion.train imports torch
    from fusedist.fusion.training import pick_device

    storage.configure(cfg.storage)
    with _model_folder(cfg) as (folder, source):
        card_url = _card_url(folder)
        card_text = storage.read_text(card_url)
        model = load_model(folder)
    card = model.card
    digest = _model_digest(card_text)
    device = pick_device(cfg.device)
    results, failed = [], []
    early = None
    if is_patient_model(card):
        _patient_table(cfg)  # before any tiling: a patient model needs the patients
    if cfg.slides:
        made = embed_slides(cfg, card, progress)
        # Only the slides of this folder: <output>/bags may hold others from an earlier run.
        cfg = cfg.model_copy(update={"bags": made.bags, "thumbnails": made.thumbnails,
                                     "slide_ids": cfg.slide_ids or made.tiled})
        early = {s: r for s, r in made.failed.items() if not cfg.slide_ids or s in cfg.slide_ids}
        failed += [{"slide_id": s, "reason": r} for s, r in early.items()]
        for s, r in early.items():
            log.warning("predict: %s failed: %s", s, r)
    todo = _targets(cfg, card, early)
    _check_weights(card, todo)
    patient = is_patient_model(card)
    units = _units(cfg, todo, failed) if patient else {s: {s: todo[s]} for s in todo}
    state = StageState(cfg.output)
    finished = state.read_many(units)
    what = "patient" if patient else "slide"
    for uid in tqdm(sorted(units), desc="predict", unit=what, disable=not progress):
        done = finished.get(uid)
        if done is not None and done.get("model") == digest and \
                done.get("slide_id") == ";".join(sorted(units[uid]) if patient else [uid]):
            results.append(done)
            continue
        try:
            usable = _usable(units[uid], failed, patient)
            r = predict_unit(model, card, uid, usable, device, patient)
        except SlideError as err:
            failed.append({"slide_id": ";".join(units[uid]), "reason": str(err),
                           **({"patient_id": uid} if patient else {})})
            log.warning("predict: %s failed: %s", uid, err)
            continue
        r["model"] = digest
        state.write(uid, r)
        results.append(r)
    _write(cfg, card, results, failed, source)
    return {"predicted": [r.get("patient_id") or r["slide_id"] for r in results],
            "failed": failed, "unit": card.get("unit", "slide"),
            "output": cfg.output, "model": source}


def _usable(slides: dict[str, dict[str, str | None]], failed: list[dict], patient: bool
            ) -> dict[str, dict[str, str]]:
    """The unit's slides with a bag for every encoder; a patient's other slides are recorded
    in ``failed`` and left out of its pool (as ``fuse`` leaves them out)."""
    ok = {}
    for s, urls in slides.items():
        missing = [e for e, u in urls.items() if u is None]
        if not missing:
            ok[s] = urls
            continue
        why = (f"no bag for encoder(s) {missing}; run `fusedist embed` for this slide with "
               "them")
        if not patient:
            raise SlideError(why)
        failed.append({"slide_id": s, "reason": why + " (left out of its patient's pool)"})
    if not ok:
        raise SlideError("none of the patient's slides has a bag for every encoder")
    return ok


def _patient_table(cfg: PredictConfig) -> str:
    """The slide table that groups slides into patients (``patients``, else ``slides`` when
    it is a table); a ConfigError when there is none."""
    table = cfg.patients or (cfg.slides if cfg.slides and is_slide_table(cfg.slides) else None)
    if table is None:
        raise ConfigError("model: it was fused with unit: patient (its card), so it predicts "
                          "patients: give `patients:` (--patients) a slide table (slide_id, "
                          "patient_id) grouping these slides into patients")
    return table


def _units(cfg: PredictConfig, todo: dict[str, dict[str, str]], failed: list[dict]
           ) -> dict[str, dict[str, dict[str, str]]]:
    """patient -> slide -> encoder -> bag URL, from the slide table that groups the slides
    (a patient-unit model predicts patients); slides it does not list are recorded failed."""
    table = _patient_table(cfg)
    of = patients(read_slide_table(table))
    if todo and not set(todo) & set(of):
        raise ConfigError(no_shared_ids(sorted(todo), sorted(of), "slide_id", "the bags",
                                        f"the slide table {table}"))
    units: dict[str, dict[str, dict[str, str]]] = {}
    for s in sorted(todo):
        if s not in of:
            failed.append({"slide_id": s, "reason": f"not in the slide table {table}, so its "
                           "patient is unknown; add a row (slide_id, patient_id)"})
            continue
        units.setdefault(of[s], {})[s] = todo[s]
    return units


@contextlib.contextmanager
def _model_folder(cfg: PredictConfig) -> Iterator[tuple[str, str]]:
    """(folder holding card.json + components, what it is): the folder itself, or a
    ``models:/`` model downloaded from the registry (removed after loading)."""
    if not mlmodels.is_registry_uri(cfg.model):
        yield cfg.model, cfg.model
        return
    with tempfile.TemporaryDirectory(prefix="fusedist-predict-model-") as tmp:
        try:
            path, r = mlmodels.download(cfg.model, tmp, cfg.tracking_uri, artifact="model")
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        log.info("predict: %s is %s", cfg.model, r.model_uri)
        yield str(path), r.model_uri


def _heatmap_slides(r: dict, a: dict):
    """(slide, coords, attention) per slide of a result: a patient's pooled attention is
    split back per slide (``slides``: each slide's tile count, in pooling order)."""
    xy, attn = np.array(a["coords"]), np.array(a["attention"])
    if "slides" not in a:
        yield r["slide_id"], xy, attn
        return
    lo = 0
    for sid, n in a["slides"]:
        yield sid, xy[lo:lo + n], attn[lo:lo + n]
        lo += n


def _write(cfg: PredictConfig, card: dict, results: list[dict], failed: list[dict],
           source: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fusedist-predict-") as tmp:
        out = Path(tmp)
        (out / "predictions.csv").write_text(_predictions_csv(card, results))
        if cfg.heatmaps:
            for r in results:
                for e, a in r["attention"].items():
                    for sid, xy, attn in _heatmap_slides(r, a):
                        thumb, size = rp.slide_thumbnail(cfg, sid)
                        rp.plot_attention_heatmap(xy, attn, a["extent"], out / "heatmaps" /
                                                  f"{e}_{encode_id(sid)}.png", thumbnail=thumb,
                                                  slide_size=size,
                                                  title=f"{e} attention, {sid}")
        # model_version: what a models:/...@alias meant for this run (the alias can move).
        manifest = {"model": cfg.model, "model_version": source, "bags": cfg.bags,
                    "slides": cfg.slides, "task": card["task"], "methods": card["methods"],
                    "predicted": [r.get("patient_id") or r["slide_id"] for r in results],
                    "failed": failed}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        lines = ["# fusedist predict\n", f"Model `{cfg.model}` ({card['task']}, methods "
                 f"{', '.join(card['methods'])}); {len(results)} "
                 f"{'patient' if is_patient_model(card) else 'slide'}(s) predicted, "
                 f"{len(failed)} failed.\n"]
        for m, s in (card.get("cv_metrics") or {}).items():
            lines.append(f"- CV {m}: " + ", ".join(f"{k} {v[0]:.3f} ± {v[1]:.3f}"
                                                   for k, v in s.items()))
        lines += [f"- failed {f['slide_id']}: {f['reason']}" for f in failed]
        (out / "summary.md").write_text("\n".join(lines) + "\n")
        for p in sorted(out.rglob("*")):
            if p.is_file():
                storage.upload_file(p, storage.join(cfg.output, p.relative_to(out).as_posix()))
