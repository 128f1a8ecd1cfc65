"""Is ``storage_path`` reachable from every node of the cluster?

Ray Train persists checkpoints and the sample log from every worker to ``storage_path``, and a
restarted group (a lost node replaced) resumes from there. On more than one node a plain local
folder is a different folder on each node: checkpoints land on pods that then disappear, and
the run cannot resume, or fails late, after hours of training. So a multi-node run must use
S3 (or any ``scheme://`` Ray Train can write) or a network filesystem mounted on every node;
this check fails *before any work* and says so. A local path counts as shared when its mount
is a network/cluster filesystem (``/proc/mounts``), or when the config says it is
(``storage_shared: true``, for filesystems the list below does not know).
"""

from __future__ import annotations

import os
from pathlib import Path

from fusedist import storage
from fusedist.config import ConfigError

# Filesystem types that are the same folder on every node that mounts them.
SHARED_FS_TYPES = {"nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "gpfs",
                   "beegfs", "wekafs", "9p", "virtiofs", "efs", "fuse.s3fs", "fuse.gcsfuse",
                   "fuse.juicefs", "fuse.ceph-fuse", "fuse.mountpoint-s3", "fuse.sshfs"}


def mount_fstype(path: str | os.PathLike, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount that holds ``path`` (longest mount-point prefix)."""
    target = Path(path).expanduser().resolve()  # not strict: the run folder may not exist yet
    best, fstype = "", None
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = str(target) == point or str(target).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, parts[2]
    return fstype


def is_shared(storage_path: str, declared: bool = False, mounts: str = "/proc/mounts") -> bool:
    """Whether every node sees the same ``storage_path``."""
    if declared or storage.is_s3(storage_path) or "://" in storage_path.split("file://")[-1]:
        return True
    local = storage.local_path(storage_path)
    fstype = mount_fstype(local, mounts)
    return fstype is not None and (fstype in SHARED_FS_TYPES or fstype.startswith("fuse."))


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def check_storage_reachable(storage_path: str, declared: bool, nodes: int,
                            mounts: str = "/proc/mounts") -> None:
    """Raise before any work when a run on ``nodes`` > 1 nodes has node-local storage."""
    if nodes <= 1 or is_shared(storage_path, declared, mounts):
        return
    fstype = mount_fstype(storage.local_path(storage_path), mounts) or "unknown"
    raise ConfigError(
        f"storage_path: {storage_path} is a local folder ({fstype} filesystem) but this Ray "
        f"cluster has {nodes} nodes: each node would write its checkpoints to its own disk "
        "and a restarted worker group could not resume. Use S3 (--set storage_path=s3://"
        "bucket/runs) or a shared filesystem mounted on every node; if it is one already "
        "(a type fusedist does not recognise), set storage_shared=true")
