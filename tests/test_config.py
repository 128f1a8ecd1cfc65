"""Configs: every committed recipe validates; typos and bad values fail early and say why."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusedist.config import ConfigError, load_config
from fusedist.recipes import RECIPE_MODELS, load_recipe, model_for
from fusedist.tiling import TileConfig

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_recipes_for_every_registered_stage():
    folders = {p.parent.name for p in RECIPES}
    assert set(RECIPE_MODELS) <= folders


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_validates(path):
    cfg = load_recipe(path)
    assert isinstance(cfg, model_for(path))


def test_unknown_key_names_key_and_suggests(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("input: x\nmin_tisue: 0.3\ntissue:\n  thumbnail_mp: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(TileConfig, p)
    msg = str(e.value)
    assert str(p) in msg
    assert "unknown key 'min_tisue'" in msg and "Did you mean 'min_tissue'" in msg
    assert "unknown key 'tissue.thumbnail_mp'" in msg and "thumbnail_mpp" in msg


def test_bad_value_names_key_and_field_doc(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TileConfig, None, ["input=x", "min_tissue=1.5", "mode=tiles"])
    msg = str(e.value)
    assert "'min_tissue'" in msg and "1.5" in msg and "tissue" in msg.lower()
    assert "'mode'" in msg and "pairs" in msg


def test_missing_required_key_says_how_to_set_it():
    with pytest.raises(ConfigError, match=r"missing required key 'input'.*--set input="):
        load_config(TileConfig, None, [])


def test_cross_field_rule_fails_with_fix():
    with pytest.raises(ConfigError, match="divisible by 4"):
        load_config(TileConfig, None, ["input=x", "hi_size=90"])


def test_overrides_apply_nested_and_typed(tmp_path):
    cfg = load_config(TileConfig, REPO / "configs/tile/pairs.yaml",
                      ["tissue.close_um=12.5", "extensions=[svs, TIFF]", "ray.num_cpus=2"],
                      input="slides/")
    assert cfg.tissue.close_um == 12.5 and cfg.ray.num_cpus == 2
    assert cfg.extensions == [".svs", ".tiff"] and cfg.input == "slides/"


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TileConfig, tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TileConfig, p)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TileConfig, None, ["input"])


def test_unregistered_recipe_folder_is_an_error(tmp_path):
    (tmp_path / "nostage").mkdir()
    with pytest.raises(KeyError, match="RECIPE_MODELS"):
        model_for(tmp_path / "nostage" / "x.yaml")
