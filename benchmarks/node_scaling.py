"""`fusedist cache` on 1 vs 2 worker nodes of a real multi-node Ray (one machine).

The same tile shards are cached twice, each time on a fresh ``ray.cluster_utils.Cluster`` with a
head that runs nothing (``num_cpus=0``, as the RayJobs' heads) and N worker nodes of
``--node-cpus`` CPUs each (their own raylets), one encoder actor per node. Printed: tiles/s
of the engine, the 2-vs-1 ratio (ideal: 2.0 where the machine has a core per node), and the
driver's own CPU seconds per shard (it should neither grow with the node count nor with the
shards: it only plans and collects done-entries).

    python benchmarks/node_scaling.py                       # test-vit, 1 CPU per node
    python benchmarks/node_scaling.py --encoder bench-vit-s16 --size 12000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_ray import start_ray  # noqa: E402 - beside this script

STORE = 200 * 2**20


def run_on(nodes: int, node_cpus: float, tiles: str, out: str, encoder: str,
           batch: int) -> dict:
    """Cache ``tiles`` on head(CPU 0) + ``nodes`` workers; the engine's figures."""
    import ray
    from ray.cluster_utils import Cluster

    from fusedist.config import load_config
    from fusedist.features import CacheConfig, run_cache

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "object_store_memory": STORE,
                                      "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=node_cpus, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        weights = None if encoder.startswith("test-") else "random"
        teacher = [{"name": encoder, "weights": weights}] if weights else [encoder]
        # Per node: one actor with most of the node, decode tasks with the rest.
        sets = [f"engine.batch_size={batch}", "engine.device=cpu",
                f"engine.min_actors={nodes}", f"engine.cpus_per_actor={node_cpus * 0.75:g}",
                f"engine.decode_cpus={node_cpus * 0.25:g}", "mlflow.enabled=false"]
        cpu0, t0 = time.process_time(), time.perf_counter()
        res = run_cache(load_config(CacheConfig, None, sets, tiles=tiles, output=out,
                                    teachers=teacher), progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        shards = next(iter(res.manifests.values()))["totals"]["shards"]
        return {"nodes": nodes, "tiles": res.tiles, "shards": shards,
                "tiles_per_s": res.tiles / res.engine_seconds, "wall_s": wall,
                "steady": res.engine.steady_rate or 0.0, "first_s": res.engine.first_row_s or 0.0,
                "driver_cpu_s_per_shard": cpu / shards,
                "actor_nodes": len(res.engine.actor_nodes)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="test-vit")
    ap.add_argument("--size", type=int, default=9000, help="level-0 side of the slide (px)")
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--node-cpus", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import ray

    from fusedist.config import load_config
    from fusedist.execution.rayrun import init_ray
    from fusedist.synth import make_slide
    from fusedist.tiling import TileConfig, run_tile

    work = Path(tempfile.mkdtemp(prefix="fusedist-node-scaling-"))
    make_slide(work / "slides" / "s0.tiff", size=args.size, mpp=0.25, seed=0)
    start_ray(init_ray)
    tiled = run_tile(load_config(TileConfig, None, ["mode=grid", "dataset=grid",
                                                    f"samples_per_shard={args.per_shard}"],
                                 input=str(work / "slides"), output=str(work / "tiles")),
                     progress=False)
    ray.shutdown()
    rows = [run_on(n, args.node_cpus, tiled.dataset_url, str(work / f"f{n}"), args.encoder,
                   args.batch_size) for n in (1, 2)]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, CPU; {args.encoder}; "
          f"{args.node_cpus:g} CPU per worker node; load average {os.getloadavg()[0]:.1f}")
    print("| worker nodes | tiles | shards | engine tiles/s | steady tiles/s (after 1st chunk) "
          "| 1st chunk s | wall s | driver CPU s / shard |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['nodes']} | {r['tiles']} | {r['shards']} | {r['tiles_per_s']:.1f} | "
              f"{r['steady']:.1f} | {r['first_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['driver_cpu_s_per_shard']:.3f} |")
    print(f"\n2 vs 1 node throughput: engine {rows[1]['tiles_per_s'] / rows[0]['tiles_per_s']:.2f}x,"
          f" steady state {rows[1]['steady'] / max(rows[0]['steady'], 1e-9):.2f}x "
          f"(actors on {rows[1]['actor_nodes']} node(s))")


if __name__ == "__main__":
    main()
