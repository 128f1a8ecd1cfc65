"""Scale: the sampled sample log, and benchmarks/scale_sim.py's smallest scale (so it can't rot)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from fusedist.distill.checkpoint import (COMMITTED, SampleLog, logs_key, read_sample_log,
                                         sample_log_fraction)
from fusedist.distill.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]


def _keys(n: int) -> list[str]:
    sid = "TCGA-AB-1234-01Z-00-DX1.0A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9"
    return [f"{sid}_{i // 400}/{(i % 20) * 1792}_{(i % 400 // 20) * 1792}" for i in range(n)]


def test_sample_log_fraction_caps_keys_per_epoch():
    cap = DistillConfig(tiles="t", features="f").sample_log_keys
    assert cap == 100_000  # the default: a full log for small runs, sampled at scale
    assert sample_log_fraction(cap, 50_000) == 1.0
    assert sample_log_fraction(None, 3_490_000) == 1.0
    assert abs(sample_log_fraction(cap, 3_490_000) * 3_490_000 - cap) < 1e-6


def test_sampled_log_is_a_fixed_exact_subset(tmp_path):
    keys, frac = _keys(20_000), 0.05
    expected = [k for k in keys if logs_key(k, frac)]
    assert 800 < len(expected) < 1200  # ~5 %
    run = str(tmp_path)
    logs = [SampleLog(run, r, fraction=frac) for r in range(2)]
    for epoch in range(2):  # two ranks split the keys; the same subset every epoch
        for r, log in enumerate(logs):
            log.add(epoch, 10 * (epoch + 1), keys[r::2])
            log.flush(10 * (epoch + 1))
        logs[0].commit(10 * (epoch + 1), "ckpt")
    got = read_sample_log(run)
    assert sorted(got[0]) == sorted(expected) == sorted(got[1])
    marker = json.loads((tmp_path / "sample_log" / "step-000000010" / COMMITTED).read_text())
    assert marker["fraction"] == frac
    full = SampleLog(str(tmp_path / "full"), 0)
    full.add(0, 1, keys[:7])
    assert len(full._rows) == 7  # fraction 1: every key


def test_scale_sim_smallest_quick_scale(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("scale_sim", ROOT / "benchmarks" / "scale_sim.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scale_sim"] = mod
    spec.loader.exec_module(mod)
    # 0.3 % of the paper's scale: 30 slides, ~10k samples (enough patients for 5 folds).
    res = mod.run_scale(0.003, memory=False, ckpt_bytes=10**9, keep=tmp_path)
    pts = res["points"]
    assert res["slides"] == 30 and res["samples"] == 10_470
    sl = pts["distill: sample log default (sample_log_keys: 100000), one rank's epoch"].extra
    assert sl["fraction"] == 1.0 and sl["full_scale_fraction"] < 0.03  # sampled at scale only
    cache = pts["cache: which shards to do (done-entries)"].extra
    assert cache["todo"] == 0
    # One listing + one read per done-entry: no request per shard to ask whether it exists.
    assert cache["storage_ops"] == {"listdir": 1, "read_json": res["shards"]}
    # embed's done-entry check finds exactly what opening every bag finds (one bag missing).
    assert pts["embed: which bags to do (done-entries, `bags_to_do`)"].extra["todo"] == \
        pts["embed: which bags to do (every HDF5 opened, before)"].extra["todo"] == 1
    rerun = pts["tile: re-run skip check (run_tile, all done)"].extra
    assert rerun["tasks"] == {}
    # The input folder and the manifest (a constant), never one request per shard.
    assert rerun["storage_ops"].get("exists", 0) <= 2
    assert rerun["storage_ops"]["read_json"] == res["slides"] + res["shards"] + 1
    diff = pts[f"tile: re-run after +{mod.NEW_SLIDES} slides (retrain diff)"].extra
    assert diff["tasks"]["plan_slide"] == mod.NEW_SLIDES
    assert pts["fuse: cohort load (labels join, exclusions, folds)"].extra["slides"] > 20
    # A resume reads past no more samples with shard indexes than without (older shards); at
    # this scale a slot fits its shuffle buffer, so both read the same (tests/test_reader.py
    # checks the jumps), and the indexed run reads each opened shard's index.
    resume = "reader: resume at epoch midpoint, to 1st micro-batch (per worker"
    indexed = pts[resume + ")"].extra
    plain = pts[resume + ", shards without indexes)"].extra
    assert 0 <= indexed["samples_streamed_past"] <= plain["samples_streamed_past"]
    assert indexed["storage_ops"]["read_bytes"] > 0 and "read_bytes" not in plain["storage_ops"]
    table = mod.report([res, res])
    assert "| reader: epoch plan (per worker) |" in table
    assert "exponent" in table
