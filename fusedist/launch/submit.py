"""Submit a stage to a running Ray cluster through the Ray Jobs API and follow its logs.

``submit_stage`` uploads the project as the job's ``working_dir`` (without virtualenvs, data,
outputs, caches or git history), runs ``fusedist <stage> --config <recipe> [--set ...]`` there,
streams the driver's log until the job ends and returns an exit status that reflects the job's:
0 succeeded, the driver's own code when it failed (1 some items failed, 2 bad config, 3
storage), 4 stopped, 3 when the cluster cannot be reached or refuses us.

Only an allow-list of non-secret environment variables travels with the job. Credentials on
the cluster come from its own environment (Kubernetes Secrets), never from the submitter.

Ray token authentication (on by default for ``ray start --head`` since Ray 2.59): the Jobs
client only sends a token when ``RAY_AUTH_MODE=token`` is set in *its* process. We send the
token ourselves (``Authorization: Bearer``) when the cluster asks for one, from the sources
Ray itself uses, in its order: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``. The token is never printed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from fusedist.secrets import env_snapshot
from fusedist.launch.config import CREDENTIAL_ENV_RE

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Non-secret settings a stage may need on the cluster; anything else stays on this machine.
ENV_ALLOW = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
             "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "FUSEDIST_CACHE",
             "HF_HUB_OFFLINE", "DS_ACCELERATOR", "TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS")
# Never uploaded: environments, data and outputs, VCS history, caches. gitignore syntax,
# matched against paths relative to the project: a leading "/" anchors a name to the top (a
# bare "data/" would also drop the fusedist/data package), no trailing "/" prunes the folder.
UPLOAD_EXCLUDES = ["/.venv", "/venv", "/.git", "/data", "/demo-output", "/mlruns", "/build",
                   "/dist", "/.whl", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
                   ".ruff_cache", "*.egg-info", ".cache", "*.db", "*.tar", "*.h5", "*.svs",
                   "*.tif", "*.tiff", "*.ndpi", "*.mrxs"]
EXIT_STOPPED = 4
EXIT_INFRA = 3
_USERINFO_RE = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


class LaunchError(RuntimeError):
    """The job could not be submitted or followed; the message says why and how to fix it."""


@dataclass
class Submission:
    """What goes to the Jobs API (built separately so it can be shown and tested)."""

    entrypoint: str
    working_dir: str
    env_vars: dict[str, str]
    excludes: list[str] = field(default_factory=lambda: list(UPLOAD_EXCLUDES))
    dropped_env: list[str] = field(default_factory=list)

    @property
    def runtime_env(self) -> dict:
        return {"working_dir": self.working_dir, "excludes": self.excludes,
                "env_vars": self.env_vars}


def project_root(start: Path | None = None) -> Path:
    """The fusedist checkout to upload: the nearest folder with ``pyproject.toml`` and
    ``fusedist/`` above ``start`` (default the working directory), else the package's own."""
    for base in [(start or Path.cwd()).resolve(), Path(__file__).resolve().parents[2]]:
        for d in [base, *base.parents]:
            if (d / "pyproject.toml").is_file() and (d / "fusedist").is_dir():
                return d
    raise LaunchError("no fusedist checkout found (a folder with pyproject.toml and fusedist/)"
                      ": run from the project or pass --working-dir")


def job_env(extra: list[str] | None = None,
            environ: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(env for the job, names dropped with the reason). Only allow-listed, non-secret names;
    credentials embedded in URLs are stripped rather than forwarded."""
    environ = env_snapshot() if environ is None else dict(environ)
    names = list(ENV_ALLOW)
    dropped: list[str] = []
    for name in extra or []:
        if CREDENTIAL_ENV_RE.search(name):
            raise LaunchError(f"--env {name}: looks like a credential; the cluster must get it "
                              "from its own environment (a Kubernetes Secret), not from here")
        names.append(name)
    env: dict[str, str] = {}
    for name in names:
        if name not in environ:
            continue
        value = environ[name]
        if _USERINFO_RE.match(value):
            value = _USERINFO_RE.sub(r"\g<scheme>", value)
            dropped.append(f"{name}: credentials removed from the URL")
        env[name] = value
    return env, dropped


def stage_entrypoint(stage: str, recipe: str | None, overrides: list[str] | None,
                     extra_args: list[str] | None, root: Path) -> str:
    """``fusedist <stage> --config <recipe relative to the uploaded root> [--set ...]``."""
    args = ["fusedist", stage]
    if recipe:
        path = Path(recipe).resolve()
        try:
            rel = path.relative_to(root)
        except ValueError:
            raise LaunchError(f"recipe {recipe} is outside the uploaded project {root}: copy it "
                              "under configs/ so it travels with the job") from None
        args += ["--config", rel.as_posix()]
    for item in overrides or []:
        args += ["--set", item]
    return shlex.join(args + list(extra_args or []))


def build_submission(stage: str, recipe: str | None, overrides: list[str] | None = None,
                     extra_args: list[str] | None = None, working_dir: Path | None = None,
                     extra_env: list[str] | None = None) -> Submission:
    root = (working_dir or project_root()).resolve()
    env, dropped = job_env(extra_env)
    return Submission(stage_entrypoint(stage, recipe, overrides, extra_args, root), str(root),
                      env, dropped_env=dropped)


# ----------------------------------------------------------------------------- auth

def find_token() -> tuple[str, str] | None:
    """(token, where it came from) in Ray's own precedence, or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "env RAY_AUTH_TOKEN"
    candidates = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append((Path(os.environ["RAY_AUTH_TOKEN_PATH"]), "RAY_AUTH_TOKEN_PATH"))
    candidates.append((Path.home() / ".ray" / "auth_token", "~/.ray/auth_token"))
    for path, label in candidates:
        try:
            token = path.read_text().strip()
        except OSError:
            continue
        if token:
            return token, f"file {label}"
    return None


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address we pass; a
    # RAY_ADDRESS meant for ray.init() (host:port of GCS) would then send us elsewhere.
    popped = {k: os.environ.pop(k, None) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    saved = {k: v for k, v in popped.items() if v is not None}
    try:
        return JobSubmissionClient(address, headers=headers)
    finally:
        os.environ.update(saved)


def connect(address: str, log: Callable[[str], None]):
    """A Jobs client; retries once with the cluster's token if the cluster asks for one."""
    from ray.exceptions import AuthenticationError

    source = None
    try:
        try:
            return _client(address, None)
        except AuthenticationError:
            found = find_token()
            if found is None:
                raise LaunchError(
                    f"the Ray cluster at {address} requires token authentication and no token "
                    "was found: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH), or put it in "
                    "~/.ray/auth_token (`ray get-auth-token` on the head prints it)") from None
            token, source = found
            log(f"the cluster requires a Ray auth token; using the one from {source}")
            return _client(address, token)
    except AuthenticationError:
        raise LaunchError(f"the Ray cluster at {address} rejected the auth token from {source}: "
                          "use the cluster's token (`ray get-auth-token` on the head, or the "
                          "Secret KubeRay created for the cluster)") from None
    except LaunchError:
        raise
    except Exception as e:  # connection refused, DNS, TLS, an old or foreign server
        raise LaunchError(f"cannot reach the Ray Jobs API at {address}: {e}. Is the head's "
                          "dashboard up (port 8265; on Kubernetes `kubectl port-forward "
                          "svc/<cluster>-head-svc 8265`)?") from None


# ----------------------------------------------------------------------------- submit/follow

def _submit(client, sub: Submission, submission_id: str, metadata: dict[str, str]) -> str:
    """Submit, retrying while the head's job agent is still starting (HTTP 500 'no agent')."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                                     submission_id=submission_id, metadata=metadata)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise LaunchError(f"the Jobs API refused the job: {e}") from None
            time.sleep(1.0)


def follow(client, job_id: str, out: TextIO) -> None:
    """Stream the job's log to ``out`` until the job ends (the websocket closes then)."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def wait_terminal(client, job_id: str, timeout: float = 60.0):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) \
                or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def exit_code(client, job_id: str, status) -> int:
    from ray.job_submission import JobStatus

    if status == JobStatus.SUCCEEDED:
        return 0
    if status == JobStatus.STOPPED:
        return EXIT_STOPPED
    if status == JobStatus.FAILED:
        # The driver's own code keeps the CLI's meaning (1 partial, 2 config, 3 storage).
        code = getattr(client.get_job_info(job_id), "driver_exit_code", None)
        return code if isinstance(code, int) and 0 < code < 126 else 1
    return EXIT_INFRA


def submit_stage(stage: str, recipe: str | None, overrides: list[str] | None = None, *,
                 address: str | None = None, extra_args: list[str] | None = None,
                 working_dir: Path | None = None, extra_env: list[str] | None = None,
                 wait: bool = True, out: TextIO | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[str, int]:
    """Submit ``fusedist <stage>`` to the cluster at ``address``; (job id, exit status)."""
    out = out or sys.stdout
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    address = resolve_address(address)
    sub = build_submission(stage, recipe, overrides, extra_args, working_dir, extra_env)
    for note in sub.dropped_env:
        log(f"env {note}")
    client = connect(address, log)
    job_id = f"fusedist-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log(f"submitting to {address}: {sub.entrypoint}")
    passed = ", ".join(sorted(sub.env_vars)) or "none"
    log(f"  working_dir {sub.working_dir} (env passed: {passed})")
    _submit(client, sub, job_id, {"fusedist.stage": stage, "fusedist.recipe": recipe or ""})
    log(f"job {job_id} submitted")
    if not wait:
        return job_id, 0
    try:
        follow(client, job_id, out)
    except KeyboardInterrupt:
        log(f"stopped following; the job keeps running. Stop it with: ray job stop {job_id} "
            f"--address {address}")
        return job_id, 130
    status = wait_terminal(client, job_id)
    code = exit_code(client, job_id, status)
    log(f"job {job_id} {status} (exit status {code})")
    return job_id, code


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS`` or an http(s) ``RAY_ADDRESS``, else the
    local default. A bare ``host:port`` means http."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    cand = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
            or (ray_address if ray_address.startswith(("http://", "https://")) else None))
    if not cand:
        return DEFAULT_ADDRESS
    return (cand if "://" in cand else f"http://{cand}").rstrip("/")
