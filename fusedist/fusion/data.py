"""The cohort ``fusedist fuse`` works on: labels joined with every encoder's bags, checked.

Bad input never silently changes a result. A problem that concerns the whole run (a missing
column, a class too small for the folds, encoders without any slide in common) is a
``ConfigError`` that names the file and the fix. A problem with one slide (no bag for one
encoder, a label row without bags, an empty label, NaN features) excludes that slide, and
the exclusion and its reason go to the manifest and the report.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fusedist import storage
from fusedist.formats.bags import Bag, BagError, encoder_folders, list_bags, read_bag
from fusedist.config import ConfigError
from fusedist.fusion.cohort import Cohort
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.store import FOLDER, Packer, Picked
from fusedist.fusion.tasks import TASKS, Task, class_order, get_task, need_columns
from fusedist.fusion.units import (Unit, label_key, no_shared_ids, patient_units, pool_bags,
                                   resolve_unit, slide_patients)
from fusedist.tracking import random_weights_line

log = logging.getLogger("fusedist")


# ------------------------------------------------------------------------------- labels

def read_labels(url: str) -> tuple[list[dict[str, str]], list[str]]:
    """Rows and columns of a labels CSV keyed by ``slide_id`` (or, with no such column, by
    ``patient_id``: a clinical table); a missing file, key column or a repeated key is a
    ConfigError."""
    try:
        text = storage.read_text(url)
    except FileNotFoundError:
        raise ConfigError(f"labels: {url} does not exist; point `labels` at a CSV with a "
                          "slide_id column (fusedist synth writes one: labels.csv)") from None
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    key = label_key(url, cols)
    what = "slide" if key == "slide_id" else "patient"
    seen: dict[str, int] = {}
    for i, r in enumerate(rows, start=2):
        sid = r[key]
        if not sid:
            raise ConfigError(f"labels: {url}, line {i}: empty {key}; every row needs one")
        if sid in seen:
            raise ConfigError(f"labels: {url} lists {what} {sid!r} twice (lines {seen[sid]} "
                              f"and {i}); keep one row per {what}")
        seen[sid] = i
    return rows, cols


def keyed_rows(rows: list[dict[str, str]], cols: list[str]) -> list[dict[str, str]]:
    """Rows whose ``slide_id`` is their key (tasks parse targets by ``slide_id``): a
    patient-keyed table's rows get their patient id there."""
    if "slide_id" in cols:
        return rows
    return [{**r, "slide_id": r["patient_id"]} for r in rows]


def parse_targets(cfg: FuseConfig, rows: list[dict[str, str]], cols: list[str]
                  ) -> tuple[dict[str, object], dict[str, str], list[str]]:
    """slide_id -> parsed target, slide_id -> why it has none, and the target names."""
    return get_task(cfg).parse(rows, cols)


# --------------------------------------------------------------------------------- bags

def _encoder_folders(root: str) -> dict[str, str]:
    try:
        return encoder_folders(root)
    except BagError as e:
        raise ConfigError(f"bags: {e}") from None


def discover_encoders(cfg: FuseConfig) -> list[str]:
    if cfg.encoders:
        return list(cfg.encoders)
    # TRIDENT job folders too: features_<encoder>/ named without the prefix, patches/ skipped.
    found = list(_encoder_folders(cfg.bags))
    if not found:
        raise ConfigError(f"bags: {cfg.bags} has no encoder folders; run `fusedist embed` "
                          "first or point `bags` at the folder holding <encoder>/<slide>.h5")
    return found


def encoder_folder(cfg: FuseConfig, encoder: str) -> str:
    """The bag folder of ``encoder`` under ``cfg.bags`` (``<encoder>/`` or TRIDENT's
    ``features_<encoder>/``)."""
    return _encoder_folders(cfg.bags).get(encoder) or storage.join(cfg.bags, encoder)


def bag_index(cfg: FuseConfig, encoders: list[str]) -> dict[str, dict[str, str]]:
    index = {}
    folders = _encoder_folders(cfg.bags)
    for e in encoders:
        folder = folders.get(e) or storage.join(cfg.bags, e)
        urls = list_bags(folder)
        if not urls:
            raise ConfigError(f"bags: no bags for encoder {e!r} under "
                              f"{folder}; fix `encoders` or run "
                              f"`fusedist embed -e {e}`")
        index[e] = urls
    return index


def _slide_bags(index: dict[str, dict[str, str]], s: str
                ) -> tuple[dict[str, Bag] | None, str | None]:
    """One slide's bag of every encoder, or why the slide is unusable (a bad bag excludes it)."""
    bags = {}
    for e, urls in index.items():
        try:
            bag = read_bag(urls[s], s)
        except (BagError, OSError, ValueError) as err:
            return None, f"{err} (re-run `fusedist embed` for this slide)"
        if bag.features.shape[0] == 0:
            return None, f"{urls[s]}: empty bag (no tiles)"
        bags[e] = bag
    return bags, None


def _read_ahead(index: dict[str, dict[str, str]], slides: list[str], ahead: int = 8
                ) -> Iterator[tuple[str, dict[str, Bag] | None, str | None]]:
    """Each slide's bags in order, read in threads at most ``ahead`` slides in advance (so
    memory holds a few slides' bags, not the cohort's)."""
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: deque = deque()
        it = iter(slides)
        for s in it:
            pending.append((s, pool.submit(_slide_bags, index, s)))
            if len(pending) >= ahead:
                break
        while pending:
            s, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_slide_bags, index, nxt)))
            yield (s, *fut.result())


def _read_units(index: dict[str, dict[str, str]], units: list[Unit]
                ) -> Iterator[tuple[Unit, list[tuple[str, dict[str, Bag] | None, str | None]]]]:
    """Each unit with its slides' bags (or why not), read ahead slide by slide."""
    flat = _read_ahead(index, [s for u in units for s in u.slides])
    for u in units:
        yield u, [next(flat) for _ in u.slides]


def tile_extent(bag: Bag) -> float:
    v = bag.attrs.get("patch_size_level0")
    if v:
        return float(v)
    xs = np.unique(bag.coords[:, 0])
    steps = np.diff(xs)
    return float(steps[steps > 0].min()) if (steps > 0).any() else float(bag.tile_size or 224)


def _encoder_info(bag: Bag) -> dict:
    info = {"dim": bag.dim, "mpp": bag.mpp, "tile_size": bag.tile_size,
            "weights_digest": bag.attrs.get("weights_digest")}
    # How fusedist's embed made the bag (absent from TRIDENT/CLAM bags): the model card keeps
    # it, so `predict --slides` can build the encoder and tile new slides the same way.
    for key, attr in (("ref", "encoder_ref"), ("weights", "encoder_weights"),
                      ("tiling", "tiling")):
        if bag.attrs.get(attr) is not None:
            info[key] = bag.attrs[attr]
    return info


def feature_group(bags: dict[str, Bag], encoders: list[str]) -> list[str]:
    """The largest set of encoders that read the same tiles (same mpp and tile size), judged
    on one slide's ``bags``."""
    keys: dict[tuple, list[str]] = {}
    for e in encoders:
        b = bags[e]
        keys.setdefault((round(b.mpp or 0.0, 4), b.tile_size), []).append(e)
    return max(keys.values(), key=len)


def align_picks(bags: list[Bag]) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """The tiles every bag has (in the first bag's order) and, per bag, the rows of them
    (None: all of its rows, in order, which is the usual case)."""
    keys = [{(int(x), int(y)): i for i, (x, y) in enumerate(b.coords)} for b in bags]
    common = [xy for xy in keys[0] if all(xy in k for k in keys[1:])]
    coords = np.array(common, np.int64).reshape(-1, 2)
    picks = []
    for b, k in zip(bags, keys):
        rows = np.array([k[xy] for xy in common], np.int64)
        same = len(rows) == len(b.coords) and bool((rows == np.arange(len(rows))).all())
        picks.append(None if same else rows)
    return coords, picks


# ------------------------------------------------------------------------------- cohort

def _read_features(cfg: FuseConfig, index: dict[str, dict[str, str]], units: list[Unit],
                   exclusions: list[dict[str, str]], patient: bool = False) -> dict[str, Any]:
    """Read the units' bags one slide at a time, check them, pool each unit's slides
    (fusedist.fusion.units.pool_bags; a slide unit is its one slide) and keep their features
    as float32: in memory up to ``cfg.bags_in_memory_gb``, packed into memory-mapped files
    past it (fusedist.fusion.store), so memory never holds the whole cohort's bags at once.

    Returns the :class:`Cohort` fields the bags decide (``slide_ids`` are the units kept)."""
    encoders = list(index)
    packer: Packer | None = None
    dims: dict[str, int] = {}
    group: list[str] = []
    first: dict[str, Bag] = {}
    keep: list[str] = []
    members: list[list[str]] = []
    sizes: dict[str, list[list[int]]] = {e: [] for e in encoders}
    picks: dict[str, list[np.ndarray | None]] = {}
    random = set()

    def exclude(sid: str, reason: str, unit: Unit) -> None:
        exclusions.append({"slide_id": sid, "patient_id": unit.id, "reason": reason}
                          if patient else {"slide_id": sid, "reason": reason})

    try:
        for unit, read in _read_units(index, units):
            good = []
            for s, bags, why in read:
                if bags is None:
                    exclude(s, why, unit)
                    continue
                if packer is None:  # the first usable slide sets dims and the feature group
                    first = {e: Bag(**{**vars(b), "features": b.features[:0]})
                             for e, b in bags.items()}
                    dims = {e: int(b.features.shape[1]) for e, b in bags.items()}
                    group = feature_group(bags, encoders)
                    picks = {e: [] for e in group}
                    cols = {**{e: (d, "float32") for e, d in dims.items()},
                            **{f"{e}.coords": (2, "int64") for e in encoders},
                            "_aligned.coords": (2, "int64")}
                    packer = Packer(cols, storage.join(cfg.output, FOLDER),
                                    cfg.bags_in_memory_gb * 2**30)
                    first_slide = s
                for e in encoders:
                    if bags[e].features.shape[1] != dims[e]:
                        raise ConfigError(f"bags: {e}/{s} has {bags[e].features.shape[1]}-d "
                                          f"features but {e}/{first_slide} has {dims[e]}; "
                                          "one folder must hold one encoder's bags")
                good.append((s, bags))
            if not good:
                if patient:
                    exclude("", "no usable slide (each one's reason is listed)", unit)
                continue
            pooled = pool_bags([b for _, b in good], group, align_picks)
            if len(pooled.aligned_coords) == 0:
                exclude("" if patient else unit.id,
                        f"encoders {group} share no tile coordinates on this "
                        f"{'patient' if patient else 'slide'}", unit)
                continue
            keep.append(unit.id)
            members.append([s for s, _ in good])
            packer.add("_aligned.coords", pooled.aligned_coords)
            for e in encoders:
                packer.add(e, pooled.bags[e].features)
                packer.add(f"{e}.coords", pooled.bags[e].coords)
                sizes[e].append(pooled.sizes[e])
            for e, p in zip(group, pooled.picks):
                picks[e].append(p)
            random |= {b.encoder for _, bb in good for b in bb.values()
                       if b.attrs.get("random_weights") is True}
    except BaseException:
        if packer is not None:
            packer.abort()
        raise
    if not keep:
        what = "patient" if patient else "slide"
        raise ConfigError(f"no usable {what}s: every labelled {what} was excluded ("
                          + "; ".join(f"{x['slide_id'] or x['patient_id']}: {x['reason']}"
                                      for x in exclusions[:3]) + ")")
    packed = packer.finish()
    feats = {e: packed[e] for e in encoders}
    if packer.packed:
        log.info("fuse: %.2f GB of features > bags_in_memory_gb=%g: packed under %s and "
                 "read per slide", packer.nbytes / 2**30, cfg.bags_in_memory_gb,
                 storage.join(cfg.output, FOLDER))
    # Bags record their encoder's random_weights: say so in the report, manifest and summary.
    notes = [x for x in [random_weights_line(random)] if x]
    if len(group) < len(encoders):
        notes.append(f"feature-level fusion uses {group}: the other encoders read different "
                     "tiles (mpp or tile size), so only logit-level methods combine them all")
    return dict(
        slide_ids=keep, dims=dims, feature_group=group, bags=feats,
        coords={e: packed[f"{e}.coords"] for e in encoders},
        aligned={e: Picked(feats[e], picks[e]) for e in group},
        aligned_coords=packed["_aligned.coords"],
        tile_extent={e: tile_extent(first[e]) for e in encoders},
        encoder_info={e: _encoder_info(first[e]) for e in encoders}, notes=notes,
        **(dict(members=members, member_sizes=sizes) if patient else {}))


def load_cohort(cfg: FuseConfig) -> Cohort:
    """Join labels and bags, exclude bad slides with reasons, check what folds need."""
    rows, cols = read_labels(cfg.labels)
    key = "slide_id" if "slide_id" in cols else "patient_id"
    unit = resolve_unit(cfg, key)
    rows = keyed_rows(rows, cols)
    targets, bad_targets, target_names = parse_targets(cfg, rows, cols)
    encoders = discover_encoders(cfg)
    index = bag_index(cfg, encoders)
    exclusions: list[dict[str, str]] = []
    with_all = set.intersection(*(set(v) for v in index.values()))
    if not with_all:
        raise ConfigError(f"bags: no slide has a bag for every encoder {encoders} under "
                          f"{cfg.bags}; the encoders' slide ids do not match (e.g. "
                          + ", ".join(f"{e}: {next(iter(index[e]))!r}" for e in encoders)
                          + "); embed the same slides with each encoder, or limit `encoders`")
    if unit == "patient":
        def exclude(sid: str, reason: str, patient: str) -> None:
            exclusions.append({"slide_id": sid, "patient_id": patient, "reason": reason})

        units, targets = patient_units(cfg, rows, key, targets, bad_targets, with_all,
                                       exclude)
        pid = {u.id: u.id for u in units}
    else:
        units, pid = _slide_units(cfg, rows, index, bad_targets, with_all, exclusions)
    read = _read_features(cfg, {e: index[e] for e in encoders}, units, exclusions,
                          patient=unit == "patient")
    cohort = Cohort(task=cfg.task, patient_ids=[pid[s] for s in read["slide_ids"]],
                    encoders=list(encoders), exclusions=exclusions, target_names=target_names,
                    unit=unit, **read)
    task = get_task(cfg)
    task.set_targets(cohort, targets)
    if task.tile:
        _tile_samples(cohort, cfg)
    check_folds(cohort, cfg)
    if exclusions:
        x = exclusions[0]
        log.warning("fuse: %d slide(s) excluded (reasons in the manifest), e.g. %s: %s",
                    len(exclusions), x["slide_id"] or f"patient {x.get('patient_id')}",
                    x["reason"])
    return cohort


def _slide_units(cfg: FuseConfig, rows, index: dict[str, dict[str, str]],
                 bad_targets: dict[str, str], with_all: set[str],
                 exclusions: list[dict[str, str]]) -> tuple[list[Unit], dict[str, str]]:
    """One unit per labelled slide with a bag for every encoder (today's join), and each
    slide's patient (the labels' patient_id, else the slide table's, else the slide)."""
    def exclude(sid: str, reason: str) -> None:
        exclusions.append({"slide_id": sid, "reason": reason})

    encoders = list(index)
    labelled = [r["slide_id"] for r in rows]
    every = set().union(*(set(v) for v in index.values()))
    if not every & set(labelled):
        raise ConfigError(no_shared_ids(labelled, sorted(every), "slide_id",
                                        f"labels {cfg.labels}", f"the bags under {cfg.bags}"))
    slides = []
    for sid in labelled:
        if sid in bad_targets:
            exclude(sid, bad_targets[sid])
        elif sid not in with_all:
            missing = [e for e in encoders if sid not in index[e]]
            exclude(sid, f"labelled, but no bag for encoder(s) {missing}")
        else:
            slides.append(sid)
    for sid in sorted(with_all - set(labelled)):
        exclude(sid, f"has bags but no row in {cfg.labels}")
    partial = sorted(every - with_all - set(labelled))
    for sid in partial:
        exclude(sid, "bags for only some encoders: "
                + str([e for e in encoders if sid in index[e]]) + ", and no label row")
    table = slide_patients(cfg, [], "") if cfg.slides else {}
    pid = {r["slide_id"]: (r.get("patient_id") or table.get(r["slide_id"]) or r["slide_id"])
           for r in rows}
    return [Unit(s, pid[s], (s,)) for s in slides], pid


def _tile_labels(cfg: FuseConfig) -> dict[tuple[str, int, int], str] | None:
    if cfg.tile_labels is None:
        return None
    rows, cols = _plain_csv(cfg.tile_labels)
    need_columns(cfg.tile_labels, cols, ["slide_id", "x", "y", "label"], "tile_labels")
    return {(r["slide_id"], int(float(r["x"])), int(float(r["y"]))): r["label"] for r in rows}


def _plain_csv(url: str) -> tuple[list[dict[str, str]], list[str]]:
    reader = csv.DictReader(io.StringIO(storage.read_text(url)))
    return [dict(r) for r in reader], list(reader.fieldnames or [])


def _tile_samples(c: Cohort, cfg: FuseConfig) -> None:
    """Sample tiles per slide (seeded); tiles take their own label or their slide's."""
    c.encoders = list(c.feature_group)
    c.dims = {e: c.dims[e] for e in c.encoders}
    labels = _tile_labels(cfg)
    slide_label = [c.classes[i] for i in c.y]
    ss, si, ys = [], [], []
    for i, s in enumerate(c.slide_ids):
        n = len(c.aligned_coords[i])
        rng = np.random.default_rng([cfg.seed, 0x711E, i])
        pick = np.sort(rng.permutation(n)[: cfg.tiles_per_slide])
        for j in pick:
            x, y = (int(v) for v in c.aligned_coords[i][j])
            lab = slide_label[i] if labels is None else labels.get((s, x, y))
            if lab is None:
                continue
            ss.append(i), si.append(int(j)), ys.append(str(lab))
    if not ss:
        raise ConfigError(f"tile_labels: {cfg.tile_labels} labels none of the sampled tiles; "
                          "its x, y must be the level-0 coords of the bags' tiles")
    c.classes = class_order(ys)
    c.y = np.array([c.classes.index(v) for v in ys], np.int64)
    c.sample_slide, c.sample_index = np.array(ss, np.int64), np.array(si, np.int64)


# -------------------------------------------------------------------------------- folds

def check_folds(c: Cohort, cfg: FuseConfig) -> None:
    """Enough patients for the folds, and whatever else the task needs (classes in every
    outer and inner fold)."""
    n_pat = len(set(c.sample_groups))
    if n_pat < cfg.folds:
        raise ConfigError(f"{n_pat} patients for folds={cfg.folds}; lower `folds` or add slides")
    get_task(cfg).check(c)


def make_folds(c: Cohort, idx: np.ndarray, k: int, seed: int, task: Task | None = None
               ) -> np.ndarray:
    """Fold id (0..k-1) of each sample in ``idx``: stratified (on what ``task`` says: the
    class, the event, or nothing), grouped by patient, seeded."""
    task = task or TASKS[c.task](None)
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.array(c.sample_groups)[idx]
    y = task.strata(c, idx)
    out = np.full(len(idx), -1, np.int64)
    with warnings.catch_warnings():
        # sklearn warns when a stratum has fewer members than folds; check_folds already
        # guarantees what matters (every class in every fold where it can be).
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for f, (_, test) in enumerate(splitter.split(np.zeros(len(idx)), y, groups)):
            out[test] = f
    return out


def restrict_training(c: Cohort, cfg: FuseConfig, train: np.ndarray) -> np.ndarray:
    """``train`` (sample indices) limited to the samples of ``cfg.train_slides``; as is when
    that is unset. Test folds never pass through here: they stay every labelled slide's."""
    if cfg.train_slides is None:
        return train
    keep = set(cfg.train_slides)
    slide_of = (np.arange(len(c.slide_ids)) if c.sample_slide is None else c.sample_slide)
    # A patient unit trains when one of its slides (or its id) is listed.
    unit_ok = [bool(keep & {c.slide_ids[i], *c.unit_slides(i)}) for i in range(len(c.slide_ids))]
    allowed = np.array([unit_ok[i] for i in slide_of], bool)
    out = train[allowed[train]]
    if len(out) == 0:
        raise ConfigError(f"train_slides: none of its {len(keep)} slide(s) is among this "
                          "fold's training slides of the cohort (labelled, with bags); check "
                          "the slide ids against the labels CSV")
    return out
