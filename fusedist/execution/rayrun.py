"""Ray start-up (``init_ray``, once per process), Ray's log routing, and the task interface of
:mod:`fusedist.execution.tasks` on Ray: :class:`RayTasks` and its wait loop ``run_tasks``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from fusedist.config import RayConfig

log = logging.getLogger("fusedist")

_ray_log_file: str | None = None  # set by route_ray_logs: where Ray's own output goes
_ray_log_sink: Any = None  # that file, opened once for the process


def route_ray_logs(path: str | None) -> None:
    """Send Ray's own output (its loggers, worker stdout/stderr streamed to the driver, Ray
    Data's progress dumps) to the file ``path`` instead of the terminal, so a stage prints
    only fusedist's bars and summary; ``None`` leaves Ray as it is (``--verbose``)."""
    global _ray_log_file
    _ray_log_file = path
    if path:
        # Read when ray.data is imported (the driver's DataContext): no tqdm dumps of its own.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _apply_ray_log_routing() -> None:
    """Point Ray's console output at the routed log file (idempotent; after ray.init too,
    since the worker-log printer is installed by ray.init)."""
    if not _ray_log_file:
        return
    from ray._private import log as ray_log
    from ray._private import worker as ray_worker

    global _ray_log_sink
    if _ray_log_sink is None:
        Path(_ray_log_file).parent.mkdir(parents=True, exist_ok=True)
        _ray_log_sink = open(_ray_log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    sink = _ray_log_sink
    if not getattr(ray_log.PlainRayHandler, "_fusedist_routed", False):
        # Every console handler Ray, Ray Data and Ray Train configure is a PlainRayHandler,
        # some created only when those packages are imported later: patch the class, not
        # the instances. Only this (driver) process is affected; workers keep their own.
        to_file = logging.StreamHandler(sink)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        ray_log.PlainRayHandler.emit = lambda self, record: to_file.emit(record)
        ray_log.PlainRayHandler._fusedist_routed = True
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        # Worker output (e.g. Ray Train's "Failed to query ... State API" warnings) that
        # log_to_driver would print here: into the file, with Ray's own pid= prefixes.
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs",
                               lambda data: ray_worker.print_worker_logs(data, sink))


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
    _apply_ray_log_routing()
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Workers must not inherit a huge log stream; keep Ray's own logging at warnings.
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **common)
        _apply_ray_log_routing()
        return True
    # Offline machines would otherwise try to report usage on every start.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    store_mb = cfg.object_store_memory_mb or LOCAL_OBJECT_STORE_MB
    t = time.perf_counter()
    # address="local": a private Ray even if `ray start` left a cluster on this machine (which
    # plain ray.init() would join, and then refuse num_cpus/object_store_memory).
    ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=store_mb * 1024 * 1024,
             include_dashboard=False, **common)
    _apply_ray_log_routing()
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


class RayTasks:
    """The task interface on Ray (:class:`fusedist.execution.tasks.Tasks`): joins or starts
    Ray (``init_ray``); each task reserves ``cpus`` CPUs and ``gpus`` GPUs."""

    def __init__(self, cfg: RayConfig | None, cpus: float = 1.0, gpus: float = 0.0):
        import ray

        init_ray(cfg)
        self._cpus, self._gpus = cpus, gpus
        self.slots = int(ray.cluster_resources().get("CPU", 1) // cpus)

    def __enter__(self) -> "RayTasks":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def function(self, fn: Callable, max_retries: int = 2,
                 describe: Callable[[tuple], str] | None = None) -> Any:
        import ray

        opts: dict[str, Any] = {"num_cpus": self._cpus, "max_retries": max_retries}
        if self._gpus:
            opts["num_gpus"] = self._gpus
        return ray.remote(fn).options(**opts)

    def put(self, value: Any) -> Any:
        """``value`` in the object store, once for every task that takes it."""
        import ray

        return ray.put(value)

    def run(self, refs: list, on_done: Callable[[Any], None], desc: str, unit: str = "task",
            progress: bool = True, rate: Callable[[], str] | None = None) -> None:
        run_tasks(refs, on_done, desc, unit, progress, rate=rate)
