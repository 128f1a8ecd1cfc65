"""The committed ``k8s/`` manifests, generated from ``configs/`` by the renderer.

``fusedist launch k8s`` rewrites them; ``fusedist launch k8s --check`` (and the test suite)
fails when a committed file differs from what the configs render, so ``k8s/`` never drifts
from ``fusedist launch render``.

Layout (apply in this order; each job file on its own, when that stage should run)::

    k8s/base/         namespace, RBAC for the fallback CronJob, MLflow server + Service
    k8s/interactive/  a RayCluster to `fusedist launch` stages into via the Jobs API
    k8s/jobs/         one RayJob per stage (tile, cache, distill, embed, fuse)
    k8s/retrain/      weekly retraining: a RayCronJob, or the fallback CronJob (pick one)

It is also a Kustomize base: ``k8s/kustomization.yaml`` (base/ + interactive/),
``k8s/jobs/kustomization.yaml`` and ``k8s/retrain/kustomization.yaml`` (the RayCronJob) set
the namespace and the image, so overlays change registry, namespace and resources
(``kubectl apply -k k8s``; see fusedist.launch.kustomize).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fusedist.config import load_config
from fusedist.launch import render as R
from fusedist.launch.config import LaunchConfig
from fusedist.launch.kustomize import _image_name

SECRETS_HELP = f"""\
Credentials live in Kubernetes Secrets that you create; manifests only reference them:
  kubectl -n fusedist create secret generic fusedist-s3 \\
      --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...
  kubectl -n fusedist create secret generic fusedist-mlflow-db \\
      --from-literal={R.MLFLOW_DB_KEY}=postgresql://USER:PASSWORD@HOST:5432/mlflow
  kubectl -n fusedist create secret generic fusedist-mlflow   # optional keys:
      # MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN"""


@dataclass(frozen=True)
class Entry:
    """One generated file: which objects, from which launch config and stage recipe."""

    path: str
    kind: str
    launch: str
    stage: str = ""
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    note: str = ""


_S3 = "s3://fusedist-data"
ENTRIES = [
    Entry("base/00-namespace.yaml", "namespace", "configs/launch/gpu.yaml", note=SECRETS_HELP),
    Entry("base/10-rbac.yaml", "rbac", "configs/launch/retrain_weekly.yaml",
          note="Least privilege for the fallback CronJob: create/get/list/watch RayJobs, "
               "in this namespace only."),
    Entry("base/20-mlflow.yaml", "mlflow", "configs/launch/gpu.yaml",
          note="MLflow tracking server: PostgreSQL backend (URL from the fusedist-mlflow-db "
               "Secret), S3 artifacts proxied by the server (clients need no S3 credentials)."),
    Entry("interactive/raycluster.yaml", "raycluster", "configs/launch/gpu.yaml",
          note="Then: kubectl -n fusedist port-forward svc/fusedist-head-svc 8265 and\n"
               "fusedist launch submit <stage> -c configs/<stage>/<recipe>.yaml "
               "--address http://127.0.0.1:8265"),
    Entry("jobs/rayjob-tile.yaml", "rayjob", "configs/launch/cpu.yaml", "tile",
          "configs/tile/s3.yaml", [f"input={_S3}/slides", f"output={_S3}/tiles"]),
    Entry("jobs/rayjob-cache.yaml", "rayjob", "configs/launch/gpu.yaml", "cache",
          "configs/cache/xmag_uni2h.yaml",
          [f"tiles={_S3}/tiles/pairs", f"output={_S3}/features"]),
    Entry("jobs/rayjob-distill.yaml", "rayjob", "configs/launch/kuberay_h100.yaml", "distill",
          "configs/distill/xmag_paper.yaml"),
    Entry("jobs/rayjob-embed.yaml", "rayjob", "configs/launch/gpu.yaml", "embed",
          "configs/embed/multi_fm.yaml", [f"tiles={_S3}/tiles/grid", f"output={_S3}/bags"]),
    Entry("jobs/rayjob-fuse.yaml", "rayjob", "configs/launch/gpu.yaml", "fuse",
          "configs/fuse/classification.yaml",
          [f"bags={_S3}/bags", f"labels={_S3}/labels.csv", f"output={_S3}/fuse/classification",
           f"thumbnails={_S3}/tiles/grid"]),
    Entry("retrain/raycronjob.yaml", "raycronjob", "configs/launch/retrain_weekly.yaml",
          "retrain", "configs/retrain/weekly.yaml",
          note="RayCronJob is alpha: start the KubeRay operator with the feature gate "
               "RayCronJob=true.\nWithout it, use cronjob-fallback.yaml (apply one, not both)."),
    Entry("retrain/cronjob-fallback.yaml", "cronjob", "configs/launch/retrain_weekly.yaml",
          "retrain", "configs/retrain/weekly.yaml",
          note="A plain CronJob that creates one RayJob per run with `kubectl create`, as the "
               "fusedist-launcher\nServiceAccount of base/10-rbac.yaml (apply that first)."),
]


def render_entry(entry: Entry, root: Path) -> str:
    launch = load_config(LaunchConfig, root / entry.launch)
    recipe = (R.load_stage_recipe(entry.stage, root / entry.recipe, entry.overrides or None)
              if entry.recipe else None)
    if entry.kind == "namespace":
        docs = R.namespace(launch)
    elif entry.kind == "cronjob":  # RBAC lives in base/10-rbac.yaml
        docs = R.cronjob_fallback(entry.stage, launch, recipe, with_rbac=False)
    else:
        docs = R.render(entry.kind, entry.stage, launch, recipe)
    if recipe is not None:  # a stable source label, whatever folder we render from
        for d in docs:
            ann = d["metadata"].get("annotations") or {}
            if "fusedist.io/source" in ann:
                ann["fusedist.io/source"] = entry.recipe + (" + overrides" if entry.overrides
                                                            else "")
    sources = ", ".join(s for s in (entry.launch, entry.recipe) if s)
    sets = "".join(f" --set {o}" for o in entry.overrides)
    header = (f"Generated by `fusedist launch k8s` from {sources}{sets}.\n"
              "Do not edit: change the configs and regenerate.")
    if entry.note:
        header += "\n\n" + entry.note
    return R.to_yaml(docs, header)


# Kustomizations: folder -> (launch config for namespace and image, resources, note).
KUSTOMIZATIONS = {
    "": ("configs/launch/gpu.yaml",
         ["base/00-namespace.yaml", "base/10-rbac.yaml", "base/20-mlflow.yaml",
          "interactive/raycluster.yaml"],
         "The platform: namespace, RBAC, MLflow and the interactive RayCluster.\n"
         "kubectl apply -k k8s; overlay it to change registry, namespace and resources."),
    "jobs": ("configs/launch/gpu.yaml", sorted(e.path.removeprefix("jobs/") for e in ENTRIES
                                                if e.path.startswith("jobs/")),
             "One RayJob per stage; apply one with `kubectl apply -f`, or all with -k."),
    "retrain": ("configs/launch/retrain_weekly.yaml", ["raycronjob.yaml"],
                "The RayCronJob. cronjob-fallback.yaml is not listed: it carries its RayJob "
                "as\nConfigMap text, which Kustomize does not rewrite; render it with `fusedist "
                "launch render`\nfor another namespace or image."),
}


def _image_parts(image: str) -> dict[str, str]:
    name = _image_name(image)
    rest = image[len(name):]
    out = {"name": name.rsplit("/", 1)[-1], "newName": name}
    if rest.startswith(":"):
        out["newTag"] = rest[1:]
    elif rest.startswith("@"):
        out["digest"] = rest[1:]
    return out


def render_kustomization(folder: str, root: Path) -> str:
    launch_file, resources, note = KUSTOMIZATIONS[folder]
    launch = load_config(LaunchConfig, root / launch_file)
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
           "namespace": launch.namespace, "images": [_image_parts(launch.image)],
           "resources": resources}
    header = (f"Generated by `fusedist launch k8s` from {launch_file}.\n"
              "Do not edit: overlay it (or change the configs and regenerate).\n\n" + note)
    return R.to_yaml([doc], header)


def render_all(root: Path) -> dict[str, str]:
    out = {e.path: render_entry(e, root) for e in ENTRIES}
    for folder in KUSTOMIZATIONS:
        out[f"{folder}/kustomization.yaml".lstrip("/")] = render_kustomization(folder, root)
    return out


def write(root: Path, out: Path | None = None) -> list[Path]:
    out = out or root / "k8s"
    written = []
    for rel, text in render_all(root).items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        written.append(p)
    return written


def stale(root: Path, out: Path | None = None) -> list[str]:
    """Files under ``k8s/`` that are missing, differ from the render, or are not generated."""
    out = out or root / "k8s"
    want = render_all(root)
    problems = [f"{rel}: {'differs' if (out / rel).exists() else 'missing'}"
                for rel, text in want.items()
                if not (out / rel).exists() or (out / rel).read_text() != text]
    extra = [p.relative_to(out).as_posix() for p in out.rglob("*.yaml")] if out.exists() else []
    problems += [f"{rel}: not generated (remove it or add it to ENTRIES)"
                 for rel in extra if rel not in want]
    return problems
