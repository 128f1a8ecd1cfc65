"""fusedist.execution.sharedfs: which storage paths every node of a cluster can reach."""

from __future__ import annotations

import pytest

from fusedist.config import ConfigError
from fusedist.execution.sharedfs import check_storage_reachable, is_shared, mount_fstype

MOUNTS = """overlay / overlay rw 0 0
/dev/vda1 /data ext4 rw 0 0
fs-1.efs:/ /mnt/shared nfs4 rw 0 0
juicefs:vol /mnt/jfs fuse.juicefs rw 0 0
/dev/vdb /mnt/shared/local ext4 rw 0 0
"""


@pytest.fixture
def mounts(tmp_path):
    p = tmp_path / "mounts"
    p.write_text(MOUNTS)
    return str(p)


def test_the_longest_mount_prefix_decides(mounts):
    assert mount_fstype("/mnt/shared/runs/x", mounts) == "nfs4"
    assert mount_fstype("/mnt/shared/local/runs", mounts) == "ext4"  # a disk inside the NFS
    assert mount_fstype("/mnt/sharedish/runs", mounts) == "overlay"  # not a prefix match
    assert mount_fstype("/data/runs", mounts) == "ext4"


def test_what_counts_as_shared(mounts):
    assert is_shared("s3://bucket/runs", mounts=mounts)
    assert is_shared("gs://bucket/runs", mounts=mounts)  # any scheme Ray Train writes
    assert is_shared("/mnt/shared/runs", mounts=mounts)
    assert is_shared("file:///mnt/jfs/runs", mounts=mounts)
    assert not is_shared("/data/runs", mounts=mounts)
    assert is_shared("/data/runs", declared=True, mounts=mounts)


def test_multi_node_on_local_disk_is_refused_with_the_fix(mounts):
    check_storage_reachable("/data/runs", False, nodes=1, mounts=mounts)  # one node: fine
    check_storage_reachable("/mnt/shared/runs", False, nodes=4, mounts=mounts)
    with pytest.raises(ConfigError, match=r"/data/runs is a local folder \(ext4 filesystem\) "
                                          r"but this Ray cluster has 4 nodes.*s3://"):
        check_storage_reachable("/data/runs", False, nodes=4, mounts=mounts)
