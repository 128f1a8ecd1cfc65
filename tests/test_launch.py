"""Launch and operate: `fusedist launch` (Ray Jobs API), rendered and committed Kubernetes
manifests (validated offline against the KubeRay CRDs and Kubernetes schemas), the container
entrypoint, and `fusedist doctor`.

No Kubernetes API server exists here: `--apply` is checked against a stand-in `kubectl` that
records what it is given. The Jobs API is real: a private `ray start --head` (own ports, own
temp dir, token auth on) that the module starts and stops, apart from the session's own Ray.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from fusedist.config import ConfigError, load_config
from fusedist.launch import k8s
from fusedist.launch import render as R
from fusedist.launch.config import LaunchConfig
from fusedist.launch.submit import ENV_ALLOW
from fusedist.launch.validate import load_docs, validate_docs, validate_file

from tests.s3util import moto_server, s3_bucket  # noqa: F401  (fixtures)
from tests.slides import make_known_slide

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "fusedist" / "launch" / "crds"
K8S_FILES = sorted((REPO / "k8s").rglob("*.yaml"))
VENV_BIN = str(Path(sys.executable).parent)
STAGES = ("tile", "cache", "distill", "embed", "fuse")


def cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`fusedist launch|doctor ...` in a subprocess (python -m fusedist.launch: the same
    commands `register(app)` adds to the main CLI)."""
    return subprocess.run([sys.executable, "-m", "fusedist.launch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def all_docs(docs: list[dict]) -> list[dict]:
    """The documents plus manifests embedded in ConfigMaps (the fallback CronJob's RayJob)."""
    out = []
    for d in docs:
        out.append(d)
        for v in (d.get("data") or {}).values() if d.get("kind") == "ConfigMap" else []:
            inner = yaml.safe_load(v)
            if isinstance(inner, dict) and "kind" in inner:
                out.append(inner)
    return out


def pod_specs(node, path=""):
    """(path, pod spec) for every pod spec anywhere in a manifest."""
    if isinstance(node, dict):
        if "containers" in node:
            yield path, node
        for k, v in node.items():
            yield from pod_specs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from pod_specs(v, f"{path}[{i}]")


def launch_cfg(name: str = "kuberay_h100.yaml", sets: list[str] | None = None) -> LaunchConfig:
    return load_config(LaunchConfig, REPO / "configs" / "launch" / name, sets)


# ----------------------------------------------------------------------------- k8s/ folder

def test_k8s_folder_is_what_the_renderer_makes():
    assert K8S_FILES, "k8s/ is empty"
    assert k8s.stale(REPO) == [], "k8s/ is out of date: run `fusedist launch k8s`"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_manifest_is_valid(path):
    assert validate_file(path, CRDS) == []


def test_k8s_has_every_piece_the_platform_needs():
    docs = all_docs([d for p in K8S_FILES for d in load_docs(p.read_text())])
    kinds = {d["kind"] for d in docs}
    assert {"RayJob", "RayCluster", "RayCronJob", "CronJob", "Deployment", "Service",
            "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Namespace"} <= kinds
    assert "Secret" not in kinds  # credentials are created by hand, only referenced here
    entry = {d["spec"]["entrypoint"].split()[1] for d in docs if d["kind"] == "RayJob"}
    assert set(STAGES) <= entry
    mlflow = next(d for d in docs if d["kind"] == "Deployment")
    c = mlflow["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(c["args"])
    assert "--backend-store-uri $(MLFLOW_BACKEND_STORE_URI)" in args
    assert "--artifacts-destination s3://" in args
    db = next(e for e in c["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert db["valueFrom"]["secretKeyRef"]["name"] == "fusedist-mlflow-db"


def test_every_pod_is_non_root_and_reads_credentials_by_reference():
    rendered = [d for kind in ("rayjob", "raycronjob", "cronjob", "raycluster", "mlflow")
                for d in R.render(kind, "distill", launch_cfg("retrain_weekly.yaml"),
                                  R.load_stage_recipe("distill",
                                                      REPO / "configs/distill/xmag_paper.yaml"))]
    committed = [d for p in K8S_FILES for d in load_docs(p.read_text())]
    specs = [s for d in all_docs(rendered + committed) for s in pod_specs(d)]
    assert len(specs) > 20
    for path, spec in specs:
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, path
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, path
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, path
            assert csc["capabilities"]["drop"] == ["ALL"], path
            for e in c.get("env", []):
                if e["name"].startswith(("AWS_SECRET", "AWS_ACCESS_KEY", "MLFLOW_TRACKING_P",
                                         "MLFLOW_BACKEND")):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (path, e)


# ----------------------------------------------------------------------------- render

def test_render_distill_on_three_h100_nodes(tmp_path):
    out = tmp_path / "distill.yaml"
    # Stage and recipe come from the launch config; the renderer validates against the CRDs.
    r = cli("launch", "render", "-l", "configs/launch/kuberay_h100.yaml", "-o", str(out),
            "--crds", str(CRDS))
    assert r.returncode == 0, r.stderr
    docs = load_docs(out.read_text())
    assert validate_docs(docs, CRDS) == []
    cm, job = docs
    assert cm["kind"] == "ConfigMap" and job["kind"] == "RayJob"
    recipe = yaml.safe_load(cm["data"]["distill.yaml"])
    assert recipe["scaling"]["num_workers"] == 24 and recipe["teacher"] == "uni2-h"
    spec = job["spec"]
    assert spec["entrypoint"] == "fusedist distill --config /etc/fusedist/distill.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 86400 and spec["backoffLimit"] == 2
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (3, 3, 3)
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8 and limits["cpu"] == "96"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}
    cfg_vol = next(v for v in pod["volumes"] if v["name"] == "fusedist-config")
    assert cfg_vol["configMap"]["name"] == cm["metadata"]["name"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert mount["name"] == "dshm"


def test_autoscaling_bounds_and_overrides_reach_the_manifest():
    lc = launch_cfg("gpu.yaml", ["workers.max_replicas=5", "workers.min_replicas=1"])
    rec = R.load_stage_recipe("cache", REPO / "configs/cache/xmag_uni2h.yaml",
                              ["engine.batch_size=512"])
    cm, job = R.render("rayjob", "cache", lc, rec)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 120
    g = cluster["workerGroupSpecs"][0]
    assert (g["minReplicas"], g["maxReplicas"], g["replicas"]) == (1, 5, 1)
    assert yaml.safe_load(cm["data"]["cache.yaml"])["engine"]["batch_size"] == 512
    assert validate_docs([cm, job], CRDS) == []


def test_scheduled_retraining_raycronjob_and_fallback_cronjob():
    lc = launch_cfg("retrain_weekly.yaml")
    assert (lc.stage, lc.recipe) == ("retrain", "configs/retrain/weekly.yaml")
    rec = R.load_stage_recipe("retrain", REPO / lc.recipe)
    docs = R.render("raycronjob", "retrain", lc, rec)
    assert validate_docs(docs, CRDS) == []
    cm, cron = docs
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"] == "0 3 * * 0"
    assert cron["spec"]["timeZone"] == "Europe/Berlin"
    # The job is `fusedist retrain` on the shipped recipe; one run folder per day (the shell
    # expands the date on the cluster at run time), so a retried job resumes its own run.
    assert cron["spec"]["jobTemplate"]["entrypoint"] == (
        "fusedist retrain --config /etc/fusedist/retrain.yaml --run-id $(date -u +%Y%m%d)")
    shipped = yaml.safe_load(cm["data"]["retrain.yaml"])
    assert shipped["registry"]["fused_model"] == "fused-classifier"
    assert shipped["student"]["distill"]["scaling"]["num_workers"] == 24
    # The committed k8s/retrain/ is this render (test_k8s_folder_is_what_the_renderer_makes).
    committed = load_docs((REPO / "k8s/retrain/raycronjob.yaml").read_text())
    assert committed[-1]["spec"]["jobTemplate"]["entrypoint"] == \
        cron["spec"]["jobTemplate"]["entrypoint"]
    # The student's distillation must fit the worker group, as a distill job's does.
    with pytest.raises(R.RenderError, match="24 GPU workers"):
        R.render("raycronjob", "retrain", launch_cfg("retrain_weekly.yaml", sets=[
            "workers.max_replicas=1", "workers.min_replicas=1", "workers.replicas=1"]), rec)

    docs = R.render("cronjob", "retrain", lc, rec)
    assert validate_docs(docs, CRDS) == []
    by_kind = {d["kind"]: d for d in docs}
    role, binding = by_kind["Role"], by_kind["RoleBinding"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list", "watch"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = by_kind["ServiceAccount"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa,
                                    "namespace": "fusedist"}]
    cronjob = by_kind["CronJob"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod["containers"][0]["command"][:2] == ["kubectl", "create"]
    inner = [d for d in all_docs(docs) if d["kind"] == "RayJob"]
    assert len(inner) == 1 and inner[0]["metadata"]["generateName"] == "fusedist-retrain-"


def test_render_refuses_what_cannot_work():
    rec = R.load_stage_recipe("distill", REPO / "configs/distill/xmag_paper.yaml")
    with pytest.raises(R.RenderError, match="24 GPU workers.*at most 1 x 8"):
        R.render("rayjob", "distill", launch_cfg(sets=["workers.max_replicas=1",
                                                       "workers.min_replicas=0",
                                                       "workers.replicas=0"]), rec)
    with pytest.raises(R.RenderError, match="needs `schedule`"):
        R.render("raycronjob", "distill", launch_cfg(), rec)
    r = cli("launch", "render", "distill", "-c", "configs/distill/xmag_paper.yaml",
            "--set", "epoch=3", "-l", "configs/launch/kuberay_h100.yaml")
    assert r.returncode == 2 and "unknown key 'epoch'" in r.stderr and "epochs" in r.stderr


@pytest.mark.parametrize("sets, message", [
    (["schedule=every sunday"], "not a cron schedule"),
    (["workers.min_replicas=4", "workers.max_replicas=2"], "above workers.max_replicas"),
    (["env.AWS_SECRET_ACCESS_KEY=abc"], "look(s) like credentials"),
    (["env.MLFLOW_TRACKING_URI=http://bob:hunter2@mlflow:5000"], "password in a URL"),
    (["workers.shm_size=lots"], "workers.shm_size"),
    (["secrets.s3=Not_A_Name"], "secrets.s3"),
])
def test_launch_config_rejects_bad_settings(sets, message):
    with pytest.raises(ConfigError) as e:
        launch_cfg("gpu.yaml", sets)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- validator

def _rayjob() -> dict:
    lc = launch_cfg("gpu.yaml")
    rec = R.load_stage_recipe("embed", REPO / "configs/embed/multi_fm.yaml")
    return R.render("rayjob", "embed", lc, rec)[-1]


def _mutate(doc: dict, fn) -> dict:
    doc = copy.deepcopy(doc)
    fn(doc)
    return doc


def _group(d: dict) -> dict:
    return d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _head_container(d: dict) -> dict:
    return d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


BROKEN = {
    "unknown field in RayJob spec": (
        lambda d: d["spec"].update(entrypointt="x"), "'entrypointt' was unexpected"),
    "unknown field deep in a pod": (
        lambda d: _head_container(d).update(gpus=1), "'gpus' was unexpected"),
    "wrong type": (
        lambda d: _group(d).update(minReplicas="three"), "'three' is not of type 'integer'"),
    "bad quantity": (
        lambda d: _head_container(d)["resources"]["limits"].update(memory="lots"),
        "'lots' does not match"),
    "missing required field": (
        lambda d: _group(d).pop("groupName"), "'groupName' is a required property"),
    "literal secret in env": (
        lambda d: _head_container(d)["env"].append(
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG"}),
        "env AWS_SECRET_ACCESS_KEY has a literal value"),
    "password in a URL": (
        lambda d: _head_container(d)["env"].append(
            {"name": "MLFLOW_TRACKING_URI", "value": "http://bob:hunter2@mlflow:5000"}),
        "a URL with a password"),
    "token as an argument": (
        lambda d: d["spec"].update(entrypoint="fusedist tile --hf-token hf_abc"),
        "credential passed as a command-line argument"),
    "wrong apiVersion": (
        lambda d: d.update(apiVersion="ray.io/v1alpha2"), "apiVersion must be ray.io/v1"),
    "bad object name": (
        lambda d: d["metadata"].update(name="Fusedist_Embed"), "DNS-1123"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_validator_rejects_broken_rayjob(case):
    fn, message = BROKEN[case]
    assert validate_docs([_rayjob()], CRDS) == []
    errs = validate_docs([_mutate(_rayjob(), fn)], CRDS)
    assert any(message in e for e in errs), errs


def test_validator_follows_apiserver_semantics():
    # minReplicas/maxReplicas are `required` but have defaults: leaving them out is valid;
    # an int-or-string quantity may be an int.
    ok = _mutate(_rayjob(), lambda d: [_group(d).pop(k) for k in ("minReplicas", "maxReplicas")])
    ok["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["cpu"] = 4
    assert validate_docs([ok], CRDS) == []
    cron = R.render("raycronjob", "distill", launch_cfg("retrain_weekly.yaml"), None)[-1]
    no_schedule = _mutate(cron, lambda d: d["spec"].pop("schedule"))
    assert any("'schedule' is a required property" in e
               for e in validate_docs([no_schedule], CRDS))


def test_validator_checks_builtin_kinds_secrets_and_embedded_manifests(tmp_path):
    lc = launch_cfg("retrain_weekly.yaml")
    deploy, svc = R.mlflow_server(lc)
    bad_deploy = _mutate(deploy, lambda d: d["spec"].update(replica=2))
    assert any("'replica' was unexpected" in e for e in validate_docs([bad_deploy]))
    docs = R.cronjob_fallback("distill", lc, None)
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert any("is not of type 'string'" in e
               for e in validate_docs([_mutate(cron, lambda d: d["spec"].update(schedule=5))]))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
              "stringData": {"AWS_SECRET_ACCESS_KEY": "<set-me>"}}
    assert any("Secret with data/stringData" in e for e in validate_docs([secret]))
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "rayjob.yaml" in d["data"])
    inner = yaml.safe_load(cm["data"]["rayjob.yaml"])
    inner["spec"]["shutdownAfterJobFinish"] = True
    cm["data"]["rayjob.yaml"] = yaml.safe_dump(inner)
    assert any("embeds RayJob" in e and "'shutdownAfterJobFinish' was unexpected" in e
               for e in validate_docs([cm], CRDS))
    # The CLI on a broken file: exit 2, every problem named with its file.
    bad = tmp_path / "bad.yaml"
    bad.write_text(R.to_yaml([bad_deploy, secret]))
    r = cli("launch", "validate", str(bad), str(REPO / "k8s" / "base"), "--crds", str(CRDS))
    assert r.returncode == 2
    assert "bad.yaml: Deployment/fusedist-mlflow" in r.stderr and "Secret/s3" in r.stderr
    assert "k8s/base" not in r.stderr  # the committed files are fine


# ----------------------------------------------------------------------------- --apply

def test_render_apply_hands_the_yaml_to_kubectl(tmp_path):
    # A stand-in kubectl (no API server exists here): it records its arguments and stdin.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "kubectl").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n"
                                  f"cat > {tmp_path}/stdin\necho 'rayjob created'\n")
    (fake / "kubectl").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    args = ["launch", "render", "tile", "-c", "configs/tile/s3.yaml", "-l",
            "configs/launch/cpu.yaml", "--crds", str(CRDS)]
    shown = cli(*args, env=env)
    applied = cli(*args, "--apply", env=env)
    assert applied.returncode == 0, applied.stderr
    assert (tmp_path / "args").read_text().split() == ["apply", "-f", "-"]
    assert (tmp_path / "stdin").read_text() == shown.stdout
    assert "rayjob created" in applied.stdout
    kinds = [d["kind"] for d in load_docs(shown.stdout)]
    assert kinds == ["ConfigMap", "RayJob"]

    no_kubectl = dict(os.environ, PATH=str(tmp_path / "empty"))
    r = cli(*args, "--apply", env=no_kubectl)
    assert r.returncode == 3 and "kubectl not found on PATH" in r.stderr


# ----------------------------------------------------------------------------- Jobs API

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head with the dashboard (Jobs API) and token auth, on its own ports and
    temp dir. Stopped by killing its own process group: `ray stop` would stop every Ray on
    the machine, the session's in-process one included."""
    gcs, dash, agent, grpc, client, metrics, rt = _free_ports(7)
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    cmd = [f"{VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
           f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt}", "--num-cpus=1", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={tmp}"]
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/api/version", timeout=2,
                                headers={"Authorization": f"Bearer {token}"}).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray head did not start:\n" + (tmp / "head.log").read_text())
            time.sleep(0.5)
        yield {"url": url, "token": token, "tmp": tmp}
    finally:
        procs = [proc, *psutil.Process(proc.pid).children(recursive=True)] \
            if proc.poll() is None else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs([psutil.Process(p.pid) for p in procs
                                          if psutil.pid_exists(p.pid)], timeout=5)
            if not alive:
                break
        log.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _launch_env(token: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_TOKEN=token, **extra)
    return env


def _job_id(stderr: str) -> str:
    return next(line.split()[1] for line in stderr.splitlines()
                if line.startswith("job ") and line.endswith("submitted"))


def test_launch_runs_a_stage_on_the_cluster_and_follows_it(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    slide, _ = make_known_slide(tmp_path / "s.tiff", width=2048, height=2048, mpp=0.5)
    out = tmp_path / "tiles"
    env = _launch_env(ray_head["token"], AWS_ENDPOINT_URL="http://s3.example:9000",
                      MLFLOW_TRACKING_URI="http://bob:hunter2@mlflow.example:5000",
                      AWS_SECRET_ACCESS_KEY="never-leaves-this-machine",
                      SOME_API_TOKEN="nor-this-one")
    # `fusedist launch tile ...` is short for `fusedist launch submit tile ...`.
    r = cli("launch", "tile", "-c", "configs/tile/grid.yaml", "--set", f"input={slide}",
            "--set", f"output={out}", "--set", "dataset=g", "--address", ray_head["url"],
            env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1/1 slides ok" in r.stdout  # the driver's own output, streamed back
    assert "SUCCEEDED (exit status 0)" in r.stderr
    assert (out / "g" / "manifest.json").is_file()
    assert ray_head["token"] not in r.stdout + r.stderr

    client = JobSubmissionClient(ray_head["url"],
                                 headers={"Authorization": f"Bearer {ray_head['token']}"})
    info = client.get_job_info(_job_id(r.stderr))
    assert info.entrypoint.startswith("fusedist tile --config configs/tile/grid.yaml --set")
    # Allow-listed, non-secret variables only; credentials stripped from URLs.
    env_vars = info.runtime_env["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"] == "http://s3.example:9000"
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert set(env_vars) <= set(ENV_ALLOW)
    for leaked in ("never-leaves-this-machine", "nor-this-one", "hunter2"):
        assert leaked not in str(info.runtime_env)
    # The upload was the project's code and configs, not its virtualenv, data or history.
    (pkg,) = [p for p in (ray_head["tmp"] / "session_latest" / "runtime_resources"
                          / "working_dir_files").iterdir() if p.is_dir()]
    code = {p.relative_to(REPO) for p in (REPO / "fusedist").rglob("*.py")}
    assert code == {p.relative_to(pkg) for p in (pkg / "fusedist").rglob("*.py")}
    assert (pkg / "configs" / "tile" / "grid.yaml").is_file()
    for skipped in (".venv", ".git", "data", "demo-output"):
        assert not (pkg / skipped).exists(), skipped
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < 10_000_000, size


def test_launch_exit_status_follows_the_job(ray_head, tmp_path):
    env = _launch_env(ray_head["token"])
    # The stage fails on the cluster (no such input there): its own exit status 2 comes back.
    r = cli("launch", "submit", "tile", "-c", "configs/tile/grid.yaml", "--set",
            f"input={tmp_path}/none", "--set", f"output={tmp_path}/out",
            "--address", ray_head["url"], env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "does not exist" in r.stdout.lower() and "FAILED (exit status 2)" in r.stderr

    wrong = _launch_env("not-the-token-" + secrets.token_hex(4))
    r = cli("launch", "tile", "-c", "configs/tile/grid.yaml", "--set", "input=x",
            "--address", ray_head["url"], env=wrong)
    assert r.returncode == 3
    assert "rejected the auth token from env RAY_AUTH_TOKEN" in r.stderr
    assert wrong["RAY_AUTH_TOKEN"] not in r.stdout + r.stderr


def test_launch_fails_fast_on_bad_config_or_no_cluster(tmp_path):
    dead = f"http://127.0.0.1:{_free_ports(1)[0]}"
    r = cli("launch", "tile", "-c", "configs/tile/grid.yaml", "--set", "input=x",
            "--set", "min_tisue=0.2", "--address", dead)
    assert r.returncode == 2 and "unknown key 'min_tisue'" in r.stderr
    r = cli("launch", "tile", "-c", "configs/tile/grid.yaml", "--set", "input=x",
            "--address", dead)
    assert r.returncode == 3 and f"cannot reach the Ray Jobs API at {dead}" in r.stderr
    outside = tmp_path / "mine.yaml"
    outside.write_text("input: x\n")
    r = cli("launch", "tile", "-c", str(outside), "--address", dead)
    assert r.returncode == 3 and "outside the uploaded project" in r.stderr


# ----------------------------------------------------------------------------- doctor

CHECK_NAMES = ("torch", "deepspeed", "openslide", "ray", "s3", "mlflow", "disk")


def _doctor_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    # No shared files or instance metadata: the test sees only what it sets.
    env.update({"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_EC2_METADATA_DISABLED": "true", **extra})
    return env


def test_doctor_names_a_dead_s3_endpoint_without_the_secret():
    from tests.s3util import dead_endpoint

    secret = "s3cr3t-" + secrets.token_hex(8)
    with dead_endpoint() as ep, dead_endpoint() as ml:
        r = cli("doctor", "--s3-endpoint", ep, "--mlflow-uri", ml,
                env=_doctor_env(AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                                AWS_SECRET_ACCESS_KEY=secret))
    assert r.returncode == 1, r.stdout
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line and line[0] != " "}
    for name in CHECK_NAMES:
        assert any(k.startswith(name) for k in rows), (name, r.stdout)
    assert "FAIL" in rows["s3"] and ep in rows["s3"] and "env AWS_ACCESS_KEY_ID set" in rows["s3"]
    assert "FAIL" in rows["mlflow"] and ml in rows["mlflow"]
    assert "fix: check AWS_ENDPOINT_URL" in r.stdout
    assert secret not in r.stdout + r.stderr and "AKIAIOSFODNN7EXAMPLE" not in r.stdout


def test_doctor_probes_the_bucket_a_recipe_names(moto_server, s3_bucket, tmp_path):
    from tests.s3util import FAKE_ENV, FAKE_SECRET

    recipe = tmp_path / "tile" / "on_s3.yaml"
    recipe.parent.mkdir()
    recipe.write_text(f"input: {s3_bucket}/slides\noutput: {s3_bucket}/tiles\n"
                      f"storage:\n  endpoint_url: {moto_server}\n")
    r = cli("doctor", "-c", str(recipe), env=_doctor_env(**FAKE_ENV))
    s3_row = next(line for line in r.stdout.splitlines() if line.startswith("s3 "))
    assert "OK" in s3_row and f"bucket {s3_bucket[5:]} ok" in s3_row, r.stdout
    assert FAKE_SECRET not in r.stdout


def test_doctor_exits_zero_when_nothing_fails():
    r = cli("doctor", env=_doctor_env())
    assert r.returncode == 0, r.stdout
    assert "WARN" in r.stdout and "no S3 endpoint or credentials configured" in r.stdout
    assert "0 FAIL" in r.stdout


# ----------------------------------------------------------------------------- image

def test_entrypoint_runs_stages_through_fusedist(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "fusedist").write_text("#!/bin/sh\necho \"FUSEDIST $*\"\n")
    (fake / "fusedist").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}/usr/bin:/bin", HOME=str(tmp_path))
    env.pop("FUSEDIST_CACHE", None)
    script = str(REPO / "launch" / "entrypoint.sh")

    def run(*args):
        return subprocess.run([script, *args], env=env, capture_output=True, text=True)

    assert run("tile", "-c", "x.yaml").stdout == "FUSEDIST tile -c x.yaml\n"
    assert run("doctor").stdout == "FUSEDIST doctor\n"
    assert run("--help").stdout == "FUSEDIST --help\n"
    assert run("echo", "plain", "command").stdout == "plain command\n"
    assert (tmp_path / ".cache" / "fusedist").is_dir()


def test_dockerfile_makes_a_non_root_image_of_the_project():
    text = (REPO / "launch" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines and "FROM ${BASE_IMAGE}" in lines
    assert any("pip install ." in ln for ln in lines)
    assert "wget" in text  # KubeRay's probes run wget inside the Ray containers
    assert any(ln.startswith("COPY") and "launch/entrypoint.sh" in ln for ln in lines)
    # The last USER is uid 1000: the same user every manifest runs as.
    assert [ln for ln in lines if ln.startswith("USER ")][-1] == "USER 1000:1000"
    assert lines[-2].startswith("ENTRYPOINT") and "fusedist-entrypoint" in lines[-2]
    assert os.access(REPO / "launch" / "entrypoint.sh", os.X_OK)
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / "entrypoint.sh")]).returncode == 0
