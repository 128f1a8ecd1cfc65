"""Ray start-up and a progress loop shared by the Ray-task stages."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from fusedist.config import RayConfig

log = logging.getLogger("fusedist")


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the configured Ray cluster, or start a private local one (the laptop default)."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Workers must not inherit a huge log stream; keep Ray's own logging at warnings.
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **common)
        return
    ray.init(num_cpus=cfg.num_cpus,
             object_store_memory=(cfg.object_store_memory_mb * 1024 * 1024
                                  if cfg.object_store_memory_mb else None),
             include_dashboard=False, **common)


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
                on_done(ray.get(ref))
                bar.update(1)
                if rate is not None:
                    bar.set_postfix_str(rate(), refresh=False)


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
