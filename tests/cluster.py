"""A real multi-node Ray cluster on one machine, shaped like the users' KubeRay clusters.

``ray.cluster_utils.Cluster`` starts one raylet (with its own object store and worker pool) per
node. The head has ``num_cpus=0``, as the rendered RayJobs' heads do (nothing is scheduled
there); worker nodes declare ``GPU`` like the GPU worker group. Declared GPUs do not exist
here, so the fixture sets ``FUSEDIST_DEVICE_OVERRIDE=cpu`` for every process of the cluster:
encoder actors still *request* GPUs exactly as on a GPU cluster, and compute on CPU.

Tests that use these fixtures are marked ``cluster``; conftest runs them after all others,
because they replace the session's local Ray with the multi-node one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

# Small object stores: three raylets share a 2-core CI machine with other tests.
OBJECT_STORE = 120 * 2**20
# Detect a removed node within seconds, not the default 30 s.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                 "health_check_failure_threshold": 4}


@dataclass
class MultiNode:
    """A live ``ray.cluster_utils.Cluster`` the test process is connected to."""

    cluster: object
    gpu_workers: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def add_gpu_worker(self, cpus: float = 2, gpus: int = 1, wait: bool = True):
        """A GPU worker node (one pod of the GPU group): its own raylet."""
        node = self.cluster.add_node(num_cpus=cpus, num_gpus=gpus,
                                     object_store_memory=OBJECT_STORE, wait=wait)
        self.gpu_workers.append(node)
        return node

    def remove(self, node, wait: bool = True) -> None:
        """Lose a pod: kill the node's raylet and every worker process on it; with ``wait``,
        return once the GCS has marked it dead (a few health-check periods)."""
        self.gpu_workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)
        deadline = time.monotonic() + 60
        while wait and node.node_id in self.alive_node_ids():
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node.node_id} still alive 60 s after removal")
            time.sleep(0.2)

    def alive_node_ids(self) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def gpu_node_ids(self) -> set[str]:
        """Ids of live nodes that declare GPUs (asked of the GCS, not of this object)."""
        import ray

        return {n["NodeID"] for n in ray.nodes()
                if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


def start_multinode(workers: int = 2, cpus: float = 2, gpus: int = 1,
                    dashboard_port: int | None = None) -> MultiNode:
    """Start head (CPU 0) + ``workers`` GPU nodes and connect this process to it; with
    ``dashboard_port``, the head serves the Jobs API there (as a KubeRay head does)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's local Ray (cluster tests run last)
        ray.shutdown()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE,
                                      "_system_config": SYSTEM_CONFIG,
                                      "include_dashboard": dashboard_port is not None,
                                      **({"dashboard_host": "127.0.0.1",
                                          "dashboard_port": dashboard_port}
                                         if dashboard_port else {})})
    mn = MultiNode(cluster)
    for _ in range(workers):
        mn.add_gpu_worker(cpus=cpus, gpus=gpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    return mn


def stop_multinode(mn: MultiNode) -> None:
    import ray

    ray.shutdown()
    mn.cluster.shutdown()


@pytest.fixture
def multinode() -> Iterator[MultiNode]:
    """Head (``num_cpus=0``) + 2 GPU worker nodes (2 CPUs, 1 declared GPU each: room for an
    actor and decode tasks, as a GPU pod has), with
    ``FUSEDIST_DEVICE_OVERRIDE=cpu`` in every process; torn down after the test, so a test may
    remove and add nodes freely."""
    with pytest.MonkeyPatch.context() as mp:
        # Raylets and their workers inherit this process's environment at start.
        mp.setenv("FUSEDIST_DEVICE_OVERRIDE", "cpu")
        mn = start_multinode()
        try:
            yield mn
        finally:
            stop_multinode(mn)


# ----------------------------------------------------------------------------- autoscaling

# Ray's wheel lacks fake_multi_node/example.yaml, which ray.cluster_utils.AutoscalingCluster
# reads, and AutoscalingCluster.start/shutdown run `ray stop --force` (every Ray process on the
# machine, the session's own included). So the head is a plain Cluster head started with an
# autoscaling config for Ray's fake multi-node provider, whose monitor adds and removes real
# raylets on this machine as the demand asks.
#
# Why a hand-written config hung for 400 s: the fake provider starts each new node against
# `<node ip>:6379` unless `provider.gcs_address` names the head. A head on any other port (every
# test cluster) got worker raylets that never joined it, so the GPU actors waited forever.
GPU_TYPE = "gpu-group"
FAKE_NODE_PREFIX = "ffffffffffffffff"  # ids the fake provider gives the nodes it launches


def autoscaling_config(gcs_address: str, max_workers: int = 2, cpus: float = 2,
                       gpus: int = 1, idle_timeout_s: float = 6) -> dict:
    """The rendered RayJobs' shape: a head that runs nothing, one GPU worker group from 0 up to
    ``max_workers`` that scales back to 0 when idle."""
    empty: list = []
    return {
        "cluster_name": "fusedist-test", "max_workers": max_workers,
        "idle_timeout_minutes": idle_timeout_s / 60, "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {"resources": {"CPU": cpus, "GPU": gpus,
                                     "object_store_memory": OBJECT_STORE},
                       "node_config": {}, "min_workers": 0, "max_workers": max_workers}},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": empty, "setup_commands": empty,
        "head_setup_commands": empty, "worker_setup_commands": empty,
        "head_start_ray_commands": empty, "worker_start_ray_commands": empty,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _kill_fake_nodes(gcs_address: str) -> None:
    """The provider's nodes outlive the head (started without a reaper): kill every process
    that belongs to this cluster, found by its GCS address on the command line."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(gcs_address in a for a in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@dataclass
class Autoscaling:
    """A live autoscaling cluster the test process is connected to."""

    cluster: object
    address: str

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def gpu_node_ids(self) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes()
                if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


@pytest.fixture
def autoscaling(tmp_path_factory) -> Iterator[Autoscaling]:
    """Head (``num_cpus=0``) + an autoscaling GPU group (0 to 2 nodes of 2 CPUs, 1 declared GPU),
    as the rendered RayJobs ask; ``FUSEDIST_DEVICE_OVERRIDE=cpu`` in every process."""
    import json

    import ray
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    address = f"{get_node_ip_address()}:{port}"
    path = tmp_path_factory.mktemp("autoscaler") / "cluster.json"
    path.write_text(json.dumps(autoscaling_config(address)))
    with pytest.MonkeyPatch.context() as mp:
        # The monitor (and the nodes it starts) inherit this environment.
        mp.setenv("FUSEDIST_DEVICE_OVERRIDE", "cpu")
        mp.setenv("RAY_FAKE_CLUSTER", "1")
        mp.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 0, "gcs_server_port": port, "object_store_memory": OBJECT_STORE,
            "_system_config": SYSTEM_CONFIG, "include_dashboard": False,
            "autoscaling_config": str(path)})
        try:
            ray.init(address=cluster.address, logging_level="WARNING")
            yield Autoscaling(cluster, cluster.address)
        finally:
            ray.shutdown()
            cluster.shutdown()
            _kill_fake_nodes(address)
