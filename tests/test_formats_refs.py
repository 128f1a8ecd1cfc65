"""The tile/feature manifest modules, the export card reader and the cheap encoder-reference
check (none of which imports torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fusedist.config import ConfigError
from fusedist.formats import export_card, feature_manifest, tile_manifest
from fusedist.models.refs import check_encoder_refs, is_export_ref

REPO = Path(__file__).resolve().parents[1]


def test_tile_manifest_read_validate_and_slides(tmp_path):
    ds = tmp_path / "tiles" / "grid"
    with pytest.raises(ConfigError, match="no tile dataset at"):
        tile_manifest.read_tile_manifest(str(ds))
    assert tile_manifest.tiled_slides(str(ds)) == set()
    ds.mkdir(parents=True)
    m = {"format": tile_manifest.FORMAT, "mode": "grid", "shards": [],
         "slides": [{"slide_id": "a", "status": "ok"}, {"slide_id": "b", "status": "failed"}]}
    tile_manifest.write(str(ds), m)
    assert json.loads((ds / "manifest.json").read_text()) == m
    assert tile_manifest.read_tile_manifest(str(ds) + "/") == m
    assert tile_manifest.tiled_slides(str(ds)) == {"a", "b"}
    tile_manifest.write(str(ds), {**m, "format": "other/1"})
    with pytest.raises(ConfigError, match="is not a fusedist tile manifest"):
        tile_manifest.read_tile_manifest(str(ds))


def test_feature_manifest_roundtrip(tmp_path):
    with pytest.raises(FileNotFoundError):
        feature_manifest.read_feature_manifest(str(tmp_path))
    feature_manifest.write(str(tmp_path), {"format": feature_manifest.FORMAT, "teacher": "t"})
    assert feature_manifest.read_feature_manifest(str(tmp_path))["teacher"] == "t"


def test_export_card_read_and_verify(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported model at"):
        export_card.read_card(str(tmp_path))
    (tmp_path / export_card.WEIGHTS).write_bytes(b"weights")
    card = {"format": export_card.FORMAT, "name": "x",
            "weights_sha256": export_card.file_sha256(tmp_path / export_card.WEIGHTS)}
    (tmp_path / export_card.CARD).write_text(json.dumps(card))
    url, got = export_card.read_card(str(tmp_path))
    assert got == card and url.endswith("card.json")
    assert export_card.local_weights(got, url) == (tmp_path / export_card.WEIGHTS).resolve()
    (tmp_path / export_card.WEIGHTS).write_bytes(b"other weights")
    with pytest.raises(ValueError, match="does not match"):
        export_card.local_weights(got, url)
    (tmp_path / export_card.CARD).write_text(json.dumps({**card, "format": "x/1"}))
    with pytest.raises(ValueError, match="is not a fusedist XMAG export card"):
        export_card.read_card(str(tmp_path / export_card.CARD))


def test_check_encoder_refs(tmp_path):
    check_encoder_refs([SimpleNamespace(name="test-vit"), SimpleNamespace(name=str(tmp_path)),
                        SimpleNamespace(name="models:/m@champion")])
    assert is_export_ref("s3://b/export") and is_export_ref("card.json")
    with pytest.raises(ConfigError, match="unknown encoder 'test-vitt'"):
        check_encoder_refs([SimpleNamespace(name="test-vitt")])


def test_formats_and_checks_import_no_torch():
    code = ("import sys; import fusedist.formats.tile_manifest, fusedist.formats.export_card, "
            "fusedist.formats.feature_manifest, fusedist.models.refs, fusedist.features.check, "
            "fusedist.distill.check, fusedist.fusion.check, fusedist.tiling.check; "
            "print([m for m in ('torch', 'ray', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "[]"
