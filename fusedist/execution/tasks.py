"""The task interface every task-graph stage (``tile``, ``fuse``'s folds) runs on, and the one
rule that picks Ray or this machine for it.

A :class:`Tasks` is what ``ray.remote`` offers, cut to what the stages use:

- ``fn = tasks.function(f, max_retries, describe)``, then ``ref = fn.remote(*args)``: a task
  whose arguments may be other tasks' refs (resolved to their results first);
- ``ref = tasks.put(value)``: a value many tasks take, shipped once (Ray's object store;
  locally the value itself);
- ``tasks.run(refs, on_done, desc, unit, progress, rate)``: run until every ref is done,
  calling ``on_done(result)`` in completion order, with a progress bar; a task's exception
  propagates after the others are stopped;
- ``tasks.slots``: how many tasks run at once; a context manager that stops what it started.

:class:`fusedist.execution.rayrun.RayTasks` runs them as Ray tasks,
:class:`fusedist.execution.local.LocalTasks` on a pool of local processes (or in this
process). Both give a stage the same results; :func:`open_tasks` chooses by
:func:`local_reason`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Protocol

from fusedist.config import RayConfig
from fusedist.execution.local import LocalTasks, local_cpus
from fusedist.execution.rayrun import RayTasks

log = logging.getLogger("fusedist")


class Tasks(Protocol):
    slots: int

    def __enter__(self) -> "Tasks": ...

    def __exit__(self, *exc: Any) -> None: ...

    def function(self, fn: Callable, max_retries: int = 2,
                 describe: Callable[[tuple], str] | None = None) -> Any: ...

    def put(self, value: Any) -> Any: ...

    def run(self, refs: list, on_done: Callable[[Any], None], desc: str, unit: str = "task",
            progress: bool = True, rate: Callable[[], str] | None = None) -> None: ...


def uses_ray(cfg: RayConfig | None = None) -> bool:
    """Whether a stage that can also run without Ray should use it: a cluster is configured
    (``ray.address``, ``RAY_ADDRESS``, which Ray sets for a job's entrypoint) or this process
    already runs Ray (``fusedist demo``, a notebook that called ``ray.init``)."""
    if (cfg and cfg.address) or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")  # never import Ray just to find it is not running
    return bool(ray is not None and ray.is_initialized())


def local_reason(executor: str, ray_cfg: RayConfig | None, key: str = "executor") -> str | None:
    """Why a stage with setting ``key`` = ``executor`` (auto|ray|local) runs without Ray, for
    its log line; ``None`` when it runs on Ray (``auto`` decides by :func:`uses_ray`)."""
    if executor == "ray" or (executor == "auto" and uses_ray(ray_cfg)):
        return None
    if executor == "local":
        return f"{key}=local"
    return f"{key}=auto, and no ray.address, no RAY_ADDRESS and no Ray in this process"


def open_tasks(executor: str, ray_cfg: RayConfig, what: str, cpus: float = 1.0,
               gpus: float = 0.0, preload: tuple[str, ...] = (),
               most: int | None = None, inline: bool = False) -> Tasks:
    """Ray tasks (each ``cpus`` CPUs, ``gpus`` GPUs), or local processes, one per ``cpus``
    cores (at most ``most``; a single one, or ``inline``, runs the tasks in this process),
    chosen by :func:`local_reason`; the choice and why is logged, naming ``what`` runs."""
    why = local_reason(executor, ray_cfg)
    if why is None:
        return RayTasks(ray_cfg, cpus, gpus)
    workers = max(1, int(local_cpus(ray_cfg.num_cpus) // cpus))
    if most is not None:
        workers = max(1, min(workers, most))
    if inline or (workers == 1 and most is not None):
        log.info("%s in this process without Ray (%s)", what, why)
        return LocalTasks(1, inline=True)
    log.info("%s in %d local processes without Ray (%s)", what, workers, why)
    return LocalTasks(workers, preload=preload)
