"""The CLI a person reads: --print-config on every stage, Ray's own output in the run's log
file (not the terminal) unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fusedist.cli import app
from fusedist.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _models():
    from fusedist.demo import DemoConfig
    from fusedist.distill.config import DistillConfig, ExportConfig
    from fusedist.features import CacheConfig, EmbedConfig
    from fusedist.fusion.config import FuseConfig
    from fusedist.synth import SynthConfig
    from fusedist.tiling import TileConfig

    return {"synth": SynthConfig, "tile": TileConfig, "cache": CacheConfig,
            "embed": EmbedConfig, "distill": DistillConfig, "export": ExportConfig,
            "fuse": FuseConfig, "demo": DemoConfig}


# (stage, recipe or None, CLI args, the fields they set)
CASES = [
    ("synth", None, ["--num-slides", "3", "--output", "/o"], {"num_slides": 3, "output": "/o"}),
    ("tile", "configs/tile/pairs.yaml", ["-i", "/data/slides"], {"input": "/data/slides"}),
    ("cache", None, ["--tiles", "/t", "-t", "test-vit"], {"tiles": "/t", "teachers": ["test-vit"]}),
    ("embed", None, ["--tiles", "/t", "-e", "test-vit"], {"tiles": "/t", "encoders": ["test-vit"]}),
    ("distill", "configs/distill/xmag_paper.yaml", ["--workers", "3"], {}),
    ("export", None, ["/runs/xmag"], {"checkpoint": "/runs/xmag"}),
    ("fuse", "configs/fuse/classification.yaml", ["--bags", "/b"], {"bags": "/b"}),
    ("demo", None, ["--num-slides", "4"], {"num_slides": 4}),
]


@pytest.mark.parametrize("stage, recipe, args, fields", CASES, ids=[c[0] for c in CASES])
def test_print_config_is_the_resolved_config(stage, recipe, args, fields, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fusedist-cli-secret-Q7w9zXk2pL")
    sets = ["storage.endpoint_url=http://minio:9000", "storage.max_attempts=3"]
    argv = [stage, *(["-c", str(REPO / recipe)] if recipe else []), *args,
            *[x for s in sets for x in ("--set", s)], "--print-config"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.stdout)
    extra = ["scaling.num_workers=3"] if stage == "distill" else []
    want = load_config(_models()[stage], REPO / recipe if recipe else None, sets + extra,
                       **fields)
    assert printed == want.model_dump(mode="json")  # defaults + file + --set + flags
    assert printed["storage"]["max_attempts"] == 3
    # Nothing ran: no Ray, no outputs; a secret in the environment never shows.
    assert "fusedist-cli-secret" not in r.stdout


def test_print_config_masks_a_password_in_a_url():
    r = CliRunner().invoke(app, ["synth", "--set", "output=s3://b/x", "--set",
                                 "storage.endpoint_url=http://user:hunter2pass@minio:9000",
                                 "--print-config"])
    assert r.exit_code == 0 and "hunter2pass" not in r.stdout and "minio:9000" in r.stdout


PROBE = textwrap.dedent("""
    import logging, sys, threading
    from fusedist.cli import _setup_logging
    _setup_logging(False, verbose=sys.argv[1] == "1", stage="probe")
    from fusedist.execution.rayrun import init_ray
    init_ray()
    import ray
    from ray._private import worker as ray_worker

    seen = threading.Event()  # the worker's lines reached this driver (either way)
    ray_worker.global_worker_stdstream_dispatcher.add_handler(
        "probe", lambda d: seen.set() if any("WORKER-NOISE" in x for x in d["lines"]) else 0)

    @ray.remote(num_cpus=0)
    def noisy():
        print("WORKER-NOISE-42")
        logging.getLogger("ray.train.probe").warning(
            "Failed to query Ray Train Controller actor state. State API may be "
            "temporarily unavailable. Continuing to monitor.")
        return 1

    assert ray.get(noisy.remote()) == 1
    assert seen.wait(60), "worker output never reached the driver"
    logging.getLogger("ray.data").warning("RAY-DATA-DRIVER-NOISE")
    print("fusedist summary: 1 task")
""")


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "verbose"])
def test_ray_output_goes_to_the_log_file_unless_verbose(ray_cluster, tmp_path, verbose):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, FUSEDIST_LOG_DIR=str(tmp_path / "logs"),
               PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", PROBE, "1" if verbose else "0"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shown = r.stdout + r.stderr
    assert "fusedist summary: 1 task" in r.stdout
    logs = list((tmp_path / "logs").glob("probe-*.log"))
    if verbose:
        assert "WORKER-NOISE-42" in shown and "RAY-DATA-DRIVER-NOISE" in shown
        assert not logs
        return
    for noise in ("WORKER-NOISE-42", "State API", "RAY-DATA-DRIVER-NOISE"):
        assert noise not in shown, shown[-3000:]
    (log,) = logs
    text = log.read_text()
    assert "WORKER-NOISE-42" in text and "State API" in text and "RAY-DATA-DRIVER-NOISE" in text
    assert f"Ray's logs: {log}" in r.stderr
