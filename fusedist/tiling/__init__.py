"""``fusedist tile``: whole-slide images -> WebDataset tile shards."""

from fusedist.tiling.config import TileConfig
from fusedist.tiling.job import TileResult, discover, run_tile
from fusedist.tiling.slide import SlideError, resolve_mpp
from fusedist.tiling.tissue import TissueConfig

__all__ = ["TileConfig", "TileResult", "TissueConfig", "SlideError", "discover", "resolve_mpp",
           "run_tile"]
