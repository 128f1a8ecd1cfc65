"""Starting Ray for a benchmark on a shared machine (imported by the benchmark scripts)."""

from __future__ import annotations

import time


def start_ray(init_ray, tries: int = 4) -> None:
    """Ray gives a raylet 30 s to register; on a heavily shared machine that can pass."""
    import ray

    for i in range(tries):
        try:
            return init_ray(None)
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            ray.shutdown()
            if i == tries - 1:
                raise
            time.sleep(10)
