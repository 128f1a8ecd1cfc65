"""Validate Kubernetes manifests offline: KubeRay CRDs, built-in kinds, and no literal secrets.

- **KubeRay kinds** (RayJob, RayCluster, RayCronJob) are checked with ``jsonschema`` against
  the CRD's ``spec.versions[v1].schema.openAPIV3Schema``, made strict the way the API server
  prunes: an object schema that lists ``properties`` (and does not preserve unknown fields)
  forbids other keys; ``x-kubernetes-int-or-string`` means int or string; a ``required`` field
  that has a ``default`` is not missing (the server fills it in). CEL rules
  (``x-kubernetes-validations``) are not evaluated.
- **Built-in kinds** go through ``kubernetes-validate`` in strict mode (unknown keys fail),
  with the schemas it bundles for Kubernetes :data:`K8S_VERSION` (no cluster, no network).
- **Secrets**: no ``Secret`` with ``data``/``stringData``; no env var whose name looks like a
  credential with a literal ``value`` (only ``valueFrom``); no credential-shaped string
  (passwords in URLs, AWS key ids, private keys, ``--password=...`` arguments) anywhere.
  A ConfigMap value that is itself a manifest (the fallback CronJob's RayJob) is checked too.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

from fusedist.launch import kustomize as kz
from fusedist.launch.config import CREDENTIAL_ENV_RE, DNS_LABEL, DNS_SUBDOMAIN

K8S_VERSION = "1.34.0"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
_CREDENTIAL_VALUE_RES = [
    (re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*:(?!\$\()[^/@\s]+@"),
     "a URL with a password in it"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), "a Hugging Face token"),
    (re.compile(r"--?[\w-]*(password|secret|token|api-?key)[\w-]*[= ](?!\$\()\S+", re.I),
     "a credential passed as a command-line argument"),
]
_META_KEYS = {"name", "generateName", "namespace", "labels", "annotations"}


class ManifestError(ValueError):
    """A manifest failed validation; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def default_crd_dir() -> Path:
    """``$FUSEDIST_KUBERAY_CRDS``, else the KubeRay v1.7.0 CRDs shipped in ``fusedist/launch/crds``."""
    env = os.environ.get("FUSEDIST_KUBERAY_CRDS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "crds"


# ----------------------------------------------------------------------------- CRD schemas

def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 structural schema with the API server's semantics made explicit."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    props = out.get("properties")
    if isinstance(props, dict):
        if not out.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if "required" in out:
            out["required"] = [r for r in out["required"]
                               if not (isinstance(props.get(r), dict) and "default" in props[r])]
    if out.get("nullable") and "type" in out:  # OpenAPI's nullable = JSON Schema's null type
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=8)
def crd_schema(kind: str, crd_dir: str) -> dict:
    path = Path(crd_dir) / CRD_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"KubeRay CRD for {kind} not found at {path}: pass --crds DIR "
                                "or set FUSEDIST_KUBERAY_CRDS to the folder of ray.io_*.yaml")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _where(doc: dict) -> str:
    md = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{md.get('name') or md.get('generateName') or '?'}"


def _path(err: Any) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<root>"


def _check_metadata(doc: dict) -> list[str]:
    """CRD schemas leave ``metadata`` open (``type: object``): check the parts we write."""
    md = doc.get("metadata")
    where = _where(doc)
    if not isinstance(md, dict):
        return [f"{where}: metadata is missing"]
    errs = [f"{where}: metadata.{k} is not a field we expect in ObjectMeta"
            for k in md if k not in _META_KEYS]
    name = md.get("name") or (md.get("generateName") or "").rstrip("-")
    if not name or not re.match(DNS_SUBDOMAIN, name) or len(name) > 253:
        errs.append(f"{where}: metadata.name must be a DNS-1123 subdomain (got {name!r})")
    ns = md.get("namespace")
    if ns is not None and not re.match(DNS_LABEL, str(ns)):
        errs.append(f"{where}: metadata.namespace {ns!r} is not a DNS-1123 label")
    for key in ("labels", "annotations"):
        for k, v in (md.get(key) or {}).items():
            if not isinstance(v, str):
                errs.append(f"{where}: metadata.{key}.{k} must be a string (got {v!r})")
    return errs


def validate_custom(doc: dict, crd_dir: Path) -> list[str]:
    import jsonschema

    kind = doc["kind"]
    where = _where(doc)
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"{where}: apiVersion must be ray.io/v1 (got {doc.get('apiVersion')!r})"]
    validator = jsonschema.Draft7Validator(crd_schema(kind, str(crd_dir)))
    errs = [f"{where}: {_path(e)}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))]
    return errs + _check_metadata(doc)


def validate_builtin(doc: dict) -> list[str]:
    import kubernetes_validate

    where = _where(doc)
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {_path(e)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []


# ----------------------------------------------------------------------------- secrets

def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _is_env_var(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get("name"), str) \
        and ("value" in node or "valueFrom" in node) and set(node) <= {"name", "value",
                                                                       "valueFrom"}


def literal_secrets(doc: dict) -> list[str]:
    """Every place a manifest carries a credential literally instead of by reference."""
    where = _where(doc)
    errs: list[str] = []
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        errs.append(f"{where}: a Secret with data/stringData puts credentials in the manifest; "
                    "create it with `kubectl create secret generic` and reference it by name")
    for path, node in _walk(doc):
        if _is_env_var(node) and "value" in node and CREDENTIAL_ENV_RE.search(node["name"]):
            errs.append(f"{where}: {path}: env {node['name']} has a literal value; use "
                        "valueFrom.secretKeyRef")
        elif isinstance(node, str):
            for pattern, what in _CREDENTIAL_VALUE_RES:
                if pattern.search(node):
                    errs.append(f"{where}: {path}: holds {what}; reference a Secret instead")
    if doc.get("kind") == "ConfigMap":
        errs += [f"{where}: data.{k}: a ConfigMap key named like a credential"
                 for k in (doc.get("data") or {}) if CREDENTIAL_ENV_RE.search(k)]
    return errs


# ----------------------------------------------------------------------------- entry points

def _embedded(doc: dict) -> list[dict]:
    """Manifests carried as ConfigMap values (e.g. the RayJob the fallback CronJob creates)."""
    if doc.get("kind") != "ConfigMap":
        return []
    out = []
    for v in (doc.get("data") or {}).values():
        try:
            inner = yaml.safe_load(v)
        except yaml.YAMLError:
            continue
        if isinstance(inner, dict) and "apiVersion" in inner and "kind" in inner:
            out.append(inner)
    return out


def validate_doc(doc: Any, crd_dir: Path | None = None) -> list[str]:
    """All problems of one manifest (empty: valid)."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return [f"not a Kubernetes object (needs apiVersion and kind): {str(doc)[:80]!r}"]
    if doc["kind"] in CRD_FILES:
        errs = validate_custom(doc, crd_dir or default_crd_dir())
    else:
        errs = validate_builtin(doc)
    errs += literal_secrets(doc)
    for inner in _embedded(doc):
        errs += [f"{_where(doc)} embeds {e}" for e in validate_doc(inner, crd_dir)]
    return errs


def validate_docs(docs: list[Any], crd_dir: Path | None = None) -> list[str]:
    return [e for d in docs if d is not None for e in validate_doc(d, crd_dir)]


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def validate_file(path: str | Path, crd_dir: Path | None = None) -> list[str]:
    """Problems of one manifest file; a ``kustomization.yaml`` is rendered (``kubectl
    kustomize``, or fusedist's Python rendering without a binary) and its output checked."""
    p = Path(path)
    if kz.is_kustomization(p):
        try:
            docs, _ = kz.build(p.parent)
        except (kz.KustomizeError, yaml.YAMLError, OSError, subprocess.SubprocessError) as e:
            return [f"{p}: {e}"]
        return [f"{p} (rendered): {e}" for e in validate_docs(docs, crd_dir)]
    try:
        docs = load_docs(p.read_text())
    except yaml.YAMLError as e:
        return [f"{p}: not valid YAML: {e}"]
    return [f"{p}: {e}" for e in validate_docs(docs, crd_dir)]


def check(docs: list[Any], crd_dir: Path | None = None) -> None:
    """Raise :class:`ManifestError` listing every problem, if any."""
    errs = validate_docs(docs, crd_dir)
    if errs:
        raise ManifestError(errs)
