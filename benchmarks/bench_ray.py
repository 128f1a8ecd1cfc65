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


class TreeMemory:
    """Peak memory of this process and every process under it (a local Ray's GCS, raylet and
    workers are its descendants), sampled every ``every`` seconds while the block runs.

    ``peak_uss``: the largest sum of unique set sizes (private memory; the object store's
    shared pages are counted once, in ``peak_shm``, not once per process that maps them)."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak_uss, self.peak_shm, self.peak_procs = every, 0, 0, 0

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        uss = shm = 0
        procs = [me, *me.children(recursive=True)]
        for p in procs:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            uss += info.uss
            shm = max(shm, info.shared)
        self.peak_uss = max(self.peak_uss, uss)
        self.peak_shm = max(self.peak_shm, shm)
        self.peak_procs = max(self.peak_procs, len(procs))

    def __enter__(self) -> "TreeMemory":
        import threading

        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.every):
                self._sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if not self.peak_procs:  # a block shorter than one period: sample it once at least
            self._sample()

    def __str__(self) -> str:
        return (f"process tree peak {self.peak_uss / 2**30:.2f} GiB private (USS summed over "
                f"up to {self.peak_procs} processes), {self.peak_shm / 2**30:.2f} GiB largest "
                "shared mapping")
