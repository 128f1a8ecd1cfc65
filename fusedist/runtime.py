"""Ray start-up and a progress loop shared by the Ray-task stages."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from fusedist.config import RayConfig

log = logging.getLogger("fusedist")


# A private local Ray's object store: what passes through it (encoded tile parts, decoded
# batches of one shard, ~600 MB for 256 pairs) fits, and more spills to disk. Ray's default is
# 30% of RAM in /dev/shm, on a laptop shared with everything else.
LOCAL_OBJECT_STORE_MB = 2048


def init_ray(cfg: RayConfig | None = None) -> bool:
    """Join the configured Ray cluster, or start a private local one (the laptop default).

    Ray is started once per process: a caller that runs several stages (``fusedist demo``, a
    notebook) reuses the Ray of the first one. Returns whether this call started or joined it.
    A local Ray is lean: no dashboard, a small object store, no usage-stats reporting.
    """
    import ray

    if ray.is_initialized():
        return False
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Workers must not inherit a huge log stream; keep Ray's own logging at warnings.
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **common)
        return True
    # Offline machines would otherwise try to report usage on every start.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    store_mb = cfg.object_store_memory_mb or LOCAL_OBJECT_STORE_MB
    t = time.perf_counter()
    # address="local": a private Ray even if `ray start` left a cluster on this machine (which
    # plain ray.init() would join, and then refuse num_cpus/object_store_memory).
    ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=store_mb * 1024 * 1024,
             include_dashboard=False, **common)
    log.info("started a local Ray in %.1f s (%s CPUs, %d MB object store)",
             time.perf_counter() - t, cfg.num_cpus or "all", store_mb)
    return True


def run_tasks(refs: list, on_done: Callable[[Any], None], desc: str, unit: str = "task",
              progress: bool = True, rate: Callable[[], str] | None = None) -> None:
    """Wait for Ray ``refs`` as they finish, calling ``on_done(result)`` for each, with a
    progress bar. A task that raises propagates its exception."""
    import ray
    from tqdm import tqdm

    pending = list(refs)
    with tqdm(total=len(pending), desc=desc, unit=unit, disable=not progress,
              dynamic_ncols=True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=None)
            for ref in done:
                try:
                    result = ray.get(ref)
                except BaseException:
                    _stop(pending)
                    raise
                on_done(result)
                bar.update(1)
                if rate is not None:
                    bar.set_postfix_str(rate(), refresh=False)


def _stop(refs: list, timeout: float = 60.0) -> None:
    """Cancel tasks still running after one failed, and wait for them: a cancelled task gets
    a KeyboardInterrupt and removes its temp file, where a driver that just exited would leave
    half-written temp files behind."""
    import ray

    for ref in refs:
        ray.cancel(ref)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)


class Rate:
    """Counts items since construction and formats items/s."""

    def __init__(self, unit: str):
        self.unit = unit
        self.count = 0
        self.start = time.perf_counter()

    def add(self, n: int) -> None:
        self.count += n

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def __str__(self) -> str:
        return f"{self.count} {self.unit}, {self.count / self.elapsed:.1f} {self.unit}/s"
