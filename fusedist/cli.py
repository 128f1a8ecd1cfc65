"""``fusedist``: one command, one subcommand per stage.

Each subcommand loads its stage's typed config from a YAML recipe (``--config``), applies
``--set key=value`` overrides and a few shortcut flags, and calls the stage's Python function.
Exit status: 0 all good, 1 the job ran but some items failed (see the summary/manifest),
2 bad configuration or input (nothing was done), 3 a storage (full disk, read-only or
forbidden output, S3) or tracking (MLflow) failure, one line naming the path or endpoint and
the fix (``--debug`` adds the traceback); 130 / 143 a stopped ``distill`` (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from fusedist.config import ConfigError, dump_yaml, load_config
from fusedist.distill.stop import DistillStopped
from fusedist.execution.rayrun import route_ray_logs
from fusedist.secrets import mask_text
from fusedist.storage import StorageError, local_write_error
from fusedist.tracking import TrackingError

# Tracebacks never print local variables: they could hold credentials.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed training and fusion of pathology foundation models.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe (see configs/).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config key: key=value (repeatable).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
VerboseOpt = typer.Option(False, "--verbose", "-v",
                          help="Show Ray's own logs here (default: the run's log file).")
PrintConfigOpt = typer.Option(False, "--print-config",
                              help="Print the fully resolved config (defaults, file, --set) "
                                   "as YAML and exit.")

# `--debug` anywhere on the command line: expected failures print their traceback as well as
# the one-line message. main() takes it out of argv, so every subcommand accepts it.
DEBUG_ENV = "FUSEDIST_DEBUG"
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def ray_log_path(stage: str) -> Path:
    """The run's log file for Ray's own output: ``$FUSEDIST_LOG_DIR`` (default
    ``<tmp>/fusedist-logs``) / ``<stage>-<UTC time>-<pid>.log``."""
    import tempfile
    import time

    root = os.environ.get("FUSEDIST_LOG_DIR") or os.path.join(tempfile.gettempdir(),
                                                               "fusedist-logs")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(root) / f"{stage}-{stamp}-{os.getpid()}.log"


def _setup_logging(quiet: bool, verbose: bool = False, stage: str | None = None) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Ray and friends are chatty at INFO; our own loggers carry the story.
    for noisy in ("ray", "botocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if stage is not None and not verbose:
        import atexit

        path = ray_log_path(stage)
        route_ray_logs(str(path))

        @atexit.register
        def _say_where() -> None:  # one line, only when Ray did say something
            if path.is_file() and path.stat().st_size:
                typer.echo(f"Ray's logs: {path} (--verbose shows them here)", err=True)


def _fail(code: int, msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load(model, config: Optional[Path], overrides: Optional[List[str]],
          print_config: bool = False, **fields):
    try:
        cfg = load_config(model, config, overrides, **fields)
    except ConfigError as e:
        _fail(2, str(e))
    if print_config:
        typer.echo(mask_text(dump_yaml(cfg)).rstrip("\n"))
        raise typer.Exit(0)
    return cfg


@app.command()
def synth(config: Optional[Path] = ConfigOpt,
          output: Optional[str] = typer.Option(None, help="Where slides and labels.csv go."),
          num_slides: Optional[int] = typer.Option(None, help="How many slides."),
          size: Optional[int] = typer.Option(None, help="Level-0 side in pixels."),
          seed: Optional[int] = typer.Option(None, help="Random seed."),
          set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
          verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Make synthetic H&E-like slides (pyramidal TIFF) and their labels CSV."""
    # lazy: keeps the stage's imports (scipy, PIL; torch, Ray for some) out of CLI start-up
    from fusedist.synth import SynthConfig, synthesize

    _setup_logging(quiet, verbose, "synth")
    cfg = _load(SynthConfig, config, set_, print_config, output=output, num_slides=num_slides,
                size=size, seed=seed)
    records = _run_stage(synthesize, cfg, quiet)
    typer.echo(f"wrote {len(records)} slides and labels.csv to {cfg.output}")


@app.command()
def tile(config: Optional[Path] = ConfigOpt,
         input: Optional[str] = typer.Option(None, "--input", "-i",
                                             help="Slide file, folder, or slide table .csv/.parquet "
                                                  "(path or s3://)."),
         output: Optional[str] = typer.Option(None, "--output", "-o",
                                              help="Root of tile datasets (path or s3://)."),
         dataset: Optional[str] = typer.Option(None, help="Dataset folder name."),
         mode: Optional[str] = typer.Option(None, help="pairs or grid."),
         mpp_override: Optional[float] = typer.Option(
             None, "--mpp-override", help="Level-0 µm/px for slides whose metadata has none."),
         set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
         verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Tile slides into WebDataset shards (pairs for XMAG, or a grid)."""
    # lazy: keeps the stage's imports (scipy, PIL; torch, Ray for some) out of CLI start-up
    from fusedist.tiling import TileConfig, run_tile

    _setup_logging(quiet, verbose, "tile")
    cfg = _load(TileConfig, config, set_, print_config, input=input, output=output, dataset=dataset,
                mode=mode, mpp_override=mpp_override)
    result = _run_stage(run_tile, cfg, quiet)
    typer.echo(result.summary())
    typer.echo(f"manifest: {result.dataset_url}/manifest.json")
    if result.failed:
        _fail(1, f"{len(result.failed)} slide(s) failed; the others were tiled. "
                 "Reasons are in the manifest.")


@app.command()
def cache(config: Optional[Path] = ConfigOpt,
          tiles: Optional[str] = typer.Option(None, help="Tile dataset folder (path or s3://)."),
          output: Optional[str] = typer.Option(None, "--output", "-o",
                                               help="Root of feature datasets."),
          teacher: Optional[List[str]] = typer.Option(
              None, "--teacher", "-t", help="Registry name of a teacher (repeatable)."),
          set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
          verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Run teachers once over tile shards and cache their features (mirrored shards)."""
    # lazy: keeps the stage's imports (scipy, PIL; torch, Ray for some) out of CLI start-up
    from fusedist.features import CacheConfig, run_cache

    _setup_logging(quiet, verbose, "cache")
    cfg = _load(CacheConfig, config, set_, print_config, tiles=tiles, output=output,
                teachers=teacher or None)
    result = _run_stage(run_cache, cfg, quiet)
    typer.echo(result.summary())
    if result.failed:
        _fail(1, f"{len(result.failed)} shard(s) failed; the others were cached. Reasons are in "
                 "the feature manifests.")


@app.command()
def embed(config: Optional[Path] = ConfigOpt,
          tiles: Optional[str] = typer.Option(None, help="Grid tile dataset folder."),
          slides: Optional[str] = typer.Option(None, help="Or: slides to tile first (folder, file or slide "
                                                       "table .csv/.parquet)."),
          output: Optional[str] = typer.Option(None, "--output", "-o", help="Root of bags."),
          encoder: Optional[List[str]] = typer.Option(
              None, "--encoder", "-e",
              help="Registry name, export folder or models:/<name>@<alias> (repeatable)."),
          set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
          verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Embed slides into HDF5 feature bags (one per slide per encoder)."""
    # lazy: keeps the stage's imports (scipy, PIL; torch, Ray for some) out of CLI start-up
    from fusedist.features import EmbedConfig, run_embed

    _setup_logging(quiet, verbose, "embed")
    cfg = _load(EmbedConfig, config, set_, print_config, tiles=tiles, slides=slides, output=output,
                encoders=encoder or None)
    result = _run_stage(run_embed, cfg, quiet)
    typer.echo(result.summary())
    if result.failed:
        _fail(1, f"{len(result.failed)} slide(s) failed; the others were embedded.")


@app.command()
def distill(config: Optional[Path] = ConfigOpt,
            tiles: Optional[str] = typer.Option(None, help="Pairs tile dataset folder."),
            features: Optional[str] = typer.Option(
                None, help="The teacher's feature dataset mirroring --tiles."),
            run_name: Optional[str] = typer.Option(
                None, help="Run name; the same name again resumes the run."),
            storage_path: Optional[str] = typer.Option(
                None, help="Where runs live (folder or s3://)."),
            workers: Optional[int] = typer.Option(None, help="Training workers (ranks)."),
            set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
            verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Distil a 5x XMAG student from cached teacher features (Ray Train + DeepSpeed)."""
    # lazy: distill's config and check are light, its training (below) imports torch and Ray
    from fusedist.distill.check import check as check_distill
    from fusedist.distill.config import DistillConfig

    _setup_logging(quiet, verbose, "distill")
    sets = [*(set_ or []), *([f"scaling.num_workers={workers}"] if workers is not None else [])]
    cfg = _load(DistillConfig, config, sets, print_config, tiles=tiles, features=features,
                run_name=run_name, storage_path=storage_path)
    _run_stage(check_distill, cfg)  # before torch and Ray: bad inputs fail in a second
    # lazy: imports torch, Ray Train and DeepSpeed, after the input check
    from fusedist.distill.train import run_distill

    result = _run_stage(run_distill, cfg, quiet)
    typer.echo(result.summary())


@app.command()
def export(checkpoint: str = typer.Argument(
               ..., help="A distill checkpoint folder, or a run folder (newest checkpoint)."),
           output: Optional[str] = typer.Option(None, "--output", "-o",
                                                help="Export folder (default: <run>/export)."),
           name: Optional[str] = typer.Option(None, help="Encoder registry name."),
           set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
           verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Export a distill checkpoint's EMA student as an encoder (and register it in MLflow)."""
    # lazy: keeps the stage's imports (scipy, PIL; torch, Ray for some) out of CLI start-up
    from fusedist.distill.config import ExportConfig
    from fusedist.distill.train import run_export

    _setup_logging(quiet, verbose, "export")
    cfg = _load(ExportConfig, None, set_, print_config, checkpoint=checkpoint, output=output,
                name=name)
    try:
        folder, encoder, version = _run_stage(run_export, cfg, quiet)
    except FileNotFoundError as e:
        _fail(2, str(e))
    typer.echo(f"exported encoder '{encoder}' to {folder}"
               + (f" (MLflow version {version})" if version else ""))
    typer.echo(f"embed with: fusedist embed --encoder {folder} --tiles <5x grid tiles>")
    if version:
        ref = (f"models:/{cfg.registered_model}/{version}" if cfg.alias.lower() == "latest"
               else f"models:/{cfg.registered_model}@{cfg.alias}")
        typer.echo(f"        or: fusedist embed --encoder {ref} --tiles <5x grid tiles>")


@app.command()
def fuse(config: Optional[Path] = ConfigOpt,
         bags: Optional[str] = typer.Option(None, help="Root of <encoder>/<slide>.h5 bags."),
         labels: Optional[str] = typer.Option(
             None, help="Labels CSV keyed by slide_id, or by patient_id (with --slides)."),
         slides: Optional[str] = typer.Option(
             None, help="Slide table (slide_id, path, patient_id): each slide's patient."),
         unit: Optional[str] = typer.Option(
             None, help="auto | slide | patient: one sample per slide or per patient."),
         task: Optional[str] = typer.Option(
             None, help="classification | tile_classification | survival | regression."),
         output: Optional[str] = typer.Option(None, "--output", "-o",
                                              help="Results folder (or s3://)."),
         set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
         verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Cross-validate experts, LogitProd, Meta-Encoder, FuseCPath and baselines on slide bags."""
    # lazy: fuse's config and check are light, its run (below) imports torch and Ray
    from fusedist.fusion.check import check as check_fuse
    from fusedist.fusion.config import FuseConfig

    _setup_logging(quiet, verbose, "fuse")
    cfg = _load(FuseConfig, config, set_, print_config, bags=bags, labels=labels, task=task,
                output=output, slides=slides, unit=unit)
    _run_stage(check_fuse, cfg)  # before torch and Ray: bad inputs fail in a second
    # lazy: imports torch and Ray, after the input check
    from fusedist.fusion.run import run_fuse

    result = _run_stage(run_fuse, cfg, quiet)
    typer.echo(result.summary_text())


@app.command()
def predict(config: Optional[Path] = ConfigOpt,
            model: Optional[str] = typer.Option(
                None, "--model", "-m",
                help="A fuse output's model/ folder, or models:/<name>@<alias>."),
            bags: Optional[str] = typer.Option(None, help="Root of <encoder>/<slide>.h5 bags."),
            slides: Optional[str] = typer.Option(
                None, help="Or: slides (folder, slide table .csv/.parquet, or s3://) to tile "
                           "and embed first, as the "
                           "model's card records (into <output>/tiles and <output>/bags)."),
            patients: Optional[str] = typer.Option(
                None, help="Slide table (slide_id, patient_id) grouping the slides into "
                           "patients, for a model fused with unit: patient."),
            output: Optional[str] = typer.Option(None, "--output", "-o",
                                                 help="Predictions folder (or s3://)."),
            set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
            verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Apply a fused model to new slides (their bags, or the slides themselves): predictions.csv,
    heatmaps, summary."""
    # lazy: the stage (scipy, the fused model's modules) stays out of the CLI's start-up
    from fusedist.predict import PredictConfig, check, run_predict

    _setup_logging(quiet, verbose, "predict")
    # `model` is also _load's first parameter: pass it as an override.
    sets = ([f"model={model}"] if model else []) + list(set_ or [])
    if slides and not bags:
        sets.insert(0, "bags=null")  # --slides replaces a config file's `bags`
    cfg = _load(PredictConfig, config, sets, print_config, bags=bags, slides=slides,
                output=output, patients=patients)
    _run_stage(check, cfg)  # before torch and Ray: a missing model or slide table fails fast
    result = _run_stage(run_predict, cfg, quiet)
    typer.echo(f"{len(result['predicted'])} slide(s) predicted, {len(result['failed'])} "
               f"failed; predictions: {result['output']}/predictions.csv")
    for f in result["failed"]:
        typer.secho(f"failed {f['slide_id']}: {f['reason']}", fg=typer.colors.RED, err=True)
    if result["failed"]:
        raise typer.Exit(1)


@app.command()
def retrain(config: Optional[Path] = ConfigOpt,
            force_promote: bool = typer.Option(
                False, "--force-promote",
                help="Promote the challenger whatever the comparison says (recorded as such)."),
            run_id: Optional[str] = typer.Option(
                None, "--run-id", help="Name of this run's folder (default: the UTC time); "
                                       "an unfinished earlier run is resumed instead."),
            set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
            verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Ingest new slides, refit, evaluate the challenger against the champion, and move the
    champion alias only if it is better (the scheduled job)."""
    # lazy: retrain imports every stage (scipy, PIL), which CLI start-up must not
    from fusedist.retrain.config import RetrainConfig

    _setup_logging(quiet, verbose, "retrain")
    if config is None and not set_:
        _fail(2, "retrain needs a recipe: fusedist retrain -c configs/retrain/<recipe>.yaml")
    if run_id is not None and (not run_id or "/" in run_id or run_id.startswith(".")):
        _fail(2, f"--run-id {run_id!r}: give a plain folder name (no '/', not hidden)")
    cfg = _load(RetrainConfig, config, set_, print_config)
    # lazy: as above
    from fusedist.retrain.job import run_retrain

    result = _run_stage(lambda c, progress=True: run_retrain(
        c, progress=progress, force_promote=force_promote, run_id=run_id), cfg, quiet)
    typer.echo(result.summary())


def _causes(e: BaseException):
    """``e`` and what it wraps: Ray task errors (``.cause``), Ray Train's per-worker failures,
    and the ``raise ... from`` chain, so a full disk inside a Ray worker is still recognised."""
    seen, todo = set(), [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
        failures = getattr(cur, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())


def classify_error(e: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an expected failure, else None (a bug: traceback).

    2: bad configuration or input. 3: storage (local or S3) or tracking (MLflow) failure."""
    for c in _causes(e):
        if isinstance(c, DistillStopped):
            return c.exit_code, str(c)
        if type(c).__name__.startswith("RayTaskError"):
            continue  # Ray's wrapper subclasses the cause's type; its text holds a traceback
        if isinstance(c, ConfigError):
            return 2, str(c)
        if isinstance(c, (StorageError, TrackingError)):
            return 3, str(c).strip().splitlines()[0]
        if isinstance(c, OSError) and c.errno in WRITE_ERRNOS:
            return 3, str(local_write_error(c.filename or "(unnamed file)", c, "access"))
    return None


def _run_stage(fn, cfg, quiet: bool | None = None):
    """Run a stage (or, with ``quiet=None``, its input check), turning expected failures into
    exit codes 2 (config/input) and 3 (storage or tracking) with one line; ``--debug`` prints
    the traceback too."""
    try:
        return fn(cfg) if quiet is None else fn(cfg, progress=not quiet)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - classified below; anything else re-raises
        found = classify_error(e)
        if found is None:
            raise
        if os.environ.get(DEBUG_ENV) == "1":
            import traceback

            traceback.print_exc()
        _fail(*found)


@app.command()
def demo(workdir: Optional[str] = typer.Option(
             None, "--storage", "--workdir",
             help="Where the demo writes: a folder (default demo-output) or s3://bucket/prefix."),
         num_slides: Optional[int] = typer.Option(None, help="Synthetic slides to make."),
         size: Optional[int] = typer.Option(None, help="Level-0 side of each slide (px)."),
         set_: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
         verbose: bool = VerboseOpt, print_config: bool = PrintConfigOpt) -> None:
    """Run the pipeline end to end on embedded defaults (local Ray, local files)."""
    # lazy: keeps the stage's imports (scipy, PIL; torch, Ray for some) out of CLI start-up
    from fusedist.demo import DemoConfig, run_demo

    _setup_logging(quiet, verbose, "demo")
    cfg = _load(DemoConfig, None, set_, print_config, workdir=workdir, num_slides=num_slides,
                size=size)
    report = _run_stage(run_demo, cfg, quiet)
    # lazy: as above (the demo module)
    from fusedist.demo import tracking_uri

    typer.echo(f"\ndemo finished. Report: {report}\n"
               f"Open the MLflow UI: mlflow ui --backend-store-uri {tracking_uri(cfg)}")


# `fusedist launch ...` and `fusedist doctor` live with the launch package.
from fusedist.launch.commands import register as _register_launch  # noqa: E402

_register_launch(app)


def main() -> None:
    # Ray workers inherit this; keep them from printing their own warnings about it.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if "--debug" in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    app(prog_name="fusedist")


if __name__ == "__main__":
    sys.exit(main())
