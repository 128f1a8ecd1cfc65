"""``fusedist doctor``: is this machine (or pod) ready to run the stages?

Each check returns OK / WARN / FAIL with what it saw and, unless OK, how to fix it. Nothing
secret is ever printed: credentials are reported by *source* ("env AWS_ACCESS_KEY_ID set"),
and every detail passes through the same masking as MLflow params. The exit status is 0 unless
a check FAILs (WARN is for things only some stages need, e.g. a GPU).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from fusedist import storage
from fusedist.secrets import mask_text
from fusedist.tracking import TrackingError, check_reachable, default_tracking_uri

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class DoctorOptions:
    ray_address: str | None = None
    s3_url: str | None = None
    s3_endpoint: str | None = None
    mlflow_uri: str | None = None
    min_free_gb: float = 20.0
    timeout: float = 3.0


# ----------------------------------------------------------------------------- checks

def check_torch(_: DoctorOptions) -> Check:
    try:
        import torch
    except Exception as e:  # a broken CUDA build raises more than ImportError
        return Check("torch", FAIL, f"cannot import torch: {e}",
                     "install it: `make venv` (CPU) or a CUDA build of torch on GPU nodes")
    if not torch.cuda.is_available():
        return Check("torch/CUDA", WARN, f"torch {torch.__version__}, no CUDA GPU visible",
                     "fine for CPU stages and tests; GPU stages need a CUDA build of torch and "
                     "a visible GPU (nvidia.com/gpu limit on Kubernetes)")
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return Check("torch/CUDA", OK, f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                 f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}")


def check_deepspeed(_: DoctorOptions) -> Check:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        accel = get_accelerator()._name
    except Exception as e:
        return Check("deepspeed", FAIL, f"cannot import deepspeed: {e}",
                     "pip install deepspeed (distill needs it)")
    detail = f"deepspeed {deepspeed.__version__}, accelerator {accel}"
    # Like ds_report: ops are JIT-built on first use, which needs a C++ compiler and ninja.
    missing = [t for t in ("g++", "ninja") if shutil.which(t) is None]
    if missing:
        return Check("deepspeed", WARN, f"{detail}; {', '.join(missing)} not on PATH",
                     "install g++ and ninja (JIT-built ops), or use `torch_adam` optimisers")
    return Check("deepspeed", OK, f"{detail}; g++ and ninja found (ops build on first use)")


def check_openslide(_: DoctorOptions) -> Check:
    try:
        import openslide
    except Exception as e:
        return Check("openslide", FAIL, f"cannot import openslide: {e}",
                     "pip install openslide-python openslide-bin")
    return Check("openslide", OK, f"openslide-python {openslide.__version__}, library "
                 f"{openslide.__library_version__}")


def _tcp(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection opens, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e)


def check_ray(opts: DoctorOptions) -> Check:
    try:
        import ray
    except Exception as e:
        return Check("ray", FAIL, f"cannot import ray: {e}", "pip install 'ray[default]'")
    address = opts.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        import ray.dashboard.modules.job.sdk  # noqa: F401  (needs ray[default])
        jobs = "Jobs API client available"
    except Exception:
        jobs = "no Jobs API client (install ray[default] for `fusedist launch`)"
    if not address or address == "auto":
        return Check("ray", OK, f"ray {ray.__version__}; stages start a local Ray "
                     f"({os.cpu_count()} CPUs); {jobs}")
    u = urlparse(address if "://" in address else f"tcp://{address}")
    port = u.port or (8265 if u.scheme.startswith("http") else 6379)
    err = _tcp(u.hostname or "127.0.0.1", port, opts.timeout)
    where = f"{u.hostname}:{port}"
    if err:
        return Check("ray", FAIL, f"ray {ray.__version__}; cluster {where} unreachable: {err}",
                     "start the head (`ray start --head`), port-forward it, or fix RAY_ADDRESS")
    return Check("ray", OK, f"ray {ray.__version__}; cluster {where} answers; {jobs}")


def credential_source() -> str | None:
    """Where boto3 would get S3 credentials from (never the credentials themselves)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return "env AWS_ACCESS_KEY_ID set"
    try:
        import boto3

        creds = boto3.session.Session().get_credentials()
    except Exception:
        return None
    return f"boto3 chain ({creds.method})" if creds is not None else None


def check_s3(opts: DoctorOptions) -> Check:
    endpoint = opts.s3_endpoint or storage.endpoint_url()
    source = credential_source()
    where = endpoint or "AWS default endpoint"
    if not opts.s3_url and not endpoint:
        if source:
            return Check("s3", OK, f"credentials: {source}; {where} (not probed: pass --s3 "
                         "s3://bucket/prefix to probe)")
        return Check("s3", WARN, "no S3 endpoint or credentials configured",
                     "only s3:// URLs need them: set AWS_ENDPOINT_URL and the credentials "
                     "(env, profile, IRSA or a Kubernetes Secret)")
    if not source:
        return Check("s3", FAIL, f"{where}: no credentials found",
                     "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (a Kubernetes Secret in pods), "
                     "a profile or IRSA")
    return _probe_s3(opts, endpoint, where, source)


def _probe_s3(opts: DoctorOptions, endpoint: str | None, where: str, source: str) -> Check:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    cfg = Config(connect_timeout=opts.timeout, read_timeout=opts.timeout,
                 retries={"total_max_attempts": 1})
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg,
                                             region_name=os.environ.get("AWS_DEFAULT_REGION",
                                                                        "us-east-1"))
    bucket = urlparse(opts.s3_url).netloc if opts.s3_url else None
    try:
        if bucket:
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        else:
            client.list_buckets()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "?")
        return Check("s3", FAIL, f"{where} answered {code} (credentials: {source})",
                     "check the bucket name and that the credentials may list it")
    except (BotoCoreError, OSError) as e:
        return Check("s3", FAIL, f"cannot reach the S3 endpoint {where}: {type(e).__name__} "
                     f"(credentials: {source})",
                     "check AWS_ENDPOINT_URL / storage.endpoint_url and the network path")
    target = f"bucket {bucket}" if bucket else "list buckets"
    return Check("s3", OK, f"{where}: {target} ok (credentials: {source})")


def check_mlflow(opts: DoctorOptions) -> Check:
    uri = opts.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    source = "--mlflow-uri" if opts.mlflow_uri else "env MLFLOW_TRACKING_URI"
    auth = [k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN") if os.environ.get(k)]
    auth_note = f"; auth: env {', '.join(auth)} set" if auth else ""
    if not uri:
        return Check("mlflow", OK, f"local store {default_tracking_uri()} (the default)")
    if uri.startswith(("http://", "https://")):
        try:
            check_reachable(uri, source, timeout=opts.timeout)
        except TrackingError as e:
            return Check("mlflow", FAIL, str(e).split(" (tracking URI")[0] + f": {uri}",
                         "start the server or fix MLFLOW_TRACKING_URI; or mlflow.enabled=false")
        return Check("mlflow", OK, f"server {uri} answers{auth_note}")
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        probe = folder if folder.exists() else folder.parent
        if os.access(probe, os.W_OK):
            return Check("mlflow", OK, f"SQLite store {uri} (one writer process at a time)")
        return Check("mlflow", FAIL, f"SQLite store {uri}: {probe} is not writable",
                     "point MLFLOW_TRACKING_URI at a writable folder")
    return Check("mlflow", OK, f"tracking URI {uri} (not probed)")


def _free(path: Path) -> tuple[Path, float]:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return path, shutil.disk_usage(p).free / 1e9


def check_disk(opts: DoctorOptions) -> Check:
    places = [storage.cache_dir(), Path(tempfile.gettempdir())]
    free = [_free(p) for p in places]
    detail = "; ".join(f"{p}: {gb:.1f} GB free" for p, gb in free)
    worst = min(gb for _, gb in free)
    if worst < 1.0:
        return Check("disk", FAIL, detail, "free space (slide copies and Ray spill go here) or "
                     "set FUSEDIST_CACHE / TMPDIR to a larger volume")
    if worst < opts.min_free_gb:
        return Check("disk", WARN, detail, f"under {opts.min_free_gb:g} GB: large slides and "
                     "object spilling may run out; set FUSEDIST_CACHE / TMPDIR elsewhere")
    return Check("disk", OK, detail)


def check_kubectl(_: DoctorOptions) -> Check:
    path = shutil.which("kubectl")
    if path:
        return Check("kubectl", OK, f"{path} (for `fusedist launch render --apply`)")
    return Check("kubectl", WARN, "kubectl not on PATH",
                 "only `fusedist launch render --apply` needs it; install kubectl")


CHECKS: list[Callable[[DoctorOptions], Check]] = [
    check_torch, check_deepspeed, check_openslide, check_ray, check_s3, check_mlflow,
    check_disk, check_kubectl]


def run_checks(opts: DoctorOptions) -> list[Check]:
    out = []
    for fn in CHECKS:
        try:
            c = fn(opts)
        except Exception as e:  # a check must never crash the doctor
            c = Check(fn.__name__.removeprefix("check_"), FAIL, f"check crashed: {e}",
                      "report this as a bug")
        out.append(Check(c.name, c.status, mask_text(c.detail), mask_text(c.fix)))
    return out


def format_table(checks: list[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = [f"{'CHECK':<{w}}  STATUS  DETAIL", f"{'-' * w}  ------  ------"]
    for c in checks:
        lines.append(f"{c.name:<{w}}  {c.status:<6}  {c.detail}")
        if c.fix and c.status != OK:
            lines.append(f"{'':<{w}}          fix: {c.fix}")
    n_fail = sum(c.status == FAIL for c in checks)
    n_warn = sum(c.status == WARN for c in checks)
    lines.append(f"\n{len(checks)} checks: {len(checks) - n_fail - n_warn} OK, {n_warn} WARN, "
                 f"{n_fail} FAIL")
    return "\n".join(lines)


def exit_status(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0
