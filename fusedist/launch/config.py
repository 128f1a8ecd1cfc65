"""Typed launch settings: how a stage runs on Kubernetes (KubeRay) — ``configs/launch/*.yaml``.

A launch config says *where and with what* a stage runs (image, namespace, the GPU worker
group, autoscaling bounds, schedule, which Secrets hold credentials); the stage's own recipe
(``configs/<stage>/*.yaml``) says *what* it computes. Credentials never appear here: only the
names of Kubernetes Secrets, which pods read by reference.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fusedist.config import StrictModel

# Kubernetes names: DNS-1123 labels (namespaces, container/port names) and subdomains (objects).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A Kubernetes resource quantity such as 16Gi, 500m, 1.5, 64G.
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE])?$"
# Env var names that hold credentials: they may only come from a Secret, never from a config.
CREDENTIAL_ENV_RE = re.compile(
    r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY|SESSION)",
    re.IGNORECASE)
_CRON_ITEM = r"(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?"  # *, 5, 1-5, MON, */15
_CRON_FIELD = rf"{_CRON_ITEM}(,{_CRON_ITEM})*"
_CRON_RE = re.compile(rf"^{_CRON_FIELD}( {_CRON_FIELD}){{4}}$")
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


class Toleration(StrictModel):
    """A pod toleration (lets worker pods land on tainted GPU nodes)."""

    key: str
    """Taint key, e.g. ``nvidia.com/gpu``."""

    operator: Literal["Exists", "Equal"] = "Exists"
    """``Exists`` matches any value; ``Equal`` needs ``value``."""

    value: str | None = None
    """Taint value for ``operator: Equal``."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"
    """Taint effect to tolerate; ``null`` tolerates every effect."""


def _gpu_toleration() -> list[Toleration]:
    return [Toleration(key="nvidia.com/gpu")]


class HeadConfig(StrictModel):
    """The Ray head pod. It schedules no work (``num-cpus: "0"``): only GCS, dashboard, drivers."""

    cpus: int = Field(4, gt=0)
    """CPU request = limit of the head pod (GCS, dashboard, the job's driver)."""

    memory: str = Field("16Gi", pattern=QUANTITY)
    """Memory request = limit of the head pod (Kubernetes quantity, e.g. ``16Gi``)."""

    shm_size: str = Field("2Gi", pattern=QUANTITY)
    """Size of the memory-backed ``/dev/shm`` (Ray's object store lives there)."""


class WorkerGroup(StrictModel):
    """The worker group that does the stage's work (GPU nodes for cache/embed/distill)."""

    name: str = Field("gpu", pattern=DNS_LABEL)
    """Worker group name (``groupName``)."""

    gpus: int = Field(8, ge=0)
    """GPUs per worker pod (``<gpu_resource>`` limit); 0 = a CPU-only group (e.g. tiling)."""

    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource name of the GPUs (the device plugin's)."""

    cpus: int = Field(96, gt=0)
    """CPU request = limit per worker pod."""

    memory: str = Field("900Gi", pattern=QUANTITY)
    """Memory request = limit per worker pod."""

    shm_size: str = Field("64Gi", pattern=QUANTITY)
    """Size of the memory-backed ``/dev/shm`` (object store, NCCL, DataLoader workers)."""

    min_replicas: int = Field(0, ge=0)
    """Fewest worker pods (the autoscaler never goes below)."""

    max_replicas: int = Field(3, ge=1)
    """Most worker pods (the autoscaler never goes above)."""

    replicas: int | None = Field(None, ge=0)
    """Worker pods at start; default ``min_replicas``."""

    node_selector: dict[str, str] = {}
    """Node labels worker pods must match, e.g.
    ``{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}``."""

    tolerations: list[Toleration] = Field(default_factory=_gpu_toleration)
    """Tolerations of the worker pods; default tolerates the ``nvidia.com/gpu`` taint."""

    @model_validator(mode="after")
    def _bounds(self) -> "WorkerGroup":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"workers.min_replicas ({self.min_replicas}) is above "
                             f"workers.max_replicas ({self.max_replicas}); lower it or raise max")
        if self.replicas is not None and not (self.min_replicas <= self.replicas
                                              <= self.max_replicas):
            raise ValueError(f"workers.replicas ({self.replicas}) must lie within "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, "
                             f"{self.max_replicas}]")
        return self

    @property
    def start_replicas(self) -> int:
        return self.min_replicas if self.replicas is None else self.replicas


class SecretRefs(StrictModel):
    """Names of the Kubernetes Secrets pods read credentials from (by reference only).

    Create them with ``kubectl create secret generic`` (never commit their values); ``null``
    leaves a credential out (e.g. S3 through IRSA / workload identity).
    """

    s3: str | None = Field("fusedist-s3", pattern=DNS_SUBDOMAIN)
    """Secret with keys ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``."""

    mlflow: str | None = Field("fusedist-mlflow", pattern=DNS_SUBDOMAIN)
    """Secret with optional keys ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` /
    ``MLFLOW_TRACKING_TOKEN`` (an MLflow server behind auth)."""

    mlflow_db: str = Field("fusedist-mlflow-db", pattern=DNS_SUBDOMAIN)
    """Secret with key ``MLFLOW_BACKEND_STORE_URI``: the tracking server's PostgreSQL URL
    (``postgresql://user:password@host:5432/mlflow``)."""

    hf: str | None = Field(None, pattern=DNS_SUBDOMAIN)
    """Secret with key ``HF_TOKEN`` (model hub access), if the cluster may reach the hub."""


class ModelVolume(StrictModel):
    """A PersistentVolumeClaim with encoder weights, mounted read-only into the pods."""

    claim_name: str = Field(pattern=DNS_SUBDOMAIN)
    """Name of the PVC holding the weights."""

    mount_path: str = "/models"
    """Where the weights appear (recipes refer to e.g. ``/models/uni2-h/pytorch_model.bin``)."""


class MlflowServer(StrictModel):
    """The in-cluster MLflow tracking server (``k8s/mlflow.yaml``)."""

    name: str = Field("fusedist-mlflow", pattern=DNS_LABEL)
    """Deployment and Service name; clients use ``http://<name>.<namespace>.svc:<port>``."""

    artifacts_destination: str = Field("s3://fusedist-mlflow/artifacts", pattern=r"^s3://")
    """Where the server stores artifacts; clients upload through the server (no S3 creds)."""

    port: int = Field(5000, gt=0, lt=65536)
    """Port of the server and its Service."""

    workers: int = Field(2, gt=0)
    """Server worker processes."""

    cpus: int = Field(2, gt=0)
    """CPU request = limit."""

    memory: str = Field("4Gi", pattern=QUANTITY)
    """Memory request = limit."""


class LaunchConfig(StrictModel):
    """How a stage runs on Kubernetes through KubeRay (RayJob / RayCronJob / CronJob)."""

    stage: str | None = None
    """Default stage for ``fusedist launch render`` (``tile``, ``cache``, ``distill``...)."""

    recipe: str | None = None
    """Default stage recipe (``configs/<stage>/*.yaml``) for ``fusedist launch render``."""

    name: str | None = Field(None, pattern=DNS_LABEL, max_length=40)
    """Base name of the rendered objects; default ``fusedist-<stage>``. Kept short: KubeRay
    derives longer Service and Pod names from it."""

    namespace: str = Field("fusedist", pattern=DNS_LABEL)
    """Namespace of every rendered object."""

    image: str = "fusedist:0.1.0"
    """Container image with fusedist and Ray (built from ``launch/Dockerfile``)."""

    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """When nodes pull the image."""

    ray_version: str = "2.60.0"
    """Ray version inside the image (KubeRay's ``rayVersion``)."""

    ray_auth: Literal["token", "disabled"] = "token"
    """Ray token authentication; ``token`` makes KubeRay create and wire the token Secret."""

    head: HeadConfig = Field(default_factory=HeadConfig)
    """The head pod."""

    workers: WorkerGroup = Field(default_factory=WorkerGroup)
    """The worker group."""

    autoscaling: bool = True
    """Ray's in-tree autoscaler scales workers within ``[min_replicas, max_replicas]``."""

    idle_timeout_seconds: int = Field(60, ge=0)
    """Seconds an idle worker pod lives before the autoscaler removes it."""

    env: dict[str, str] = {}
    """Non-secret environment for every pod (``AWS_ENDPOINT_URL``, ``MLFLOW_TRACKING_URI``...).
    Credential-looking names are refused: put those in a Secret (``secrets``)."""

    secrets: SecretRefs = Field(default_factory=SecretRefs)
    """Secrets the pods read credentials from."""

    model_volume: ModelVolume | None = None
    """A PVC with encoder weights, mounted read-only into head and workers."""

    ttl_seconds_after_finished: int = Field(3600, ge=0)
    """Seconds a finished RayJob's cluster stays (for logs) before KubeRay deletes it."""

    backoff_limit: int = Field(0, ge=0)
    """Times KubeRay retries a failed RayJob on a fresh cluster (resumable stages can use 1-2)."""

    submitter_backoff_limit: int = Field(2, ge=0)
    """Retries of the submitter pod that runs ``ray job submit``."""

    extra_args: list[str] = []
    """Words appended to the job's entrypoint as shell text (the Jobs API runs it through a
    shell on the head), e.g. ``[--run-name, "retrain-$(date -u +%Y%m%d)"]`` so each scheduled
    run trains afresh instead of resuming the last one."""

    active_deadline_seconds: int | None = Field(None, gt=0)
    """Kill the RayJob after this many seconds (none: no deadline)."""

    schedule: str | None = None
    """Cron schedule for retraining (``0 3 * * 0`` = Sundays 03:00); renders a RayCronJob
    (alpha, KubeRay feature gate ``RayCronJob``) or the fallback CronJob."""

    time_zone: str | None = None
    """IANA time zone of ``schedule`` (e.g. ``Europe/Berlin``); default the controller's (UTC)."""

    kubectl_image: str = "registry.k8s.io/kubectl:v1.34.1"
    """Image of the fallback CronJob that creates RayJobs with ``kubectl create``."""

    mlflow_server: MlflowServer = Field(default_factory=MlflowServer)
    """The in-cluster MLflow server."""

    labels: dict[str, str] = {}
    """Extra labels on every object (e.g. ``{team: pathology}``)."""

    @field_validator("env")
    @classmethod
    def _no_credentials_in_env(cls, env: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in env if CREDENTIAL_ENV_RE.search(k))
        if bad:
            raise ValueError(f"{', '.join(bad)} look(s) like credentials: never put them in a "
                             "config; name a Kubernetes Secret under `secrets` instead")
        for k, v in env.items():
            if re.search(r"://[^/@\s]*:[^/@\s]+@", v):
                raise ValueError(f"env {k} embeds a password in a URL; give the credentials "
                                 "through a Secret (secrets.*) instead")
        return env

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = " ".join(v.split())
        if v not in _CRON_MACROS and not _CRON_RE.match(v):
            raise ValueError(f"'{v}' is not a cron schedule: give 5 fields 'minute hour "
                             "day-of-month month day-of-week' (e.g. '0 3 * * 0') or @weekly")
        return v

    def object_name(self, stage: str) -> str:
        return self.name or f"fusedist-{stage}"
