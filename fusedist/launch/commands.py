"""CLI: ``fusedist launch ...`` (Ray Jobs API, Kubernetes manifests) and ``fusedist doctor``.

``register(app)`` adds both to the main ``fusedist`` Typer app. Exit status: 0 ok; 1 the job
ran but some items failed (the stage's own code is passed through); 2 bad configuration or an
invalid manifest (nothing was done); 3 the cluster, Jobs API or kubectl could not be used;
4 the job was stopped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from fusedist.config import ConfigError, load_config
from fusedist.launch import k8s
from fusedist.launch.config import LaunchConfig
from fusedist.launch.doctor import DoctorOptions, exit_status, format_table, run_checks
from fusedist.launch.render import RenderError, load_stage_recipe, render as do_render, to_yaml
from fusedist.launch.submit import LaunchError, project_root, submit_stage
from fusedist.launch.validate import CRD_FILES, default_crd_dir, validate_docs, validate_file
from fusedist.recipes import load_recipe

SetOpt = typer.Option(None, "--set", "-s", help="Override a stage config key: key=value.")
RecipeOpt = typer.Option(None, "--config", "-c", help="Stage recipe (configs/<stage>/*.yaml).")
CrdsOpt = typer.Option(None, "--crds", help="Folder of the KubeRay CRDs (ray.io_*.yaml); "
                       "default $FUSEDIST_KUBERAY_CRDS, else the CRDs shipped with fusedist.")


class _LaunchGroup(TyperGroup):
    """``fusedist launch <stage> ...`` is short for ``fusedist launch submit <stage> ...``."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["submit", *args]
        return super().parse_args(ctx, args)


launch_app = typer.Typer(cls=_LaunchGroup, no_args_is_help=True, add_completion=False,
                         help="Run stages on a Ray cluster (Jobs API) or render Kubernetes "
                              "manifests (KubeRay).")


def _fail(code: int, msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


@launch_app.command(context_settings={"allow_extra_args": True,
                                      "ignore_unknown_options": True})
def submit(ctx: typer.Context,
           stage: str = typer.Argument(..., help="Stage: tile, cache, embed, distill, fuse..."),
           config: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
           address: Optional[str] = typer.Option(
               None, help="Jobs API of the head, e.g. http://head:8265 (default "
                          "RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, or 127.0.0.1:8265)."),
           env: Optional[List[str]] = typer.Option(
               None, "--env", help="Also pass this (non-secret) env var to the job."),
           working_dir: Optional[Path] = typer.Option(
               None, help="Project folder to upload (default: the fusedist checkout)."),
           wait: bool = typer.Option(True, "--wait/--no-wait",
                                     help="Follow the logs until the job ends.")) -> None:
    """Submit `fusedist <stage>` to a running Ray cluster and follow its logs.

    Arguments after the options (e.g. `-- --workers 4`) go to the stage command as they are.
    """
    if config is not None:
        try:  # fail here, in seconds, rather than on the cluster after the upload
            load_stage_recipe(stage, config, set_)
        except ConfigError as e:
            _fail(2, str(e))
    try:
        _, code = submit_stage(stage, str(config) if config else None, set_, address=address,
                               extra_args=list(ctx.args), working_dir=working_dir,
                               extra_env=env, wait=wait, log=_err)
    except LaunchError as e:
        _fail(3, str(e))
    raise typer.Exit(code)


def _load_launch(path: Optional[Path], sets: Optional[List[str]]):
    try:
        return load_config(LaunchConfig, path, sets)
    except ConfigError as e:
        _fail(2, str(e))


def _kubectl_apply(text: str) -> int:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _fail(3, "kubectl not found on PATH: install it (and point it at the cluster), or "
                 "drop --apply and pass the YAML (-o file.yaml) to whoever applies it")
    proc = subprocess.run([kubectl, "apply", "-f", "-"], input=text, text=True,
                          capture_output=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return 0 if proc.returncode == 0 else 3


def _validate(docs: list, crds: Optional[Path], wanted: Optional[bool]) -> None:
    crd_dir = crds or default_crd_dir()
    have = all((crd_dir / f).is_file() for f in CRD_FILES.values())
    if wanted is False or (wanted is None and not have):
        if wanted is None:
            _err(f"note: KubeRay CRDs not found at {crd_dir}; manifests not validated "
                 "(--crds DIR)")
        return
    errs = validate_docs(docs, crd_dir)
    if errs:
        _fail(2, "rendered manifests are invalid:\n  " + "\n  ".join(errs))


@launch_app.command()
def render(stage: Optional[str] = typer.Argument(
               None, help="Stage to run (default: the launch config's `stage`)."),
           config: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
           launch: Optional[Path] = typer.Option(
               None, "--launch", "-l", help="Launch settings (configs/launch/*.yaml)."),
           launch_set: Optional[List[str]] = typer.Option(
               None, "--launch-set", help="Override a launch key: key=value."),
           kind: Optional[str] = typer.Option(
               None, help="rayjob | raycronjob | cronjob | raycluster | mlflow | rbac "
                          "(default: raycronjob with a schedule, else rayjob)."),
           output: Optional[Path] = typer.Option(None, "--output", "-o",
                                                 help="Write the YAML here."),
           apply: bool = typer.Option(False, "--apply", help="Pipe to `kubectl apply -f -`."),
           validate: Optional[bool] = typer.Option(
               None, "--validate/--no-validate",
               help="Check against the CRDs and Kubernetes schemas (default: if CRDs found)."),
           crds: Optional[Path] = CrdsOpt) -> None:
    """Render Kubernetes manifests (KubeRay RayJob/RayCronJob, CronJob) for a stage."""
    lc = _load_launch(launch, launch_set)
    stage = stage or lc.stage
    recipe_path = config or (Path(lc.recipe) if lc.recipe else None)
    kind = kind or ("raycronjob" if lc.schedule else "rayjob")
    if not stage and kind not in ("raycluster", "mlflow", "rbac"):
        _fail(2, "which stage? give it (`fusedist launch render distill ...`) or set `stage` "
                 "in the launch config")
    try:
        recipe = load_stage_recipe(stage, recipe_path, set_) if recipe_path and stage else None
        docs = do_render(kind, stage or "", lc, recipe)
    except (ConfigError, RenderError) as e:
        _fail(2, str(e))
    _validate(docs, crds, validate)
    if recipe is None and kind in ("rayjob", "raycronjob", "cronjob"):
        _err(f"note: no recipe given; the job reads its config from the ConfigMap "
             f"{lc.object_name(stage)}-config, which you create: kubectl -n {lc.namespace} "
             f"create configmap {lc.object_name(stage)}-config --from-file={stage}.yaml=<recipe>")
    what = f"{kind}, stage {stage}" if stage else kind
    text = to_yaml(docs, f"Rendered by `fusedist launch render` ({what}).")
    if output:
        output.write_text(text)
        _err(f"wrote {len(docs)} objects to {output}")
    elif not apply:
        sys.stdout.write(text)
    if apply:
        raise typer.Exit(_kubectl_apply(text))


@launch_app.command("validate")
def validate_cmd(files: List[Path] = typer.Argument(..., help="YAML files or folders."),
                 crds: Optional[Path] = CrdsOpt) -> None:
    """Validate manifests offline: KubeRay CRDs, built-in kinds, no literal secrets."""
    paths = [p for f in files for p in (sorted(f.rglob("*.yaml")) if f.is_dir() else [f])]
    errs = [e for p in paths for e in validate_file(p, crds)]
    for e in errs:
        _err(e)
    if errs:
        _fail(2, f"{len(errs)} problem(s) in {len(paths)} file(s)")
    typer.echo(f"{len(paths)} file(s) valid")


@launch_app.command("k8s")
def k8s_cmd(check: bool = typer.Option(False, "--check",
                                       help="Only report files that differ from the render."),
            out: Optional[Path] = typer.Option(None, help="Folder (default <project>/k8s).")
            ) -> None:
    """Regenerate the committed k8s/ manifests from configs/ (or check they are current)."""
    root = project_root()
    if check:
        problems = k8s.stale(root, out)
        for p in problems:
            _err(p)
        if problems:
            _fail(1, "k8s/ is out of date: run `fusedist launch k8s`")
        typer.echo("k8s/ is up to date")
        return
    for p in k8s.write(root, out):
        typer.echo(f"wrote {p}")


def doctor(config: Optional[Path] = typer.Option(
               None, "--config", "-c", help="Take Ray/S3/MLflow settings from a stage recipe."),
           address: Optional[str] = typer.Option(None, help="Ray cluster to check."),
           s3: Optional[str] = typer.Option(None, "--s3", help="s3://bucket/prefix to probe."),
           s3_endpoint: Optional[str] = typer.Option(None, help="S3 endpoint URL."),
           mlflow_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI."),
           min_free_gb: float = typer.Option(20.0, help="WARN below this much free disk.")
           ) -> None:
    """Check torch/CUDA, DeepSpeed, OpenSlide, Ray, S3, MLflow and disk; say how to fix."""
    opts = DoctorOptions(address, s3, s3_endpoint, mlflow_uri, min_free_gb)
    if config is not None:
        _from_recipe(opts, config)
    checks = run_checks(opts)
    typer.echo(format_table(checks))
    raise typer.Exit(exit_status(checks))


def _from_recipe(opts, path: Path) -> None:
    """Fill unset doctor options from a recipe: ray.address, storage.endpoint_url,
    mlflow.tracking_uri and the first s3:// URL it names."""
    try:
        cfg = load_recipe(path)
    except (ConfigError, KeyError) as e:
        _fail(2, str(e))
    ray_cfg, st, ml = (getattr(cfg, k, None) for k in ("ray", "storage", "mlflow"))
    opts.ray_address = opts.ray_address or getattr(ray_cfg, "address", None)
    opts.s3_endpoint = opts.s3_endpoint or getattr(st, "endpoint_url", None)
    opts.mlflow_uri = opts.mlflow_uri or getattr(ml, "tracking_uri", None)
    if not opts.s3_url:
        urls = [v for v in _strings(cfg.model_dump(mode="json")) if v.startswith("s3://")]
        opts.s3_url = urls[0] if urls else None


def _strings(node) -> list[str]:  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def register(app: typer.Typer) -> None:
    """Add ``launch`` (submit, render, validate, k8s) and ``doctor`` to the fusedist app."""
    app.add_typer(launch_app, name="launch")
    app.command("doctor")(doctor)
