"""A stage's task graph on this machine's cores without Ray: the executor of ``tile`` and of
``fuse``'s folds when no Ray is running or asked for (:mod:`fusedist.execution.tasks`).

Ray's local start and stop cost ~4-10 s on a laptop, longer than tiling a few slides takes
(issue 16), and a one-machine CPU stage needs none of what Ray adds (other nodes, GPUs, the
object store). This module offers the two Ray calls the tile stage makes, on a process pool:

- ``fn = tasks.function(f, max_retries)``, then ``ref = fn.remote(*args)``: a task, whose
  arguments may be other tasks' refs (resolved to their results first, as Ray does for
  top-level arguments);
- ``tasks.run(refs, on_done, desc, ...)``: run until every ref in ``refs`` is done, calling
  ``on_done`` with each result in completion order, with a progress bar (``run_tasks``'s).

``LocalTasks(1, inline=True)`` runs each task in this process instead, one after the other,
in the order they become ready (no worker start, nothing pickled).

Failure semantics follow Ray's: an exception raised by a task propagates (after the pool is
stopped); a worker *process* that dies (a segfault in a slide library, the OOM killer) breaks
the pool, which is rebuilt. A broken pool fails every task it was running, and it does not
say whose process died, so those tasks are then retried one at a time, alone: a task whose
process dies while it runs alone is the cause, and it is charged; after ``max_retries`` such
deaths the run fails naming it. Tasks that merely shared the pool are never charged.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

log = logging.getLogger("fusedist")


def local_cpus(num_cpus: int | None = None) -> int:
    """The cores this process may use (its affinity mask, e.g. a container's cpuset)."""
    if num_cpus:
        return num_cpus
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _started() -> None:
    """The task :meth:`LocalTasks.warm` starts each worker with."""


class _Inline(Executor):
    """An executor that runs each call at once, in this process (a pool of one)."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as e:  # a task's error is its result, as in a pool (Ctrl-C is not)
            fut.set_exception(e)
        return fut


class LocalRef:
    """One task: its function, arguments and, once run, its result."""

    def __init__(self, fn: "LocalFunction", args: tuple):
        self.fn, self.args = fn, args
        self.deps = [a for a in args if isinstance(a, LocalRef)]
        self.dependents: list[LocalRef] = []
        self.crashes = 0  # its worker died while it ran alone
        self.done = False
        self.result: Any = None
        for d in self.deps:
            d.dependents.append(self)

    def resolved_args(self) -> tuple:
        return tuple(a.result if isinstance(a, LocalRef) else a for a in self.args)


class LocalFunction:
    def __init__(self, tasks: "LocalTasks", fn: Callable, max_retries: int,
                 describe: Callable[[tuple], str] | None):
        self.tasks, self.fn, self.max_retries = tasks, fn, max_retries
        self.describe = describe or (lambda args: fn.__name__)

    def remote(self, *args: Any) -> LocalRef:
        ref = LocalRef(self, args)
        self.tasks._added(ref)
        return ref


class LocalTasks:
    """A process pool that runs :class:`LocalRef` graphs; close it (or use ``with``)."""

    def __init__(self, workers: int, preload: tuple[str, ...] = (), inline: bool = False):
        self.slots = 1 if inline else max(1, workers)
        self.inline = inline
        self._preload = list(preload)
        self._pool: Executor | None = None
        self._ready: deque[LocalRef] = deque()
        self._running: dict[Future, LocalRef] = {}
        self._suspects: deque[LocalRef] = deque()  # were running when a worker died
        self._alone: LocalRef | None = None  # the suspect running by itself

    def __enter__(self) -> "LocalTasks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(kill=exc[0] is not None)

    def function(self, fn: Callable, max_retries: int = 2,
                 describe: Callable[[tuple], str] | None = None) -> LocalFunction:
        """``fn`` as a task; ``describe(args)`` names one call in errors (e.g. its slide)."""
        return LocalFunction(self, fn, max_retries, describe)

    def put(self, value: Any) -> Any:
        """``value`` as a task argument (Ray's ``ray.put``): locally, the value itself."""
        return value

    def warm(self) -> None:
        """Start the worker processes now (their imports run while this process does other
        work), rather than on the first task; nothing for inline tasks."""
        if self.inline:
            return
        pool = self._start_pool()
        for _ in range(self.slots):  # one no-op each: the pool starts a process per call
            pool.submit(_started)

    # -- scheduling

    def _added(self, ref: LocalRef) -> None:
        if not ref.deps:
            self._ready.append(ref)

    def _start_pool(self) -> Executor:
        if self._pool is None and self.inline:
            self._pool = _Inline()
        if self._pool is None:
            # forkserver: workers fork from a clean server that imported the task modules
            # once (no inherited threads or locks of this process, unlike fork; no per-worker
            # re-import of everything, unlike spawn).
            ctx = mp.get_context("forkserver")
            if self._preload:
                ctx.set_forkserver_preload(self._preload)
            self._pool = ProcessPoolExecutor(self.slots, mp_context=ctx)
        return self._pool

    def _submit_ready(self) -> None:
        pool = self._start_pool()
        if self._suspects or self._alone:  # after a crash: one suspect at a time, alone
            if not self._running:
                self._alone = self._suspects.popleft()
                self._running[pool.submit(self._alone.fn.fn, *self._alone.resolved_args())] = \
                    self._alone
            return
        while self._ready and len(self._running) < self.slots:
            ref = self._ready.popleft()
            self._running[pool.submit(ref.fn.fn, *ref.resolved_args())] = ref

    def _finished(self, ref: LocalRef, result: Any) -> None:
        ref.done, ref.result = True, result
        if ref is self._alone:
            self._alone = None
        for d in ref.deps:  # a result no later task needs is dropped (memory stays flat)
            if all(x.done for x in d.dependents):
                d.result = None
        # Dependents go first: a shard's writer runs as soon as its parts are rendered.
        for d in reversed(ref.dependents):
            if all(x.done for x in d.deps):
                self._ready.appendleft(d)

    def _pool_broke(self, err: BaseException) -> list[tuple[LocalRef, Any]]:
        """A worker process died: keep what finished, and retry what was running on a new
        pool, alone (or give up on a task that killed its worker alone too often). Returns
        the finished results."""
        finished, lost = [], []
        for fut, ref in self._running.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                finished.append((ref, fut.result()))
            else:
                lost.append(ref)
        self._running.clear()
        self.close(kill=True)
        culprit, self._alone = self._alone, None
        if culprit is not None and culprit in lost:  # it ran by itself: its process died
            culprit.crashes += 1
            if culprit.crashes > culprit.fn.max_retries:
                raise RuntimeError(
                    f"a worker process died {culprit.crashes} times running "
                    f"{culprit.fn.describe(culprit.args)} alone: a crash in a slide library or "
                    "the machine running out of memory (see the kernel log); use fewer "
                    "processes (ray.num_cpus) or run on Ray (executor=ray)") from err
        log.warning("a local worker process died (%s); retrying %d task(s) one at a time on "
                    "a new pool", err, len(lost))
        self._suspects.extendleft(reversed(lost))
        return finished

    def run(self, refs: list[LocalRef], on_done: Callable[[Any], None], desc: str,
            unit: str = "task", progress: bool = True,
            rate: Callable[[], str] | None = None) -> None:
        """Run until every ref in ``refs`` is done; ``on_done(result)`` for each, in
        completion order (``fusedist.execution.rayrun.run_tasks`` for local processes)."""
        from tqdm import tqdm

        wanted = {id(r) for r in refs}
        left = len(refs)
        with tqdm(total=left, desc=desc, unit=unit, disable=not progress,
                  dynamic_ncols=True) as bar:
            try:
                while left:
                    self._submit_ready()
                    if not self._running:
                        raise RuntimeError(f"{desc}: {left} task(s) can never run (a "
                                           "dependency was never submitted)")
                    done, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
                    results = []
                    for fut in done:
                        if isinstance(fut.exception(), BrokenProcessPool):
                            results += self._pool_broke(fut.exception())
                            break
                        results.append((self._running.pop(fut), fut.result()))
                    for ref, result in results:
                        self._finished(ref, result)
                        if id(ref) in wanted:
                            on_done(result)
                            left -= 1
                            bar.update(1)
                            if rate:
                                bar.set_postfix_str(rate(), refresh=False)
            except BaseException:
                self.close(kill=True)
                raise

    def close(self, kill: bool = False) -> None:
        """Stop the pool; ``kill`` ends running tasks at once (an error, Ctrl-C)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.kill()
        pool.shutdown(wait=not kill, cancel_futures=True)

