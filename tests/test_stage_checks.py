"""Bad inputs fail before Ray starts (and before torch loads), with the stage's own message.

Every case runs the real CLI in one fresh Python process (a pytest session may already hold a
Ray, so ``ray.is_initialized()`` is only meaningful in a process of its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_RUNNER = r"""
import json, sys
from typer.testing import CliRunner
from fusedist.cli import app

out = []
for args in json.loads(sys.argv[1]):
    res = CliRunner().invoke(app, args)
    import ray  # imported here only to ask; importing does not start it
    out.append({"code": res.exit_code, "output": res.output,
                "ray": ray.is_initialized(), "torch": "torch" in sys.modules})
print(json.dumps(out))
"""


def _run_all(cases: list[list[str]], tmp: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(cases)], env=env, cwd=tmp,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_bad_inputs_fail_before_ray_with_their_messages(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    # A tile dataset is recognised by its manifest alone: enough to reach the teacher check.
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "manifest.json").write_text(json.dumps(
        {"format": "fusedist.tiles/1", "mode": "grid", "shards": [], "slides": []}))
    no_id = tmp_path / "no_id.csv"
    no_id.write_text("id,label\na,0\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na,0\n")
    out = str(tmp_path / "out")
    # A missing path is named in its stage's message (the wording is the stage's own).
    cases = [
        (["tile", "-i", str(missing), "-o", out], str(missing)),
        (["tile", "-i", str(empty), "-o", out], f"no slides found at {empty}"),
        (["cache", "--tiles", str(missing), "-o", out, "-t", "test-vit"], str(missing)),
        (["cache", "--tiles", str(tiles), "-o", out, "-t", "test-vitt"],
         "unknown encoder 'test-vitt'. Did you mean 'test-vit'"),
        (["embed", "--tiles", str(missing), "-o", out, "-e", "test-vit"], str(missing)),
        (["embed", "--slides", str(empty), "-o", out, "-e", "test-vit"],
         f"no slides found at {empty}"),
        (["embed", "--tiles", str(tiles), "-o", out, "-e", "no-such-fm"],
         "unknown encoder 'no-such-fm'."),
        (["fuse", "--bags", str(empty), "--labels", str(no_id), "-o", out],
         f"labels: {no_id} has no slide_id column"),
        (["fuse", "--bags", str(empty), "--labels", str(missing), "-o", out],
         f"labels: {missing}"),
        (["fuse", "--bags", str(empty), "--labels", str(labels), "-o", out],
         f"bags: {empty} has no encoder folders"),
        (["distill", "--tiles", str(missing), "--features", str(empty)], str(missing)),
    ]
    results = _run_all([a for a, _ in cases], tmp_path)
    for (args, message), r in zip(cases, results):
        assert r["code"] == 2, (args, r)
        assert message in " ".join(r["output"].split()), (args, r["output"])
        assert not r["ray"], f"{args[0]} started Ray before checking its input"
        # torch costs seconds to import: a failed check must not have paid for it.
        assert not r["torch"], f"{args[0]} imported torch before checking its input"
