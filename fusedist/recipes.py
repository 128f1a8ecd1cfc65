"""Which typed config a YAML recipe in ``configs/<stage>/`` builds.

New stages register here; the test suite loads every recipe through this table, so a typo in
any committed YAML fails CI.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fusedist.config import load_config

# configs/<folder>/*.yaml -> "module:ConfigClass"
RECIPE_MODELS: dict[str, str] = {
    "cache": "fusedist.features:CacheConfig",
    "distill": "fusedist.distill.config:DistillConfig",
    "launch": "fusedist.launch.config:LaunchConfig",
    "embed": "fusedist.features:EmbedConfig",
    "fuse": "fusedist.fusion.config:FuseConfig",
    "predict": "fusedist.predict.config:PredictConfig",
    "retrain": "fusedist.retrain.config:RetrainConfig",
    "synth": "fusedist.synth:SynthConfig",
    "tile": "fusedist.tiling:TileConfig",
}


def model_for(path: str | Path):
    folder = Path(path).parent.name
    if folder not in RECIPE_MODELS:
        raise KeyError(f"{path}: no config model is registered for configs/{folder}/ "
                       f"(known: {', '.join(sorted(RECIPE_MODELS))}); add it to "
                       "fusedist.recipes.RECIPE_MODELS")
    module, name = RECIPE_MODELS[folder].split(":")
    return getattr(importlib.import_module(module), name)


def load_recipe(path: str | Path, overrides: list[str] | None = None):
    return load_config(model_for(path), path, overrides)
