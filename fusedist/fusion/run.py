"""``fusedist fuse``: load the cohort, run the outer folds as tasks (resumable; Ray tasks on a
cluster, else local processes: ``executor``), then score, tabulate, plot and log every method.

Output folder::

    manifest.json        config digest, slides used, exclusions and reasons, folds, notes
    folds.csv            slide_id, patient_id, fold (unit: patient: one row per patient,
                         slide_id its slides joined by ";")
    predictions.csv      out-of-fold predictions of every method (one row per sample)
    metrics_per_fold.csv method, fold, metric, value
    results.md / .csv    the comparison table (mean ± std over folds, cost)
    plots/*.png          ROC / Kaplan–Meier / regression, per-fold bars, attention heatmaps
    report.md            the table, the plots and the notes
    _state/              finished folds and refit (a re-run skips them) and the digest that
                         guards them
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from fusedist import storage
from fusedist.config import ConfigError, config_digest
from fusedist.execution.rayrun import RayTasks
from fusedist.execution.sharedfs import alive_nodes, is_shared
from fusedist.execution.local import LocalTasks
from fusedist.execution.tasks import Tasks, local_reason, open_tasks
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import Cohort, encoder_folder, load_cohort, make_folds
from fusedist.fusion.store import Rows, feature_sums, is_packed, remove_packed
from fusedist.fusion.evaluate import FuseResult, evaluate
from fusedist.fusion.fold import FoldResult, prepare_methods, refit_epochs, run_fold, select_methods
from fusedist.fusion.model import (CARD, final_methods, model_files, refit, spread_checks,
                                   write_model)
from fusedist.lineage import bags_ref, labels_ref
from fusedist.mlmodels import digest_files
from fusedist.state import StageState
from fusedist.tracking import start_run

log = logging.getLogger("fusedist")


# ------------------------------------------------------------------------------ state

def _fingerprint(c: Cohort) -> str:
    """Changes when the data that reaches the models changes (cheap: shapes and sums)."""
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps([c.slide_ids, c.patient_ids, c.encoders, c.classes,
                         c.target_names]).encode())
    if c.members is not None:  # patient units: which slides were pooled, too
        h.update(json.dumps(c.members).encode())
    for arr in (c.y, c.time, c.event, c.sample_slide, c.sample_index):
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    for e in c.encoders:
        rows = [f.shape[0] for f in c.bags[e]] if not isinstance(c.bags[e], Rows) else \
            np.diff(c.bags[e].offsets)  # packed: no need to read the features back
        h.update(np.column_stack([np.asarray(rows, np.float64),
                                  feature_sums(c.bags[e])]).tobytes())
    return h.hexdigest()


def _fold_name(f: int) -> str:
    return f"fold-{f:02d}"


def _encode(r: FoldResult) -> dict:
    def arr(a):
        return {"shape": list(np.shape(a)), "data": np.asarray(a, np.float64).ravel().tolist()}

    return {
        "fold": r.fold, "test_idx": r.test_idx.tolist(),
        "preds": {m: arr(p) for m, p in r.preds.items()}, "costs": r.costs, "notes": r.notes,
        "objectives": r.objectives, "gate_weights": r.gate_weights,
        "attention": {m: {str(i): a.tolist() for i, a in d.items()}
                      for m, d in r.attention.items()}, "chosen": r.chosen,
        "best_epochs": r.best_epochs}


def _decode(d: dict) -> FoldResult:
    return FoldResult(
        fold=d["fold"], test_idx=np.array(d["test_idx"], np.int64),
        preds={m: np.array(p["data"], np.float32).reshape(p["shape"])
               for m, p in d["preds"].items()},
        costs=d["costs"], notes=d["notes"], objectives=d["objectives"],
        gate_weights=d["gate_weights"],
        attention={m: {int(i): np.array(a, np.float32) for i, a in v.items()}
                   for m, v in d["attention"].items()}, chosen=d.get("chosen", {}),
        best_epochs=d.get("best_epochs", {}))


# ------------------------------------------------------------------------------- run

# A cohort this small trains its folds in less time than local processes take to start and
# import torch (seconds): its folds run one after the other in this process.
INLINE_SAMPLES = 200


def _fold_tasks(cfg: FuseConfig, folds: int, samples: int) -> Tasks:
    """Ray tasks on a cluster or a Ray this process runs; else local processes, one per
    ``fold_cpus`` cores and at most one per fold, or this process (one core, or a cohort of
    at most ``INLINE_SAMPLES`` samples). Every fold sets its torch threads to ``fold_cpus``
    (``fold_context``), so the results do not depend on where it ran."""
    # torch (seconds): once, in the forkserver. The folds train without torch._dynamo
    # (training.eager_optim), so it is not loaded there.
    return open_tasks(cfg.executor, cfg.ray, "fuse folds", cpus=cfg.fold_cpus,
                      gpus=cfg.fold_gpus, preload=("fusedist.fusion.fold",
                                                   "fusedist.fusion.training"),
                      most=folds, inline=samples <= INLINE_SAMPLES)


def _warm_local_tasks(cfg: FuseConfig, c: Cohort) -> LocalTasks | None:
    """A local pool for the folds, its processes started (and their imports under way) while
    this process prepares the methods; None on Ray or in this process."""
    if local_reason(cfg.executor, cfg.ray) is None:
        return None
    tasks = _fold_tasks(cfg, cfg.folds, c.num_samples)
    if not isinstance(tasks, LocalTasks) or tasks.inline:
        return None
    tasks.warm()
    return tasks


def _run_folds(c: Cohort, cfg: FuseConfig, fold_ids: np.ndarray, heat: list[int],
               methods: list, prepared: dict, progress: bool,
               warm: LocalTasks | None = None) -> tuple[list[FoldResult], int]:
    state = StageState(cfg.output)
    entries = state.read_many(_fold_name(f) for f in range(cfg.folds))
    done = {f: _decode(entries[_fold_name(f)]) for f in range(cfg.folds)
            if _fold_name(f) in entries}
    todo = [f for f in range(cfg.folds) if f not in done]
    if todo:
        with warm or _fold_tasks(cfg, len(todo), c.num_samples) as tasks, \
                _torch_threads_kept():
            if isinstance(tasks, RayTasks):
                _check_packed_reachable(c, cfg)
            on_ray = isinstance(tasks, RayTasks)
            remote = tasks.function(run_fold if on_ray else _run_fold_local, max_retries=1,
                                    describe=lambda args: _fold_name(args[3]))
            c_ref = tasks.put(c)
            fold_cfg = _fold_config(cfg, on_ray)
            refs = [remote.remote(c_ref, fold_cfg, fold_ids, f, heat, methods, prepared)
                    for f in todo]

            def save(r: FoldResult) -> None:  # each fold lands atomically as it finishes
                state.write(_fold_name(r.fold), _encode(r))
                done[r.fold] = r

            tasks.run(refs, save, desc="fuse folds", unit="fold", progress=progress)
    return [done[f] for f in range(cfg.folds)], len(done) - len(todo)


def _run_fold_local(c: Cohort, cfg: FuseConfig, *args) -> FoldResult:
    """:func:`run_fold` as a local task runs it: with the BLAS/OpenMP threads a Ray task of
    ``fold_cpus`` CPUs gets (Ray sets ``OMP_NUM_THREADS`` for it; torch's own threads are set
    by ``fold_context`` either way), so numpy's sums come out the same."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(max(1, int(cfg.fold_cpus))):
        return run_fold(c, cfg, *args)


def _fold_config(cfg: FuseConfig, on_ray: bool) -> FuseConfig:
    """The config a fold runs with. Ray hides the GPUs from a task that asks for none
    (``CUDA_VISIBLE_DEVICES=""``), so ``device: auto`` with ``fold_gpus: 0`` trains a fold on
    the CPU there: a local fold does the same, whatever GPU this machine has (``device`` is
    run-only: no output names it)."""
    if on_ray or cfg.fold_gpus > 0 or cfg.device != "auto":
        return cfg
    return cfg.model_copy(update={"device": "cpu"})


@contextmanager
def _torch_threads_kept():
    """A fold run in this process sets torch's threads to ``fold_cpus``: restore them after
    the folds, so what runs next (the refit) runs as it does after folds on Ray."""
    import sys

    torch = sys.modules.get("torch")  # never import torch just to read its setting
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and threads is not None:
            torch.set_num_threads(threads)


def _check_packed_reachable(c: Cohort, cfg: FuseConfig) -> None:
    """Packed features on a node-local disk cannot reach fold tasks on other nodes: fail
    before any fold runs, with the fix."""
    if not is_packed(c.columns()) or is_shared(cfg.output):
        return
    if (nodes := alive_nodes()) > 1:
        raise ConfigError(
            f"output: {cfg.output} is a local folder but this Ray cluster has {nodes} nodes, "
            f"and the cohort's features were packed there (more than bags_in_memory_gb="
            f"{cfg.bags_in_memory_gb:g}): fold tasks on other nodes could not read them. Put "
            "output on S3 (--set output=s3://bucket/fuse) or a shared filesystem, or raise "
            "bags_in_memory_gb")


def lineage_inputs(cfg: FuseConfig, encoders: list[str]) -> list:
    """What a fuse reads, as MLflow datasets (:mod:`fusedist.lineage`): the labels and the
    bag folder of each encoder."""
    return [labels_ref(cfg.labels), *(bags_ref(encoder_folder(cfg, e), e) for e in encoders)]


FINAL = "final"  # the state entry of a finished refit: a re-run keeps its model folder


def _final_entry(names: list[str], cv: dict) -> dict:
    """What a refit depends on beyond the state's guard digest (``final`` is run-only there):
    the rows refitted and the CV metrics the card records."""
    import hashlib

    return {"methods": names, "cv_sha256": hashlib.sha256(
        json.dumps(cv, sort_keys=True, default=float).encode()).hexdigest()}


def _refit_done(url: str, entry: dict, done: dict | None) -> bool:
    """Whether the model folder ``url`` is the one the recorded refit ``done`` wrote for
    ``entry`` (files read back and digested: a folder changed or damaged since is refitted)."""
    if not done or {k: done.get(k) for k in entry} != entry:
        return False
    try:
        return digest_files(model_files(url).items()) == done.get("files_sha256")
    except (OSError, ValueError, KeyError):  # missing or unreadable: refit
        return False


def _write_final(c: Cohort, cfg: FuseConfig, methods: list, prepared: dict,
                 res: FuseResult, results: list[FoldResult], run) -> None:
    """Refit ``final.methods`` on every labelled sample (``select_best`` heads for the folds'
    median best epoch), check that its outputs vary over those samples, write
    ``<output>/model/``, log it on the run as a pyfunc model (registered with
    ``final.registered_model``) and record where in ``res`` and the manifest. A refit that
    finished for these rows, epochs and CV results is skipped like a finished fold
    (``_state/final.json``)."""
    rows = final_methods(cfg, methods, res.best())
    cv = {m: {k: list(v) for k, v in s.items()} for m, s in res.summary.items()}
    epochs = refit_epochs([r.best_epochs for r in results])
    url, state = storage.join(cfg.output, "model"), StageState(cfg.output)
    entry = {**_final_entry([m.name for m in rows], {m.name: cv.get(m.name) for m in rows}),
             "epochs": json.loads(json.dumps(epochs))}
    if _refit_done(url, entry, state.read(FINAL)):
        res.model, res.final_resumed, fitted = url, True, entry["methods"]
        refit_info = json.loads(model_files(url)[CARD]).get("refit") or {}
        res.flat = {m: refit_info["checks"][m]["reason"] for m in refit_info.get("flat", [])}
        log.info("fuse: fused model (%s) kept from an earlier run: %s", ", ".join(fitted), url)
    else:
        models = refit(c, cfg, rows, prepared, epochs)
        checks = spread_checks(c, cfg, models, prepared)
        res.flat = {m: ch["reason"] for m, ch in checks.items() if ch["flat"]}
        res.model = write_model(url, c, cfg, models, cv,
                                {"epochs": epochs, "checks": checks, "flat": sorted(res.flat)})
        fitted = list(models)
        state.write(FINAL, {**entry, "files_sha256": digest_files(model_files(url).items())})
        log.info("fuse: fused model (%s) in %s", ", ".join(fitted), res.model)
    for m, why in res.flat.items():
        log.warning("fuse: FLAT REFIT %s: %s", m, why)
    res.mlflow_model = None
    if run.active:  # an inactive run logs nothing: MLflow is not even imported
        # lazy: keeps MLflow out of a fuse that tracks nothing
        from fusedist.fusion.pyfunc import log_fused_model

        res.mlflow_model = log_fused_model(run, res.model, cfg.final.registered_model,
                                           cfg.final.alias)
    # The manifest was written with the CV outputs; the model comes after them.
    murl = storage.join(cfg.output, "manifest.json")
    manifest = json.loads(storage.read_text(murl))
    manifest["model"] = {"folder": res.model, "methods": list(fitted),
                         **(res.mlflow_model or {})}
    storage.write_text(murl, json.dumps(manifest, indent=2, default=float))


def _driver_imports() -> None:
    """What every fuse driver imports sooner or later: torch (the heads, the refit),
    scikit-learn (folds, scores) and matplotlib's Agg canvas (the plots)."""
    # lazy: imported here at once, with the cyclic GC paused (_imports_frozen)
    import fusedist.fusion.methods.experts  # noqa: F401
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.model_selection  # noqa: F401


@contextmanager
def _imports_frozen() -> Iterator[None]:
    """Import the driver's dependencies with the cyclic garbage collector paused, then keep
    the objects they made out of its later passes (``gc.freeze``) until the run ends. Imports
    make hundreds of thousands of long-lived objects, and every full collection walks them
    all again: ~0.4-0.5 s of a small run on a 2-core machine (issue 27), for no garbage.
    Nothing that reaches an output changes. A caller that froze objects itself keeps its
    own scheme (nothing here is frozen or unfrozen)."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        _driver_imports()
        gc.freeze()
    finally:
        gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()  # back to the oldest generation: collectable again after the run


def run_fuse(cfg: FuseConfig, progress: bool = True) -> FuseResult:
    """Cross-validate every expert and fusion method on the bags and labels of ``cfg``."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    with _imports_frozen():
        c = load_cohort(cfg)
        warm = _warm_local_tasks(cfg, c)
        try:
            return _fuse(c, cfg, progress, t0, warm)
        finally:
            if warm is not None:
                warm.close(kill=True)  # after an error; the folds closed it otherwise


def _fuse(c: Cohort, cfg: FuseConfig, progress: bool, t0: float,
          warm: LocalTasks | None) -> FuseResult:
    methods, skipped = select_methods(cfg, c)
    digest = config_digest(cfg, cfg.RUN_ONLY) + ":" + _fingerprint(c)
    StageState(cfg.output).guard(digest, cfg.overwrite, "folds of a fuse run")
    fold_ids = make_folds(c, np.arange(c.num_samples), cfg.folds, cfg.seed)
    heat = list(range(min(cfg.heatmaps, len(c.slide_ids))))
    prepared, prep_notes = prepare_methods(methods, c, cfg, progress)
    extra_notes = {**skipped, **prep_notes}
    log.info("fuse: %d slides, %d samples, encoders %s, task %s, %d folds", len(c.slide_ids),
             c.num_samples, c.encoders, c.task, cfg.folds)
    with start_run(cfg.mlflow, run_name="fuse", params=cfg,
                   tags={"fusedist.stage": "fuse", "fusedist.task": cfg.task}) as run:
        if run.active:
            run.log_datasets(lineage_inputs(cfg, c.encoders))
        results, resumed = _run_folds(c, cfg, fold_ids, heat, methods, prepared, progress,
                                      warm)
        res = evaluate(c, cfg, fold_ids, results, extra_notes, run, methods)
        if cfg.final.enabled:
            _write_final(c, cfg, methods, prepared, res, results, run)
        res.folds_run, res.folds_resumed = cfg.folds - resumed, resumed
        remove_packed(c.columns())
        res.elapsed = time.perf_counter() - t0
        run.log_metrics({"fuse_seconds": res.elapsed})
    return res


__all__ = ["FuseResult", "run_fuse"]
