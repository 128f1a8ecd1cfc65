"""The driver's progress bar for ``fusedist distill`` (step, loss, img/s, ETA).

Training runs in Ray Train workers; the driver only waits in ``trainer.fit()``. Rank 0 sends
its step and last logged metrics to a small actor (fire-and-forget, at most a few times a
second), and a thread in the driver polls it into a tqdm bar like the other stages' bars.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

_POLL_S = 0.5


class _Progress:
    """Latest (step, metrics, time) from rank 0; a Ray actor (num_cpus=0)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"step": 0, "metrics": {}}

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self.state = {"step": step, "metrics": metrics}

    def latest(self) -> dict[str, Any]:
        return self.state


class StepReporter:
    """Rank 0's side: send the step at most every ``_POLL_S`` seconds, and the last one."""

    def __init__(self, actor: Any, rank: int):
        self.actor = actor if rank == 0 else None
        self._last = 0.0

    def __call__(self, step: int, metrics: dict[str, Any], final: bool = False) -> None:
        now = time.monotonic()
        if self.actor is None or (not final and now - self._last < _POLL_S):
            return
        self._last = now
        self.actor.update.remote(step, {k: float(v) for k, v in metrics.items()
                                        if isinstance(v, (int, float))})


def _postfix(metrics: dict[str, Any]) -> str:
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "img_per_s" in metrics:
        parts.append(f"{metrics['img_per_s']:.1f} img/s")
    if "epoch" in metrics:
        parts.append(f"epoch {int(metrics['epoch'])}")
    return ", ".join(parts)


@contextlib.contextmanager
def distill_bar(total_steps: int, start_step: int = 0, enabled: bool = True
                ) -> Iterator[Any]:
    """Yield the actor handle to pass to the workers (None when disabled); the bar runs
    until the block ends."""
    if not enabled:
        yield None
        return
    import ray
    from tqdm import tqdm

    actor = ray.remote(num_cpus=0)(_Progress).remote()
    stop = threading.Event()
    bar = tqdm(total=total_steps, initial=start_step, desc="distill", unit="step",
               dynamic_ncols=True)

    def poll() -> None:
        while True:
            final = stop.is_set()  # one more read after the run ends: the last step shows
            try:
                state = ray.get(actor.latest.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the bar is best effort; training goes on
                state = None
            if state is not None and state["step"] > bar.n:
                bar.update(state["step"] - bar.n)
                bar.set_postfix_str(_postfix(state["metrics"]), refresh=True)
            if final:
                return
            stop.wait(_POLL_S)

    thread = threading.Thread(target=poll, name="distill-progress", daemon=True)
    thread.start()
    try:
        yield actor
    finally:
        stop.set()
        thread.join(timeout=15)
        bar.close()
        with contextlib.suppress(Exception):
            ray.kill(actor)
