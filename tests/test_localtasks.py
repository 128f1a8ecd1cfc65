"""fusedist.execution.local: the task graph of a one-machine stage on a process pool, no Ray.

Real worker processes throughout; the crashes are real process deaths (``os._exit``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusedist.execution.local import LocalTasks


def square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def total(*parts: tuple[int, int]) -> tuple[int, int]:
    return os.getpid(), sum(v for _, v in parts)


def die_once(marker: str, x: int) -> int:
    """Kills its own process the first time (a segfault in a slide library, say)."""
    m = Path(marker)
    if not m.exists():
        m.write_text("died")
        os._exit(11)
    return x + 1


def always_die(x: int) -> int:
    os._exit(9)


def raises(x: int) -> int:
    raise ValueError(f"bad slide {x}")


def test_graph_results_reach_dependents_in_worker_processes():
    got = []
    with LocalTasks(2) as tasks:
        sq, tot = tasks.function(square), tasks.function(total)
        parts = [[sq.remote(i) for i in range(k, k + 3)] for k in (0, 10, 20)]
        sums = [tot.remote(*p) for p in parts]
        # a task without dependencies in the same run, and one whose argument is a plain value
        alone = tot.remote((0, 7))
        tasks.run([*sums, alone], got.append, "sums", progress=False)
    assert sorted(v for _, v in got) == sorted([0 + 1 + 4, 100 + 121 + 144, 400 + 441 + 484, 7])
    assert os.getpid() not in {pid for pid, _ in got}  # ran in worker processes
    # Each part's result was dropped once its consumer ran (memory stays flat).
    assert all(p.result is None and p.done for ps in parts for p in ps)


def test_a_dead_worker_process_is_replaced_and_its_task_retried(tmp_path):
    """Every task kills its worker once: the tasks that shared the broken pool are retried
    alone and never charged, so none runs out of retries (max_retries=1 suffices)."""
    got = []
    with LocalTasks(2) as tasks:
        fn = tasks.function(die_once, max_retries=1)
        refs = [fn.remote(str(tmp_path / f"m{i}"), i) for i in range(6)]
        tasks.run(refs, got.append, "die once", progress=False)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert len(list(tmp_path.glob("m*"))) == 6


def test_a_task_that_always_kills_its_worker_fails_the_run_naming_it():
    with LocalTasks(2) as tasks:
        fn = tasks.function(always_die, max_retries=1, describe=lambda a: f"slide s{a[0]}")
        with pytest.raises(RuntimeError,
                           match=r"died 2 times running slide s5 alone.*executor=ray"):
            tasks.run([fn.remote(5)], lambda r: None, "always", progress=False)


def test_a_task_exception_propagates_and_stops_the_pool():
    tasks = LocalTasks(2)
    fn = tasks.function(raises)
    with pytest.raises(ValueError, match="bad slide [34]"):  # whichever fails first
        tasks.run([fn.remote(3), fn.remote(4)], lambda r: None, "raises", progress=False)
    assert tasks._pool is None  # workers are gone, nothing left running


def test_inline_tasks_run_the_same_graph_in_this_process_and_raise_as_a_pool_does():
    """``LocalTasks(1, inline=True)`` (fuse with room for one process): the same graph, run
    here in dependency order, nothing pickled; a task's exception propagates the same way."""
    got = []
    with LocalTasks(1, inline=True) as tasks:
        sq, tot = tasks.function(square), tasks.function(total)
        c = tasks.put({"big": "value"})
        assert c == {"big": "value"}  # put: the value itself, locally
        sums = [tot.remote(*[sq.remote(i) for i in range(k, k + 3)]) for k in (0, 10)]
        tasks.run(sums, got.append, "sums", progress=False)
    assert sorted(v for _, v in got) == [0 + 1 + 4, 100 + 121 + 144]
    assert {pid for pid, _ in got} == {os.getpid()}
    tasks = LocalTasks(1, inline=True)
    fn = tasks.function(raises)
    with pytest.raises(ValueError, match="bad slide 3"):
        tasks.run([fn.remote(3)], lambda r: None, "raises", progress=False)
    assert tasks._pool is None


def test_open_tasks_runs_one_process_inline_and_more_in_a_pool(monkeypatch):
    from fusedist.config import RayConfig
    from fusedist.execution.tasks import open_tasks

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one = open_tasks("local", RayConfig(num_cpus=1), "folds", most=3)
    assert one.inline and one.slots == 1
    two = open_tasks("local", RayConfig(num_cpus=4), "folds", cpus=2, most=3)
    assert not two.inline and two.slots == 2
    capped = open_tasks("local", RayConfig(num_cpus=8), "folds", most=2)
    assert not capped.inline and capped.slots == 2
    # tile's pool (no cap) is never inline, even on one core; asked for, it is
    assert not open_tasks("local", RayConfig(num_cpus=1), "tiling").inline
    assert open_tasks("local", RayConfig(num_cpus=8), "folds", most=3, inline=True).inline


def test_tile_uses_ray_only_where_a_cluster_is_set_or_ray_already_runs(ray_cluster):
    import subprocess
    import sys

    from fusedist.config import RayConfig, load_config
    from fusedist.execution.local import LocalTasks
    from fusedist.tiling.config import TileConfig
    from fusedist.execution.rayrun import RayTasks
    from fusedist.tiling.job import _tasks

    probe = ("import sys; from fusedist.config import RayConfig; "
             "from fusedist.execution.tasks import uses_ray; print(uses_ray(RayConfig(address=sys.argv[1] or None)), "
             "'ray' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def probe_run(address: str, **extra: str) -> str:
        r = subprocess.run([sys.executable, "-c", probe, address], env={**env, **extra},
                           capture_output=True, text=True, check=True)
        return r.stdout.strip()

    # A laptop: nothing configured, no Ray running -> local processes, Ray not even imported.
    assert probe_run("") == "False False"
    assert probe_run("auto") == "True False"  # ray.address set (a cluster)
    assert probe_run("", RAY_ADDRESS="127.0.0.1:6379") == "True False"  # a RayJob's entrypoint
    # This process runs Ray (the session's fixture): auto uses it, local still refuses to.
    cfg = load_config(TileConfig, None, [], input="x", output="y")
    assert isinstance(_tasks(cfg), RayTasks)
    local = _tasks(cfg.model_copy(update={"executor": "local", "ray": RayConfig(num_cpus=3)}))
    assert isinstance(local, LocalTasks) and local.slots == 3
