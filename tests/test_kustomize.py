"""k8s/ as a Kustomize base: the generated kustomizations, fusedist's Python rendering of them
(checked against `kubectl kustomize` where a binary exists), overlays, and the validator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusedist.launch import kustomize as kz
from fusedist.launch.validate import validate_docs

REPO = Path(__file__).resolve().parents[1]
KUSTOMIZATIONS = [REPO / "k8s", REPO / "k8s" / "jobs", REPO / "k8s" / "retrain"]


def _key(d: dict) -> tuple:
    return d["kind"], d["metadata"].get("name") or d["metadata"].get("generateName")


def _overlay(tmp_path: Path, bases=("k8s", "k8s/jobs")) -> Path:
    ov = tmp_path / "overlays" / "prod"
    ov.mkdir(parents=True)
    (ov / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(REPO / b, ov) for b in bases],
        "namespace": "team-a",
        "images": [{"name": "fusedist", "newName": "registry.example.com/ml/fusedist",
                    "newTag": "0.2.0"}]}))
    return ov


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_base_renders_every_listed_file(folder):
    # Validation of the rendered base: test_launch.py::test_committed_manifest_is_valid.
    docs = kz.render(folder)
    listed = yaml.safe_load(kz.kustomization_file(folder).read_text())
    want = [d for r in listed["resources"]
            for d in yaml.safe_load_all((folder / r).read_text()) if d]
    assert sorted(map(_key, docs)) == sorted(map(_key, want)) and docs
    assert {d["metadata"].get("namespace", "fusedist") for d in docs} == {"fusedist"}
    if kz.binary():  # the real kustomize where one is installed: the same objects
        real, how = kz.build(folder)
        assert how != "fusedist (Python)"
        assert sorted(real, key=_key) == sorted(docs, key=_key)


def test_overlay_changes_namespace_and_registry(tmp_path):
    ov = _overlay(tmp_path)
    docs = kz.render(ov)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "RayCluster", "RayJob", "Deployment", "RoleBinding"} <= kinds
    ns = next(d for d in docs if d["kind"] == "Namespace")
    assert ns["metadata"]["name"] == "team-a"
    assert all(d["metadata"]["namespace"] == "team-a" for d in docs if d["kind"] != "Namespace")
    rb = next(d for d in docs if d["kind"] == "RoleBinding")
    assert {s["namespace"] for s in rb["subjects"]} == {"team-a"}
    images = {c["image"] for d in docs for c in kz._containers(d)}
    assert images == {"registry.example.com/ml/fusedist:0.2.0"}
    # The MLflow URL the jobs use is the same-namespace Service name, so it follows too.
    env = [e for d in docs for c in kz._containers(d) for e in c.get("env", [])
           if e["name"] == "MLFLOW_TRACKING_URI"]
    assert env and {e["value"] for e in env} == {"http://fusedist-mlflow:5000"}
    assert validate_docs(docs) == []
    if kz.binary():
        real, _ = kz.build(ov)
        assert sorted(real, key=_key) == sorted(docs, key=_key)


def test_validate_cli_renders_kustomizations_without_a_binary(tmp_path):
    ov = _overlay(tmp_path, bases=("k8s/retrain",))
    # PATH without kustomize/kubectl: the Python rendering is used.
    env = dict(os.environ, PATH=str(Path(sys.executable).parent), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "fusedist.cli", "launch", "validate", str(ov)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0 and "1 file(s) valid" in r.stdout, r.stdout + r.stderr
    # A kustomization using what the Python rendering lacks: a clear error with the command.
    (ov / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(REPO / "k8s", ov)],
        "patches": [{"path": "gpu.yaml"}]}))
    r = subprocess.run([sys.executable, "-m", "fusedist.cli", "launch", "validate", str(ov)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2
    assert "kustomization.yaml: patches not supported" in r.stderr
    assert "kubectl kustomize" in r.stderr
