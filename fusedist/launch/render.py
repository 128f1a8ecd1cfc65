"""Render Kubernetes manifests for a stage: KubeRay RayJob / RayCronJob, fallback CronJob.

Every object is a plain dict (so tests and the validator read them directly) and
:func:`to_yaml` writes a multi-document YAML that ``kubectl apply -f -`` takes. The stage's
config travels as a ConfigMap mounted at ``/etc/fusedist`` in the Ray pods; the job's
entrypoint is ``fusedist <stage> --config /etc/fusedist/<stage>.yaml``.

Security defaults, on every pod: non-root (uid 1000), no privilege escalation, all
capabilities dropped, the RuntimeDefault seccomp profile, no service-account token unless the
pod talks to the API server. Credentials reach pods only as ``valueFrom.secretKeyRef``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fusedist.config import ConfigError, apply_overrides, load_config
from fusedist.launch.config import LaunchConfig
from fusedist.recipes import RECIPE_MODELS

Doc = dict[str, Any]
CONFIG_MOUNT = "/etc/fusedist"
RUN_AS = 1000
# Keys each referenced Secret must hold (documented in the k8s/ header and the README).
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
MLFLOW_DB_KEY = "MLFLOW_BACKEND_STORE_URI"


class RenderError(ValueError):
    """The stage and launch settings do not fit together; the message says how to fix it."""


@dataclass(frozen=True)
class StageRecipe:
    """A stage's config, validated, as the YAML text that ships in a ConfigMap."""

    stage: str
    text: str
    source: str
    model: Any = None  # the validated config object (None for a stage with no registered model)


# ----------------------------------------------------------------------------- recipes

def stage_model(stage: str) -> Any:
    """The config class of ``stage`` (None for a stage with no registered model yet)."""
    import importlib


    if stage not in RECIPE_MODELS:
        return None
    module, name = RECIPE_MODELS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def load_stage_recipe(stage: str, recipe: str | Path,
                      overrides: list[str] | None = None) -> StageRecipe:
    """Validate ``recipe`` (+ ``--set`` overrides) with the stage's config model.

    What ships is the recipe's own keys with the overrides applied, not a dump with every
    default filled in: the job then picks up the defaults of the image it runs.
    """
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path} (e.g. configs/{stage}/*.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys")
    cls = stage_model(stage)
    model = load_config(cls, path, overrides) if cls is not None else None
    data = apply_overrides(raw, overrides)
    text = yaml.safe_dump(data, sort_keys=False)
    return StageRecipe(stage, text, str(path) + (" + overrides" if overrides else ""), model)


def check_fit(recipe: StageRecipe | None, launch: LaunchConfig) -> None:
    """Fail early when the stage asks for more GPUs than the worker group can ever offer."""
    if recipe is None or recipe.model is None:
        return
    scaling = getattr(recipe.model, "scaling", None)
    student = getattr(recipe.model, "student", None)  # retrain: its student's distillation
    if scaling is None and getattr(student, "distill", None) is not None:
        scaling = student.distill.scaling
    if scaling is None or not getattr(scaling, "use_gpu", False):
        return
    w = launch.workers
    offered = w.max_replicas * w.gpus
    wanted = int(getattr(scaling, "num_workers", 1))
    if wanted > offered:
        raise RenderError(
            f"{recipe.stage} wants {wanted} GPU workers (scaling.num_workers) but the worker "
            f"group offers at most {w.max_replicas} x {w.gpus} = {offered} GPUs: raise "
            "workers.max_replicas / workers.gpus, or lower scaling.num_workers")


# ----------------------------------------------------------------------------- pieces

def labels(launch: LaunchConfig, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fusedist", "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "fusedist-launch", **launch.labels}


def meta(launch: LaunchConfig, name: str, component: str) -> Doc:
    return {"name": name, "namespace": launch.namespace, "labels": labels(launch, component)}


def pod_security() -> Doc:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> Doc:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def secret_env(name: str, secret: str, key: str, optional: bool = False) -> Doc:
    ref: Doc = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def pod_env(launch: LaunchConfig) -> list[Doc]:
    """Non-secret settings as values; credentials only as references to Secrets."""
    env: list[Doc] = [{"name": k, "value": v} for k, v in sorted(launch.env.items())]
    s = launch.secrets
    if s.s3:
        env += [secret_env(k, s.s3, k) for k in S3_KEYS]
    if s.mlflow:
        env += [secret_env(k, s.mlflow, k, optional=True) for k in MLFLOW_KEYS]
    if s.hf:
        env.append(secret_env("HF_TOKEN", s.hf, "HF_TOKEN", optional=True))
    return env


def resources(cpus: int | str, memory: str, gpus: int = 0, gpu_resource: str = "") -> Doc:
    res: Doc = {"cpu": str(cpus), "memory": memory}
    if gpus:
        res[gpu_resource] = gpus
    # requests == limits: Guaranteed QoS, so the kubelet never evicts a training pod first.
    return {"requests": dict(res), "limits": dict(res)}


def _volumes(launch: LaunchConfig, configmap: str | None, shm: str) -> tuple[list, list]:
    vols: list[Doc] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    mounts: list[Doc] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if configmap:
        vols.append({"name": "fusedist-config", "configMap": {"name": configmap}})
        mounts.append({"name": "fusedist-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
    if launch.model_volume:
        mv = launch.model_volume
        vols.append({"name": "models", "persistentVolumeClaim": {"claimName": mv.claim_name,
                                                                  "readOnly": True}})
        mounts.append({"name": "models", "mountPath": mv.mount_path, "readOnly": True})
    return vols, mounts


def ray_pod(launch: LaunchConfig, container: str, res: Doc, shm: str, configmap: str | None,
            ports: list[Doc] | None = None, tolerations: list[Doc] | None = None,
            node_selector: dict[str, str] | None = None) -> Doc:
    vols, mounts = _volumes(launch, configmap, shm)
    c: Doc = {"name": container, "image": launch.image,
              "imagePullPolicy": launch.image_pull_policy, "env": pod_env(launch),
              "resources": res, "volumeMounts": mounts, "securityContext": container_security()}
    if ports:
        c["ports"] = ports
    spec: Doc = {"automountServiceAccountToken": False, "securityContext": pod_security(),
                 "containers": [c], "volumes": vols}
    if tolerations:
        spec["tolerations"] = tolerations
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    return {"metadata": {"labels": labels(launch, "ray")}, "spec": spec}


def cluster_spec(launch: LaunchConfig, configmap: str | None) -> Doc:
    h, w = launch.head, launch.workers
    head_ports = [{"containerPort": 6379, "name": "gcs-server"},
                  {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"},
                  {"containerPort": 8080, "name": "metrics"}]
    worker_tol = [t.model_dump(exclude_none=True) for t in w.tolerations]
    spec: Doc = {
        "rayVersion": launch.ray_version,
        "enableInTreeAutoscaling": launch.autoscaling,
        "headGroupSpec": {
            # The head schedules no tasks: a crash of a greedy task can never take GCS down.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": ray_pod(launch, "ray-head", resources(h.cpus, h.memory), h.shm_size,
                                configmap, ports=head_ports),
        },
        "workerGroupSpecs": [{
            "groupName": w.name,
            "replicas": w.start_replicas,
            "minReplicas": w.min_replicas,
            "maxReplicas": w.max_replicas,
            "rayStartParams": {},
            "template": ray_pod(launch, "ray-worker",
                                resources(w.cpus, w.memory, w.gpus, w.gpu_resource),
                                w.shm_size, configmap, tolerations=worker_tol,
                                node_selector=w.node_selector),
        }],
    }
    if launch.autoscaling:
        spec["autoscalerOptions"] = {
            "idleTimeoutSeconds": launch.idle_timeout_seconds, "upscalingMode": "Default",
            "resources": resources("500m", "512Mi"), "securityContext": container_security()}
    if launch.ray_auth == "token":
        spec["authOptions"] = {"mode": "token"}
    return spec


def submitter_pod(launch: LaunchConfig) -> Doc:
    """The pod that runs ``ray job submit`` (KubeRay fills in the command), hardened too."""
    c = {"name": "ray-job-submitter", "image": launch.image,
         "imagePullPolicy": launch.image_pull_policy, "resources": resources("500m", "1Gi"),
         "securityContext": container_security()}
    return {"metadata": {"labels": labels(launch, "submitter")},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "securityContext": pod_security(), "containers": [c]}}


def entrypoint(stage: str, extra_args: list[str] | None = None,
               shell_args: list[str] | None = None) -> str:
    """The job's command line. ``extra_args`` are quoted; ``shell_args`` (the launch config's
    ``extra_args``) stay shell text so ``$(date ...)`` expands on the head at run time."""
    import shlex

    args = ["fusedist", stage, "--config", f"{CONFIG_MOUNT}/{stage}.yaml", *(extra_args or [])]
    return " ".join([shlex.join(args), *(shell_args or [])])


def rayjob_spec(stage: str, launch: LaunchConfig, configmap: str,
                extra_args: list[str] | None = None) -> Doc:
    spec: Doc = {
        "entrypoint": entrypoint(stage, extra_args, launch.extra_args),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": launch.ttl_seconds_after_finished,
        "backoffLimit": launch.backoff_limit,
        "submissionMode": "K8sJobMode",
        "submitterConfig": {"backoffLimit": launch.submitter_backoff_limit},
        "submitterPodTemplate": submitter_pod(launch),
        "rayClusterSpec": cluster_spec(launch, configmap),
    }
    if launch.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = launch.active_deadline_seconds
    return spec


# ----------------------------------------------------------------------------- objects

def config_map_name(launch: LaunchConfig, stage: str) -> str:
    return f"{launch.object_name(stage)}-config"


def stage_config_map(stage: str, launch: LaunchConfig, recipe: StageRecipe) -> Doc:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {**meta(launch, config_map_name(launch, stage), stage),
                         "annotations": {"fusedist.io/source": recipe.source}},
            "data": {f"{stage}.yaml": recipe.text}}


def _config_docs(stage: str, launch: LaunchConfig, recipe: StageRecipe | None) -> list[Doc]:
    # No recipe: the ConfigMap is made by hand (kubectl create configmap ... --from-file).
    return [stage_config_map(stage, launch, recipe)] if recipe else []


def rayjob(stage: str, launch: LaunchConfig, recipe: StageRecipe | None,
           extra_args: list[str] | None = None, generate_name: bool = False) -> list[Doc]:
    check_fit(recipe, launch)
    name = launch.object_name(stage)
    md = meta(launch, name, stage)
    if generate_name:  # each `kubectl create` makes a new RayJob (the fallback CronJob)
        md = {"generateName": f"{name}-", **{k: v for k, v in md.items() if k != "name"}}
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": md,
           "spec": rayjob_spec(stage, launch, config_map_name(launch, stage), extra_args)}
    return [*_config_docs(stage, launch, recipe), job]


def _require_schedule(launch: LaunchConfig) -> str:
    if not launch.schedule:
        raise RenderError("a scheduled job needs `schedule` in the launch config "
                          "(e.g. schedule: '0 3 * * 0'), or --set schedule=...")
    return launch.schedule


def raycronjob(stage: str, launch: LaunchConfig, recipe: StageRecipe | None,
               extra_args: list[str] | None = None) -> list[Doc]:
    """A KubeRay RayCronJob (alpha: the operator needs the ``RayCronJob`` feature gate)."""
    check_fit(recipe, launch)
    spec: Doc = {"schedule": _require_schedule(launch),
                 "jobTemplate": rayjob_spec(stage, launch, config_map_name(launch, stage),
                                            extra_args)}
    if launch.time_zone:
        spec["timeZone"] = launch.time_zone
    cron = {"apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": meta(launch, launch.object_name(stage), stage), "spec": spec}
    return [*_config_docs(stage, launch, recipe), cron]


LAUNCHER = "fusedist-launcher"


def rbac(launch: LaunchConfig) -> list[Doc]:
    """Least privilege for the fallback CronJob: create/read RayJobs in one namespace only."""
    sa = {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": meta(launch, LAUNCHER, "launcher")}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta(launch, LAUNCHER, "launcher"),
            "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                       "verbs": ["create", "get", "list", "watch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": meta(launch, LAUNCHER, "launcher"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": LAUNCHER},
               "subjects": [{"kind": "ServiceAccount", "name": LAUNCHER,
                             "namespace": launch.namespace}]}
    return [sa, role, binding]


def cronjob_fallback(stage: str, launch: LaunchConfig, recipe: StageRecipe | None,
                     extra_args: list[str] | None = None, with_rbac: bool = True) -> list[Doc]:
    """A plain CronJob that ``kubectl create``s a RayJob per run (no RayCronJob gate needed)."""
    schedule = _require_schedule(launch)
    job_doc = rayjob(stage, launch, None, extra_args, generate_name=True)[-1]
    name = f"{launch.object_name(stage)}-cron"
    template_cm = {"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": meta(launch, f"{name}-rayjob", stage),
                   "data": {"rayjob.yaml": dump_doc(job_doc)}}
    c = {"name": "create-rayjob", "image": launch.kubectl_image,
         "imagePullPolicy": launch.image_pull_policy,
         "command": ["kubectl", "create", "-f", "/etc/fusedist/rayjob/rayjob.yaml"],
         # kubectl keeps a discovery cache under $HOME; the root filesystem may be read-only.
         "env": [{"name": "HOME", "value": "/tmp"}],
         "resources": resources("100m", "128Mi"), "securityContext": container_security(),
         "volumeMounts": [{"name": "rayjob", "mountPath": "/etc/fusedist/rayjob",
                           "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]}
    pod = {"serviceAccountName": LAUNCHER, "automountServiceAccountToken": True,
           "restartPolicy": "Never", "securityContext": pod_security(), "containers": [c],
           "volumes": [{"name": "rayjob", "configMap": {"name": f"{name}-rayjob"}},
                       {"name": "tmp", "emptyDir": {}}]}
    spec: Doc = {"schedule": schedule, "concurrencyPolicy": "Forbid",
                 "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
                 "jobTemplate": {"spec": {"backoffLimit": 1, "template": {
                     "metadata": {"labels": labels(launch, "launcher")}, "spec": pod}}}}
    if launch.time_zone:
        spec["timeZone"] = launch.time_zone
    cron = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta(launch, name, stage),
            "spec": spec}
    return [*(rbac(launch) if with_rbac else []), *_config_docs(stage, launch, recipe),
            template_cm, cron]


def raycluster(launch: LaunchConfig, name: str = "fusedist") -> list[Doc]:
    """A long-lived RayCluster for interactive use (``fusedist launch`` via the Jobs API)."""
    return [{"apiVersion": "ray.io/v1", "kind": "RayCluster",
             "metadata": meta(launch, name, "interactive"),
             "spec": cluster_spec(launch, None)}]


def mlflow_server(launch: LaunchConfig) -> list[Doc]:
    """MLflow tracking server: PostgreSQL backend (URL from a Secret), S3 artifacts, proxied."""
    m, ns = launch.mlflow_server, launch.namespace
    # MLflow 3 rejects Host headers it does not know (DNS-rebinding guard): list the Service's.
    hosts = [m.name, f"{m.name}.{ns}", f"{m.name}.{ns}.svc", f"{m.name}.{ns}.svc.cluster.local"]
    allowed = ",".join(hosts + [f"{h}:{m.port}" for h in hosts] + ["localhost:*"])
    env = [{"name": k, "value": v} for k, v in sorted(launch.env.items())
           if k.startswith("AWS_")]
    if "AWS_ENDPOINT_URL" in launch.env:
        env.append({"name": "MLFLOW_S3_ENDPOINT_URL", "value": launch.env["AWS_ENDPOINT_URL"]})
    env.append(secret_env(MLFLOW_DB_KEY, launch.secrets.mlflow_db, MLFLOW_DB_KEY))
    if launch.secrets.s3:
        env += [secret_env(k, launch.secrets.s3, k) for k in S3_KEYS]
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    c = {"name": "mlflow", "image": launch.image, "imagePullPolicy": launch.image_pull_policy,
         "command": ["mlflow", "server"],
         # $(VAR) is expanded by the kubelet from the Secret-backed env: no literal URL here.
         "args": ["--backend-store-uri", f"$({MLFLOW_DB_KEY})",
                  "--artifacts-destination", m.artifacts_destination, "--serve-artifacts",
                  "--host", "0.0.0.0", "--port", str(m.port), "--workers", str(m.workers),
                  "--allowed-hosts", allowed],
         "env": env, "ports": [{"name": "http", "containerPort": m.port}],
         "readinessProbe": probe, "livenessProbe": {**probe, "initialDelaySeconds": 30},
         "resources": resources(m.cpus, m.memory), "securityContext": container_security(),
         "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    sel = {"app.kubernetes.io/name": "fusedist", "app.kubernetes.io/component": "mlflow"}
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": meta(launch, m.name, "mlflow"),
              "spec": {"replicas": 1, "selector": {"matchLabels": sel}, "template": {
                  "metadata": {"labels": labels(launch, "mlflow")},
                  "spec": {"automountServiceAccountToken": False,
                           "securityContext": pod_security(), "containers": [c],
                           "volumes": [{"name": "tmp", "emptyDir": {}}]}}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": meta(launch, m.name, "mlflow"),
           "spec": {"selector": sel, "ports": [{"name": "http", "port": m.port,
                                                "targetPort": "http"}]}}
    return [deploy, svc]


def namespace(launch: LaunchConfig) -> list[Doc]:
    # warn/audit (not enforce) "restricted": KubeRay may inject helper containers we do not own.
    pss = {f"pod-security.kubernetes.io/{m}": "restricted" for m in ("warn", "audit")}
    return [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": launch.namespace,
                          "labels": {**labels(launch, "namespace"), **pss}}}]


KINDS = ("rayjob", "raycronjob", "cronjob", "raycluster", "mlflow", "rbac")


def render(kind: str, stage: str, launch: LaunchConfig, recipe: StageRecipe | None,
           extra_args: list[str] | None = None) -> list[Doc]:
    """The objects for one ``fusedist launch render`` call."""
    if kind == "rayjob":
        return rayjob(stage, launch, recipe, extra_args)
    if kind == "raycronjob":
        return raycronjob(stage, launch, recipe, extra_args)
    if kind == "cronjob":
        return cronjob_fallback(stage, launch, recipe, extra_args)
    if kind == "raycluster":
        return raycluster(launch)
    if kind == "mlflow":
        return mlflow_server(launch)
    if kind == "rbac":
        return rbac(launch)
    raise RenderError(f"unknown kind '{kind}' (one of: {', '.join(KINDS)})")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (config files inside ConfigMaps) as readable ``|`` blocks; no
    ``&id001`` anchors for pieces we reuse (kubectl handles them, humans less so)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_representer(str, _str)


def dump_doc(doc: Doc) -> str:
    # A wide line limit: folded entrypoints and host lists are harder to read and grep.
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=4096)


def to_yaml(docs: list[Doc], header: str = "") -> str:
    body = "---\n".join(dump_doc(d) for d in docs)
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()] if header else []
    return ("\n".join(lines) + "\n" if lines else "") + "---\n" + body
