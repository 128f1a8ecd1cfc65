"""Finish calls are idempotent: a node lost after a call removed its parts, but before its reply
reached the driver, makes the driver run the call again elsewhere (the cause of a CI failure in
tests/test_cluster.py's node-loss test). No Ray here: the call's body runs directly, twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusedist import storage
from fusedist.features.parts import FinishTask, Group, done_url, part_url, run_finish, write_part


def _task(tmp_path: Path, finish) -> FinishTask:
    staging = str(tmp_path / "staging")
    rng = np.random.default_rng(0)
    for c in range(2):
        write_part(staging, "grid/s0-000000.tar", c, [f"k{c}a", f"k{c}b"],
                   {"enc": rng.standard_normal((2, 1, 4)).astype(np.float32)})
    return FinishTask(staging, {}, finish, "s0", Group(("grid/s0-000000.tar",)),
                      {"grid/s0-000000.tar": 2})


def test_a_finish_call_run_again_after_its_parts_are_gone_returns_the_same_entry(tmp_path):
    calls: list[dict] = []

    def finish(gid, payload, results):
        res = results["grid/s0-000000.tar"]
        calls.append({"keys": res.keys, "shape": list(res.features["enc"].shape)})
        return {"name": gid, "samples": len(res.keys)}

    task = _task(tmp_path, finish)
    first = run_finish(task)
    assert first == {"name": "s0", "samples": 4}
    assert calls == [{"keys": ["k0a", "k0b", "k1a", "k1b"], "shape": [4, 1, 4]}]
    assert not storage.exists(part_url(task.staging, "grid/s0-000000.tar", 0))  # parts removed
    # The driver never got the reply: it runs the same call again.
    assert run_finish(task) == first
    assert len(calls) == 1  # finish was not redone: its entry was kept
    assert json.loads(storage.read_bytes(done_url(task.staging, task.group))) == first


def test_a_finish_call_that_died_before_saving_its_entry_is_redone_from_its_parts(tmp_path):
    calls = []

    def finish(gid, payload, results):
        calls.append(gid)
        if len(calls) == 1:
            raise RuntimeError("worker lost mid-write")
        return {"name": gid, "samples": len(results["grid/s0-000000.tar"].keys)}

    task = _task(tmp_path, finish)
    with pytest.raises(RuntimeError):
        run_finish(task)
    assert storage.exists(part_url(task.staging, "grid/s0-000000.tar", 1))  # nothing lost
    assert run_finish(task) == {"name": "s0", "samples": 4} and calls == ["s0", "s0"]
