"""Tile, then embed: slides -> the grid tile dataset an encoder group embeds.

``embed --slides``, ``predict --slides`` and the demo all tile whole slides into a grid whose
tile size and mpp are what their encoders take, then embed that dataset; this is the one
place that turns (slides, where, a tiling recipe) into that dataset. The embedding itself is
``run_embed(EmbedConfig(tiles=<the result's dataset_url>, ...))``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from fusedist.tiling import TileConfig, TileResult, run_tile

log = logging.getLogger("fusedist.embed")


def tile_grid(slides: str, output: str, dataset: str, recipe: Mapping[str, Any], *,
              ray: Any, storage: Any, mpp_override: float | None = None,
              progress: bool = False, **options: Any) -> TileResult:
    """Tile ``slides`` (a folder, file or slide table) into the grid dataset
    ``<output>/<dataset>``. ``recipe``: the tiling an encoder group needs, at least
    ``tile_mpp`` and ``tile_size`` (any of ``TileConfig.SLIDE_RECIPE``: ``min_tissue``,
    ``tissue``, ... as a model card records them); ``options``: other ``TileConfig`` fields
    (``samples_per_shard``). A re-run reuses the tiles that are done."""
    tcfg = TileConfig(input=slides, output=output, dataset=dataset, mode="grid", **recipe,
                      **options, mpp_override=mpp_override, ray=ray, storage=storage)
    res = run_tile(tcfg, progress=progress)
    log.info("%s", res.summary())
    return res
