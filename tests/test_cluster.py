"""Stages on a real multi-node Ray cluster shaped like KubeRay's (tests/cluster.py).

Declared GPUs do not exist here: ``FUSEDIST_DEVICE_OVERRIDE=cpu`` (set by the fixture) makes
actors compute on CPU while their Ray resource requests stay those of a GPU cluster.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.cluster


def test_fixture_is_a_cpu0_head_with_gpu_workers_that_come_and_go(multinode):
    import ray

    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert nodes[multinode.head_node_id]["Resources"].get("CPU", 0) == 0
    assert len(multinode.gpu_node_ids()) == 2 and multinode.head_node_id not in \
        multinode.gpu_node_ids()

    @ray.remote(num_gpus=1, num_cpus=1)
    def where():
        import os
        return ray.get_runtime_context().get_node_id(), os.environ.get("FUSEDIST_DEVICE_OVERRIDE")

    node, override = ray.get(where.remote())
    assert node in multinode.gpu_node_ids() and override == "cpu"
    lost = multinode.gpu_workers[0]
    multinode.remove(lost)
    assert lost.node_id not in multinode.gpu_node_ids() and len(multinode.gpu_node_ids()) == 1
    added = multinode.add_gpu_worker()
    assert added.node_id in multinode.gpu_node_ids() and len(multinode.gpu_node_ids()) == 2
