"""``kubectl kustomize`` for the validator: the real binary where there is one, else a Python
rendering of the subset of Kustomize that ``k8s/`` uses.

``k8s/`` is a Kustomize base (``kustomization.yaml`` sets the namespace and the image), so a
platform team overlays registry, namespace and resources without editing generated files::

    # overlays/prod/kustomization.yaml
    resources: [https://github.com/<org>/fusedist//k8s?ref=v0.1.0]
    namespace: ml-prod
    images: [{name: fusedist, newName: registry.example.com/ml/fusedist, newTag: "0.1.0"}]

The Python rendering supports ``resources`` (files and folders with a kustomization),
``namespace`` and ``images`` — what the base needs — with Kustomize's semantics for them:
namespaced objects get the namespace, a ``Namespace`` object is renamed to it, ServiceAccount
subjects of (Cluster)RoleBindings follow it, and every ``containers``/``initContainers``
image named like an ``images`` entry is rewritten. Anything else (patches, generators,
remote bases) needs the binary: ``kubectl kustomize DIR > out.yaml`` then
``fusedist launch validate out.yaml``.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images"}
# Kinds without a namespace (the ones a fusedist deployment could hold).
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                   "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
                   "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}


class KustomizeError(ValueError):
    """A kustomization cannot be rendered; the message names the file and the way out."""


def kustomization_file(folder: Path) -> Path | None:
    return next((folder / n for n in KUSTOMIZATION_NAMES if (folder / n).is_file()), None)


def is_kustomization(path: Path) -> bool:
    return path.name in KUSTOMIZATION_NAMES


def binary() -> list[str] | None:
    """The command that renders a kustomization, if one is installed."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def build(folder: Path, use_binary: bool = True) -> tuple[list[dict], str]:
    """The objects ``kubectl kustomize folder`` prints, and what rendered them."""
    cmd = binary() if use_binary else None
    if cmd:
        r = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise KustomizeError(f"{folder}: `{' '.join(cmd)}` failed: {r.stderr.strip()}")
        return [d for d in yaml.safe_load_all(r.stdout) if d is not None], " ".join(cmd)
    return render(folder), "fusedist (Python)"


def render(folder: Path) -> list[dict]:
    """Kustomize's output for ``folder`` (the supported subset), in resource order."""
    path = kustomization_file(folder)
    if path is None:
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    unsupported = sorted(set(k) - _SUPPORTED)
    if unsupported:
        raise KustomizeError(
            f"{path}: {', '.join(unsupported)} not supported by fusedist's kustomize rendering; "
            f"install kustomize (or kubectl) and run `kubectl kustomize {folder} > out.yaml` "
            "then `fusedist launch validate out.yaml`")
    docs: list[dict] = []
    for res in k.get("resources") or []:
        if "://" in res or res.startswith("github.com/"):
            raise KustomizeError(f"{path}: remote resource {res!r} needs the kustomize binary")
        target = (folder / res).resolve()
        if target.is_dir():
            docs += render(target)
        elif target.is_file():
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d is not None]
        else:
            raise KustomizeError(f"{path}: resource {res!r} does not exist ({target})")
    if k.get("namespace"):
        docs = [_set_namespace(d, k["namespace"]) for d in docs]
    for image in k.get("images") or []:
        for d in docs:
            _set_image(d, image)
    return docs


def _set_namespace(doc: dict, ns: str) -> dict:
    doc = copy.deepcopy(doc)
    md = doc.setdefault("metadata", {})
    if doc.get("kind") == "Namespace":
        md["name"] = ns
    elif doc.get("kind") not in _CLUSTER_SCOPED:
        md["namespace"] = ns
    if doc.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
        for s in doc.get("subjects") or []:
            if s.get("kind") == "ServiceAccount":
                s["namespace"] = ns
    return doc


def _image_name(ref: str) -> str:
    """``registry/name:tag@digest`` -> ``registry/name``."""
    ref = ref.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def _new_ref(old: str, image: dict) -> str:
    name = image.get("newName") or _image_name(old)
    if image.get("digest"):
        return f"{name}@{image['digest']}"
    if image.get("newTag"):
        return f"{name}:{image['newTag']}"
    rest = old[len(_image_name(old)):]  # keep the old tag/digest
    return name + rest


def _containers(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        for key, v in node.items():
            if key in ("containers", "initContainers") and isinstance(v, list):
                yield from (c for c in v if isinstance(c, dict))
            yield from _containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _containers(v)


def _set_image(doc: dict, image: dict) -> None:
    for c in _containers(doc):
        if isinstance(c.get("image"), str) and _image_name(c["image"]) == image.get("name"):
            c["image"] = _new_ref(c["image"], image)
