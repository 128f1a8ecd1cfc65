"""Stopping a distill run from its driver (SIGTERM, Ctrl-C), and tidying up after one.

Ray Train V2 aborts a run on SIGINT by asking its controller to abort the worker group; a
SIGTERM (what Kubernetes and ``kill`` send) had no handler and aborted the driver mid-C++
(exit 134). :func:`stoppable` gives both signals the controller's graceful abort, remembers
which one came, and lets :func:`fusedist.distill.train.run_distill` end with
:class:`DistillStopped` (exit 130 / 143, how to resume). A second signal exits at once.

Ray Train keeps the checkpoints it *registered* (``checkpoint_manager_snapshot.json``) and
prunes them to ``checkpoint.num_to_keep``; a checkpoint folder that a stopped attempt was still
uploading is registered by no one and would stay forever (and could look newest to
``fusedist export``). :func:`prune_unregistered` removes those.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from fusedist import storage

log = logging.getLogger("fusedist.distill")

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint registry


class DistillStopped(Exception):
    """The driver was asked to stop (SIGINT/SIGTERM); the message says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 Ctrl-C, 143 SIGTERM


def stoppable(trainer_cls: type) -> type:
    """A subclass of Ray's trainer whose SIGINT *and* SIGTERM abort the run gracefully."""

    class Stoppable(trainer_cls):  # type: ignore[misc, valid-type]
        stopped_by: int | None = None

        # Ray calls this (main thread only) with the controller, right before waiting on it.
        def _register_sigint_handler(self, controller: Any) -> None:
            import ray

            def handler(signum: int, frame: Any) -> None:
                if self.stopped_by is not None:
                    os._exit(128 + signum)  # asked twice: stop waiting for a clean abort
                self.stopped_by = signum
                log.warning("%s received: stopping the trainer and its workers (send it again "
                            "to exit at once)", signal.Signals(signum).name)
                try:
                    ray.get(controller.abort.remote())
                except ray.exceptions.RayActorError:
                    pass  # the controller exits as it aborts

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, handler)

    Stoppable.__name__ = f"Stoppable{trainer_cls.__name__}"
    return Stoppable


def _registered(run_url: str) -> tuple[set[str], str | None] | None:
    """Checkpoint folder names Ray Train registered for the run, and the latest; None when
    there is no readable registry (a fresh run, or a Ray whose format we do not know)."""
    url = storage.join(run_url, SNAPSHOT)
    if not storage.exists(url):
        return None
    try:
        snap = storage.read_json(url)
        names = {str(r["checkpoint_dir_name"]) for r in snap["checkpoint_results"]}
        latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (KeyError, TypeError, ValueError) as e:
        log.warning("%s: cannot read Ray Train's checkpoint registry (%s); not pruning", url, e)
        return None
    return names, latest


def prune_unregistered(run_url: str) -> list[str]:
    """Delete ``checkpoint_*`` folders of the run that Ray Train never registered (uploads of
    stopped or killed attempts). Call only while no worker of the run is alive."""
    reg = _registered(run_url)
    if reg is None:
        return []
    names, _ = reg
    gone = []
    for entry in storage.listdir(run_url):
        name = entry.rstrip("/")
        if entry.endswith("/") and name.startswith("checkpoint_") and name not in names:
            storage.delete_tree(storage.join(run_url, name))
            gone.append(name)
    if gone:
        log.info("removed %d checkpoint folder(s) of stopped attempts: %s", len(gone), gone)
    return gone


def last_committed(run_url: str) -> str | None:
    """The run's newest registered checkpoint (what a re-run resumes from), or None."""
    reg = _registered(run_url)
    if reg is None or reg[1] is None:
        return None
    return storage.join(run_url, reg[1])
