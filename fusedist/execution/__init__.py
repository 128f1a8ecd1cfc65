"""Where a stage's work runs: Ray tasks on a cluster (or a Ray this process already runs),
local processes or this process on one machine, with one interface for both.

- :mod:`fusedist.execution.tasks`: the task interface (``function(f).remote(*args)``,
  ``run(refs, on_done, ...)``), :func:`~fusedist.execution.tasks.local_reason` (Ray or
  local, and why) and :func:`~fusedist.execution.tasks.open_tasks` (the one to use);
- :mod:`fusedist.execution.local`: that interface on a process pool (or inline), no Ray;
- :mod:`fusedist.execution.rayrun`: Ray start-up (``init_ray``), its log routing, the Ray
  implementation of the interface and the wait loop of Ray tasks (``run_tasks``);
- :mod:`fusedist.execution.sharedfs`: whether a storage path is the same on every node;
- :mod:`fusedist.execution.progress`: ``Rate``, items per second for progress bars.

Importing any of them imports no Ray: Ray is imported by the calls that need it, so
``fusedist <stage>`` on a laptop never loads it.
"""
