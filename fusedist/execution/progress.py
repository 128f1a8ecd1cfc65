"""Items per second, for the progress bars of task loops."""

from __future__ import annotations

import time


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
