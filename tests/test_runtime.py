"""One Ray per pipeline: a Python caller running several stages starts Ray once, lean, and
stages that can run without Ray (tile, cache, embed) start none until one is asked for.

Runs in a fresh process (the session's shared Ray would hide a second start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PIPELINE = r"""
import json, sys
from pathlib import Path
import ray

starts = []
_init = ray.init
def counting_init(*a, **kw):  # the real ray.init, counted
    starts.append(kw.get("address"))
    return _init(*a, **kw)
ray.init = counting_init

from tests.slides import make_known_slide
from fusedist.config import load_config
from fusedist.features import EmbedConfig, run_embed
from fusedist.tiling import TileConfig, run_tile

work = Path(sys.argv[1])
(work / "slides").mkdir()
make_known_slide(work / "slides" / "a.tiff")
off = ["mlflow.enabled=false"]
tile = load_config(TileConfig, None, ["mode=grid", "tile_mpp=0.5", "tile_size=224", "min_tissue=0.3"],
                   input=str(work / "slides"), output=str(work / "tiles"), dataset="grid")
tiled = run_tile(tile, progress=False).manifest["totals"]["tiles"]
after_tile = ray.is_initialized()  # executor auto, nothing configured: local processes
emb = run_embed(load_config(EmbedConfig, None, off + ["engine.batch_size=16",
                                                      "engine.executor=ray"],
                            tiles=str(work / "tiles" / "grid"), output=str(work / "bags"),
                            encoders=["test-vit"]), progress=False)
session = ray.get_runtime_context().get_node_id()
# Ray runs in this process now: auto uses it (no second start), for embed and for tile.
again = run_embed(load_config(EmbedConfig, None, off + ["engine.batch_size=16"],
                              tiles=str(work / "tiles" / "grid"), output=str(work / "bags2"),
                              encoders=["test-vit"]), progress=False)
run_tile(load_config(TileConfig, None, ["mode=grid", "tile_mpp=0.5", "tile_size=224",
                                        "min_tissue=0.3"], input=str(work / "slides"),
                     output=str(work / "tiles2"), dataset="grid"), progress=False)
print(json.dumps({"starts": len(starts), "tiles": tiled, "bags": emb.written + again.written,
                  "after_tile": after_tile,
                  "engines": sorted(n for e in again.engine for n in e.actor_nodes),
                  "same_node": ray.get_runtime_context().get_node_id() == session,
                  "store": ray.cluster_resources().get("object_store_memory")}))
"""


def test_stages_in_one_process_share_one_lean_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.run([sys.executable, "-c", _PIPELINE, str(tmp_path)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["tiles"] > 0 and r["bags"] == 2 and r["after_tile"] is False
    assert r["starts"] == 1 and r["same_node"], r
    assert r["engines"] and "local" not in r["engines"], r  # the second embed ran on Ray
    from fusedist.execution.rayrun import LOCAL_OBJECT_STORE_MB

    # The lean default, not Ray's 30% of RAM.
    assert abs(r["store"] - LOCAL_OBJECT_STORE_MB * 2**20) < 2**20, r
