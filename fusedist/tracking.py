"""MLflow tracking used by every stage: one run per stage, logged from rank 0 only.

``start_run(cfg, run_name, params)`` returns a :class:`Tracker` context manager. Ranks other
than 0, and a disabled config, get a no-op tracker with the same methods, so stage code never
branches on rank. Where runs go (``MlflowConfig.tracking_uri``):

- ``None`` and no ``MLFLOW_TRACKING_URI``: a local SQLite store ``./mlruns/mlflow.db`` with
  artifacts in ``./mlruns/artifacts`` (a SQLite store has no artifact root of its own, and
  MLflow's fallback would scatter experiment folders into the working directory).
- ``http(s)://host:port``: an ``mlflow server``; one that does not answer fails at start within
  seconds, with a message that says how to fix it (no minutes of client retries).

Secrets never reach MLflow: params, tags, text and dict artifacts pass through :func:`redact`,
which masks secret-named keys, credential-shaped values, the values of secret environment
variables and passwords inside URLs. Environment variables themselves are never logged.

Lineage: :meth:`Tracker.log_datasets` lists the data a run read and wrote as MLflow datasets
(:mod:`fusedist.lineage` builds them: tile and feature manifests, bag folders, labels).

A run that uses random weights (no model hub is reachable here) says so: call
:func:`warn_random_weights`, which logs a WARNING and sets the tags of
:func:`random_weights_tag` (``fusedist.random_weights=true`` plus the model names).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from pydantic import BaseModel, Field

from fusedist.config import StrictModel
# The one masking helper (shared with storage); re-exported here for its long-time callers.
from fusedist.secrets import MASK, SECRET_KEY_RE, env_snapshot, mask_text, redact  # noqa: F401
from fusedist.lineage import dataset_inputs

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_TAG = "fusedist.random_weights"
RANDOM_WEIGHTS_MODELS_TAG = "fusedist.random_weights.models"
# Seconds to wait for an http(s) tracking server before giving up at start.
REACHABILITY_TIMEOUT_S = 5.0
# MLflow 3's limits (mlflow.utils.validation); longer values are rejected, not cut.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250



class TrackingError(RuntimeError):
    """MLflow cannot be used as configured; the message names the (masked) URI and a fix."""


class MlflowConfig(StrictModel):
    """Where and how a stage logs its run to MLflow."""

    enabled: bool = True
    """Log to MLflow. ``false``: every tracking call is a no-op (nothing is written)."""

    tracking_uri: str | None = None
    """``http(s)://host:port`` of an ``mlflow server``, or a store URI (``sqlite:///...``).
    Default: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<abs ./mlruns>/mlflow.db`` with
    artifacts in ``./mlruns/artifacts``. Put credentials in ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD``, never here."""

    experiment: str = "fusedist"
    """MLflow experiment name; created on first use."""

    run_name: str | None = None
    """Run name; default: the stage's own name (e.g. ``tile``)."""

    tags: dict[str, str] = {}
    """Extra tags on every run (e.g. ``{team: pathology}``); they win over the stage's tags."""

    system_metrics: bool = True
    """Log MLflow system metrics (``system/cpu_utilization_percentage``, memory, disk, network;
    ``system/gpu_<i>_utilization_percentage`` and GPU memory when ``nvidia-ml-py`` is
    installed) while the run is open. ``distill`` samples on its training nodes, the other
    stages on the driver's machine."""

    system_metrics_interval: float = Field(10.0, gt=0)
    """Seconds between system-metric samples (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    wins); a run shorter than one interval logs none."""


def _clip(value: str, limit: int) -> str:
    suffix = "...[truncated]"
    return value if len(value) <= limit else value[:limit - len(suffix)] + suffix


def _key(name: str) -> str:
    """A valid MLflow param/metric/tag key (letters, digits, ``_ - . / : space``)."""
    return re.sub(r"[^\w.\-/: ]", "_", name).strip("/")[:MAX_KEY_LENGTH] or "_"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return _clip(text, MAX_PARAM_VAL_LENGTH)


def flatten_params(params: dict | BaseModel | None, prefix: str = "") -> dict[str, str]:
    """Redacted params as dotted keys (``storage.endpoint_url``) with MLflow-sized values."""
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        else:
            out[_key(path)] = _param_value(node)

    walk(redact(params or {}), prefix)
    return out


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    """Redacted tags with valid keys and MLflow-sized values."""
    return {_key(str(k)): _clip(str(v), MAX_TAG_VAL_LENGTH)
            for k, v in redact({str(k): str(v) for k, v in tags.items()}).items()}


# ----------------------------------------------------------------------------- URIs

def default_tracking_uri(cwd: Path | None = None) -> str:
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlruns' / 'mlflow.db'}"


def resolve_tracking_uri(cfg: MlflowConfig) -> tuple[str, str]:
    """(URI, where it came from) for messages: config, env or the local default."""
    if cfg.tracking_uri:
        return cfg.tracking_uri, "mlflow.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "env MLFLOW_TRACKING_URI"
    return default_tracking_uri(), "the local default"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve()


def _artifact_location(uri: str) -> str | None:
    """Artifact root for new experiments: beside a SQLite file; servers choose their own."""
    db = _sqlite_path(uri)
    return (db.parent / "artifacts").as_uri() if db else None


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def _fix_hint(masked: str, source: str) -> str:
    return (f"(tracking URI {masked} from {source}). Fix: start the server, e.g. `mlflow server "
            "--backend-store-uri sqlite:///$PWD/mlruns/mlflow.db --artifacts-destination "
            "$PWD/mlruns/artifacts --host 127.0.0.1 --port 5000`; or point mlflow.tracking_uri "
            "(or MLFLOW_TRACKING_URI) at a running server; or set mlflow.enabled=false to run "
            "without tracking.")


def check_reachable(uri: str, source: str = "mlflow.tracking_uri",
                    timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds if an http(s) tracking server does not answer.

    MLflow's client retries 7 times with backoff (minutes) before reporting a dead server; one
    quick request up front turns that into an immediate, actionable error.
    """
    import requests

    masked = mask_text(uri)
    try:
        resp = requests.get(uri.rstrip("/") + "/health", timeout=(timeout, timeout))
    except requests.Timeout:
        reason = f"no answer within {timeout:g} s"
    except requests.RequestException as e:
        reason = f"cannot connect ({mask_text(str(_root_cause(e)))})"
    else:
        # Any answer (even 401/404 from an auth proxy) means someone is there; a gateway error
        # means the proxy is up but the MLflow server behind it is not.
        if resp.status_code not in (502, 503, 504):
            return
        reason = f"the server answered HTTP {resp.status_code}"
    raise TrackingError(f"MLflow tracking server is unreachable: {reason} "
                        f"{_fix_hint(masked, source)}")


# ----------------------------------------------------------------------------- tracker

_ACTIVE: list["Tracker"] = []  # open real runs in this process, innermost last (for nested=)


class Tracker:
    """One MLflow run. Inactive (``run_id is None``) on ranks != 0 and when disabled: every
    method is then a no-op, so callers never check the rank themselves."""

    def __init__(self, client: Any = None, run_id: str | None = None,
                 tracking_uri: str | None = None, rank: int = 0) -> None:
        self._client = client
        self._run_id = run_id
        self.tracking_uri = tracking_uri
        self.rank = rank
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor, while one samples

    @classmethod
    def noop(cls, rank: int = 0) -> "Tracker":
        return cls(rank=rank)

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def active(self) -> bool:
        return self._run_id is not None

    def log_params(self, params: dict | BaseModel) -> None:
        """Flattened (dotted keys), redacted params with values cut to MLflow's 6000 chars."""
        if not self.active:
            return
        from mlflow.entities import Param

        # One call: MlflowClient.log_batch itself splits into MLflow's per-request limits
        # (100 params/tags, 1000 metrics), so 1000-key configs are fine.
        items = [Param(k, v) for k, v in flatten_params(params).items()]
        if items:
            self._client.log_batch(self._run_id, params=items)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_key(k), float(v), now, int(step or 0))
                 for k, v in metrics.items() if v is not None]
        if items:
            self._client.log_batch(self._run_id, metrics=items)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory as is (the caller vouches that it holds no secrets)."""
        if not self.active:
            return
        if Path(local_path).is_dir():
            self._client.log_artifacts(self._run_id, str(local_path), artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self._client.log_text(self._run_id, mask_text(text), artifact_file)

    def log_dict(self, data: dict | BaseModel, artifact_file: str) -> None:
        """A redacted JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact."""
        if self.active:
            self._client.log_dict(self._run_id, redact(data), artifact_file)

    def log_datasets(self, refs: Iterable[Any]) -> None:
        """Lineage: list ``refs`` (:class:`fusedist.lineage.DataRef`, built by its ``*_ref``
        helpers) among the run's inputs as MLflow datasets, each with its manifest's digest,
        its credential-free URL as source and its role (``input``/``output``) as context."""
        if not self.active:
            return

        if inputs := dataset_inputs(refs):
            self._client.log_inputs(self._run_id, datasets=inputs)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in _tags(tags).items()])

    def start_system_metrics(self, interval: float = 10.0, node_id: str | None = None) -> bool:
        """Sample ``system/*`` metrics into this run every ``interval`` seconds on a daemon
        thread until :meth:`stop_system_metrics` (or :meth:`end`). This is MLflow's own
        ``SystemMetricsMonitor``, what ``mlflow.start_run(log_system_metrics=True)`` starts for
        the fluent API, given our run id and tracking URI. ``node_id`` names the machine
        (``system/<node_id>/...``) when several sample into one run. Steps continue after the
        run's last system step, so a resumed run does not overwrite its history. Returns
        whether sampling started: without psutil it warns instead of failing the stage."""
        if not self.active or self._monitor is not None:
            return False
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:  # psutil is imported by MLflow's CPU monitor
            log.warning("MLflow system metrics are off: %s (pip install psutil; "
                        "nvidia-ml-py adds GPU metrics)", e)
            return False
        # mlflow logs its start/stop at INFO on every run; keep our stages' output readable.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._monitor = SystemMetricsMonitor(self._run_id, sampling_interval=interval,
                                             resume_logging=True, node_id=node_id,
                                             tracking_uri=self.tracking_uri)
        self._monitor.start()
        return True

    def stop_system_metrics(self) -> None:
        """Stop sampling and flush what was sampled (no-op when none runs). Idempotent."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.finish()
            except Exception:  # monitoring must never fail the stage it watches
                log.warning("could not stop MLflow system metrics", exc_info=True)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED / FAILED / KILLED. Idempotent."""
        self.stop_system_metrics()  # flushed while the run is still RUNNING
        if not self.active:
            return
        run_id, self._run_id = self._run_id, None
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._client.set_terminated(run_id, status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        status = ("FINISHED" if exc_type is None else
                  "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        try:
            self.end(status)
        except Exception:
            if exc_type is None:
                raise
            # Never let a dead tracking server hide the error that ended the stage.
            log.warning("could not mark MLflow run %s", status, exc_info=True)


def _rank(rank: int | None) -> int:
    # torchrun / DeepSpeed launchers export RANK; an explicit rank always wins.
    return int(os.environ.get("RANK", "0")) if rank is None else rank


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # another process created it just now
        if exp is None:
            raise
        return exp.experiment_id


def _run_tags(tags: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    if parent_run_id:
        tags = {**tags, MLFLOW_PARENT_RUN_ID: parent_run_id}
    # Source file, git commit and user, as mlflow.start_run would add (never the environment).
    return _tags(resolve_tags(tags))


def start_run(cfg: MlflowConfig, run_name: str | None = None,
              params: dict | BaseModel | None = None, tags: dict[str, str] | None = None,
              rank: int | None = None, nested: bool = False,
              parent_run_id: str | None = None, system_metrics: bool = True) -> Tracker:
    """Open a run (rank 0, enabled) or return a no-op tracker; use as a context manager.

    ``run_name``/``tags`` are the stage's defaults; ``cfg.run_name``/``cfg.tags`` win.
    ``rank`` defaults to env ``RANK`` or 0. ``nested=True`` makes the run a child of the
    innermost open run in this process; ``parent_run_id`` names the parent explicitly.
    System metrics are sampled in this process while the run is open when
    ``cfg.system_metrics`` and ``system_metrics`` (``False``: the stage samples elsewhere,
    as ``distill`` does on its training workers).
    Raises :class:`TrackingError` (masked URI + fix) if the store cannot be used.
    """
    rank = _rank(rank)
    if not cfg.enabled or rank != 0:
        return Tracker.noop(rank)
    from mlflow import MlflowClient

    uri, source = resolve_tracking_uri(cfg)
    masked = mask_text(uri)
    if uri.startswith(("http://", "https://")):
        check_reachable(uri, source)
    if (db := _sqlite_path(uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)  # SQLite will not create the folder
    if nested and parent_run_id is None and _ACTIVE:
        parent_run_id = _ACTIVE[-1].run_id
    try:
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, cfg.experiment, _artifact_location(uri))
        run = client.create_run(exp_id, run_name=cfg.run_name or run_name,
                                tags=_run_tags({**(tags or {}), **cfg.tags}, parent_run_id))
    except Exception as e:
        # `from None`: the original message may carry the unmasked URI.
        raise TrackingError(f"cannot start an MLflow run: {mask_text(str(e))[:500]} "
                            f"{_fix_hint(masked, source)}") from None
    tracker = Tracker(client, run.info.run_id, uri, rank)
    _ACTIVE.append(tracker)
    log.info("MLflow run %s (%s) in experiment '%s' at %s", run.info.run_id, run.info.run_name,
             cfg.experiment, masked)
    if params:
        try:
            tracker.log_params(params)
            # Params are flattened and cut at 6000 chars; keep the whole config beside them.
            tracker.log_dict(params, "fusedist/params.json")
        except BaseException:
            tracker.end("FAILED")  # do not leave a RUNNING run behind
            raise
    if cfg.system_metrics and system_metrics:
        tracker.start_system_metrics(cfg.system_metrics_interval)
    return tracker


# ----------------------------------------------------------------------------- random weights

def random_weights_tag(names: Iterable[str]) -> dict[str, str]:
    """Tags that mark a run whose models (``names``) use random, not pretrained, weights."""
    return {RANDOM_WEIGHTS_TAG: "true", RANDOM_WEIGHTS_MODELS_TAG: ",".join(sorted(names))}


def random_weights_line(names: Iterable[str]) -> str | None:
    """The one line every summary and report carries when models had random weights."""
    names = sorted(set(names))
    if not names:
        return None
    return (f"RANDOM WEIGHTS: {', '.join(names)} loaded no pretrained checkpoint; these "
            "results exercise the pipeline only and say nothing about model quality.")


def warn_random_weights(tracker: Tracker, names: Iterable[str]) -> None:
    """Say in the log (rank 0) and in the run's tags that results come from random weights.

    No names, nothing to say: callers pass ``[m for m in models if m.random_weights]``."""
    names = sorted(names)
    if not names:
        return
    if tracker.rank == 0:
        log.warning("RANDOM WEIGHTS for %s: no pretrained checkpoint was loaded; results "
                    "exercise the pipeline only and say nothing about model quality",
                    ", ".join(names))
    tracker.set_tags(random_weights_tag(names))


# ----------------------------------------------------------------------------- local server

class LocalServer(NamedTuple):
    """A running ``mlflow server``; ``url, process = serve_local(...)`` works. Stop it with
    :meth:`stop` (not ``process.terminate()``: the server's workers are its children)."""

    url: str
    process: subprocess.Popen

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``timeout``. Idempotent."""
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if _wait_group_gone(self.process, pgid, timeout):
                break
        self.process.wait()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _wait_group_gone(proc: subprocess.Popen, pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or it stays a zombie member of the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _as_uri(location: str, sqlite: bool) -> str:
    if "://" in location:
        return location
    path = Path(location).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if sqlite:
        return f"sqlite:///{path}"
    path.mkdir(exist_ok=True)
    return str(path)


def _tail(path: Path, n: int = 3000) -> str:
    return mask_text(path.read_text(errors="replace")[-n:]) if path.exists() else ""


def _health(url: str) -> bool:
    import requests

    try:
        # trust_env=False: an HTTP(S)_PROXY in the environment must not swallow 127.0.0.1.
        with requests.Session() as s:
            s.trust_env = False
            return s.get(url + "/health", timeout=1.0).status_code == 200
    except requests.RequestException:
        return False


def serve_local(backend_uri: str | Path, artifacts_dir: str | Path, host: str = "127.0.0.1",
                port: int = 0, timeout: float = 120.0,
                log_path: str | Path | None = None) -> LocalServer:
    """Start ``mlflow server`` with proxied artifacts and wait until ``/health`` answers.

    ``backend_uri``: a SQLite file path or store URI; ``artifacts_dir``: a folder or a URI such
    as ``s3://bucket/mlflow`` (clients then need no S3 credentials; the server takes the AWS
    chain and ``MLFLOW_S3_ENDPOINT_URL`` from this environment). ``port=0`` lets the OS
    pick a free port (read back from the server's log, so no race with other processes).
    Server output goes to ``log_path`` (default: a file in the temp dir, kept for debugging).
    """
    backend = _as_uri(str(backend_uri), sqlite=True)
    artifacts = _as_uri(str(artifacts_dir), sqlite=False)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="fusedist-mlflow-server-", suffix=".log")
        os.close(fd)
        log_path = name
    log_file = Path(log_path)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", artifacts, "--serve-artifacts",
           "--host", host, "--port", str(port), "--workers", "1"]
    env = env_snapshot()
    # MLflow 3's job runner adds ~7 Huey processes (~1 GB); tracking does not use it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = LocalServer("", proc)
    try:
        url = _wait_ready(proc, log_file, host, port, timeout)
    except BaseException:
        server.stop()
        raise
    log.info("mlflow server %s (pid %d, log %s)", url, proc.pid, log_file)
    return server._replace(url=url)


def _wait_ready(proc: subprocess.Popen, log_file: Path, host: str, port: int,
                timeout: float) -> str:
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingError(f"mlflow server exited with code {proc.returncode} before "
                                f"answering; log {log_file}:\n{_tail(log_file)}")
        bound = port
        if port == 0:
            m = re.search(r"running on https?://\S+?:(\d+)", _tail(log_file, 100_000))
            bound = int(m.group(1)) if m else 0
        if bound and _health(url := f"http://{client_host}:{bound}"):
            return url
        time.sleep(0.2)
    raise TrackingError(f"mlflow server did not answer /health within {timeout:g} s; "
                        f"log {log_file}:\n{_tail(log_file)}")
