"""The cohort a user brings: a GDC-shaped folder and slide tables, through every stage.

A GDC-shaped cohort (``synth --set layout=gdc``: one UUID folder per slide, TCGA barcodes with
dots, two slides for some patients, labels written from the file names) goes tile -> cache ->
embed -> fuse -> predict with nothing renamed; slide ids with spaces, a '/', a '#', a leading
'.', a '%' and non-ASCII characters, given by a slide table, survive shards (read by
``wds.WebDataset`` and the training reader), bags, ``predictions.csv`` and the MLflow model; the
same slides as a slide table on S3 (moto) tile to the same bytes; bad tables and folders stop
before any work (exit 2) naming the rows or paths.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fusedist.cli import app
from fusedist.config import ConfigError, load_config
from fusedist.formats.slide_ids import decode_id, encode_id
from fusedist.formats.slide_table import read_slide_table
from fusedist.tiling import TileConfig, run_tile
from fusedist.tiling.job import discover
from tests.s3util import moto_server, s3_bucket  # noqa: F401

from .test_fuse import TINY

# Odd but valid ids: a space and a '/', non-ASCII and a '#', a leading '.' and a '%'.
ODD = ["case 7/slide.1", "ünïcödé-组织 #2", ".hidden%20x"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _grid(input, output, **kw) -> TileConfig:
    sets = [f"{k}={v}" for k, v in {"mode": "grid", "tile_mpp": 0.5, "min_tissue": 0.3,
                                     "executor": "local", **kw}.items()]
    return load_config(TileConfig, None, sets, input=str(input), output=str(output))


def test_ids_encode_only_where_files_and_keys_cannot_hold_them_and_decode_exactly():
    from fusedist.formats.slide_ids import check_ids

    tcga = "TCGA-2F-A9KO-01Z-00-DX1.21636369-8B52-9B4A-97B7-50923CEB3FFD"
    for plain in ("slide-0001", tcga, "ünï cödé 组织", "a.b c"):
        assert encode_id(plain) == plain
    assert encode_id("a/b%2F#{1..2}") == "a%2Fb%252F%23%7B1..2%7D"
    assert encode_id(".x.y") == "%2Ex.y" and encode_id("tab\there") == "tab%09here"
    for i in [*ODD, tcga, "%", "%%41", "a%2Fb", "..", "\\srv:x*?\"<>|"]:
        key = encode_id(i)
        assert decode_id(key) == i and "/" not in key and not key.startswith(".")
    assert decode_id("slide%41") == "slide%41"  # a foreign name without our escapes is itself
    check_ids([("a", "line 2"), ("b", "line 3")], "fix")
    with pytest.raises(ConfigError, match="too long for a file name"):
        check_ids([("x" * 201, "line 2")], "fix")
    with pytest.raises(ConfigError, match="Unicode form"):  # NFC vs NFD: one name on macOS
        check_ids([("caf\u00e9", "line 2"), ("cafe\u0301", "line 3")], "fix")


@pytest.fixture(scope="module")
def gdc(tmp_path_factory) -> Path:
    """12 small GDC-shaped slides at 20x (0.5 µm/px) of 9 patients (4 and 5 per class: the
    fewest 2 x 2 folds take) and their labels.csv."""
    from fusedist.synth import SynthConfig, synthesize

    d = tmp_path_factory.mktemp("gdc")
    synthesize(SynthConfig(output=str(d / "slides"), num_slides=12, size=1344, mpp=0.5,
                           layout="gdc", paired_fraction=0.4, num_genes=0, seed=4),
               progress=False)
    return d


def test_gdc_folder_ids_are_file_names_and_a_repeated_name_stops_the_run(gdc, tmp_path):
    labels = _rows(gdc / "slides" / "labels.csv")
    slides = discover(TileConfig(input=str(gdc / "slides")))
    # The id is the file name without .svs: dots kept, no UUID folder in front.
    assert [s.slide_id for s in slides] == sorted(r["slide_id"] for r in labels)
    assert all(Path(s.url).name == f"{s.slide_id}.svs" for s in slides)
    assert all(r["patient_id"] == r["slide_id"][:12] for r in labels)
    assert len({r["patient_id"] for r in labels}) < len(labels)  # some patients have 2 slides
    # The same file name in two UUID folders: the run stops naming both paths and the fix.
    src = tmp_path / "two"
    shutil.copytree(gdc / "slides", src)
    first = sorted(src.glob("*/*.svs"))[0]
    (src / "another-uuid").mkdir()
    shutil.copy(first, src / "another-uuid" / first.name)
    r = CliRunner().invoke(app, ["tile", "-q", "-i", str(src), "-o", str(tmp_path / "t")])
    assert r.exit_code == 2, r.output
    assert str(first) in r.stderr and str(src / "another-uuid" / first.name) in r.stderr
    assert "slide table" in r.stderr and not (tmp_path / "t").exists()


def test_gdc_cohort_tile_cache_embed_fuse_predict_and_odd_ids_round_trip(
        ray_cluster, gdc, tmp_path):
    import mlflow
    import webdataset as wds

    from fusedist.formats.bags import list_bags, read_bag
    from fusedist.data import ShardReader
    from fusedist.features import CacheConfig, EmbedConfig, run_cache, run_embed
    from fusedist.fusion.config import FuseConfig
    from fusedist.fusion.pyfunc import bags_frame
    from fusedist.predict import PredictConfig, run_predict
    from fusedist.fusion.run import run_fuse

    labels = {r["slide_id"]: r for r in _rows(gdc / "slides" / "labels.csv")}
    tiles = run_tile(_grid(gdc / "slides", tmp_path / "tiles", dataset="grid"), progress=False)
    assert tiles.manifest["totals"]["slides_ok"] == 12
    assert {s["slide_id"] for s in tiles.manifest["slides"]} == set(labels)
    # slides.csv beside the manifest: the id -> path map, a slide table to pass back.
    table = read_slide_table(f"{tiles.dataset_url}/slides.csv")
    assert {r.slide_id: Path(r.path).name for r in table} == {s: f"{s}.svs" for s in labels}
    again = run_tile(_grid(f"{tiles.dataset_url}/slides.csv", tmp_path / "tiles",
                           dataset="grid"), progress=False)
    assert again.written_shards == 0 and again.manifest["shards"] == tiles.manifest["shards"]

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = {"mlflow": {"tracking_uri": db}, "engine": {"batch_size": 32}}
    cache = run_cache(CacheConfig(tiles=tiles.dataset_url, output=str(tmp_path / "features"),
                                  teachers=["test-vit"], **common), progress=False)
    assert not cache.failed and cache.tiles == tiles.manifest["totals"]["tiles"]
    bags = tmp_path / "bags"
    run_embed(EmbedConfig(tiles=tiles.dataset_url, output=str(bags),
                          encoders=["test-vit", "test-convnext"], **common), progress=False)
    assert list_bags(str(bags / "test-vit")).keys() == set(labels)  # whole TCGA ids
    fuse = run_fuse(FuseConfig(
        bags=str(bags), labels=str(gdc / "slides" / "labels.csv"), output=str(tmp_path / "fuse"),
        **{**TINY, "folds": 2, "methods": ["logitprod"], "heatmaps": 0,
           "mlflow": {"tracking_uri": db},
           "final": {"enabled": True, "registered_model": "gdc-fused"}}), progress=False)
    manifest = json.loads((tmp_path / "fuse" / "manifest.json").read_text())
    assert manifest["exclusions"] == [] and sorted(manifest["slides"]) == sorted(labels)
    assert fuse.model

    # predict --slides on a slide table that names three of these files with odd ids (and one
    # with the table's mpp, equal to the file's), from the registered MLflow model.
    picked = sorted(labels)[:3]
    lines = ["slide_id,path,patient_id,mpp"] + [
        f'"{odd}",{tiles.manifest["slides"][i]["url"]},p{i},{"0.5" if i == 0 else ""}'
        for i, odd in enumerate(ODD)]
    assert [tiles.manifest["slides"][i]["slide_id"] for i in range(3)] == picked
    (tmp_path / "odd.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = "models:/gdc-fused@champion"
    out = tmp_path / "pred"
    res = run_predict(PredictConfig(model=model, tracking_uri=db, slides=str(tmp_path / "odd.csv"),
                                    output=str(out), heatmaps=True, mlflow={"enabled": False},
                                    engine={"batch_size": 32}), progress=False)
    assert res["predicted"] == sorted(ODD) and not res["failed"]
    got = {(r["slide_id"], r["method"]): r for r in _rows(out / "predictions.csv")}
    assert {s for s, _ in got} == set(ODD)
    # The same pixels under the TCGA ids: the same predictions (the id changed nothing else).
    ref = tmp_path / "pred-ref"
    run_predict(PredictConfig(model=model, tracking_uri=db, bags=str(bags), slide_ids=picked,
                              output=str(ref), heatmaps=False, mlflow={"enabled": False}),
                progress=False)
    want = {(r["slide_id"], r["method"]): r for r in _rows(ref / "predictions.csv")}
    for odd, sid in zip(ODD, picked):
        for (s, m), r in want.items():
            if s == sid:
                g = got[(odd, m)]
                assert g["predicted"] == r["predicted"]
                for k in [k for k in r if k.startswith(("prob_", "weight_")) and r[k]]:
                    np.testing.assert_allclose(float(g[k]), float(r[k]), rtol=1e-4, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["predicted"] == sorted(ODD)
    heat = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert len(heat) >= 3 and all(any(encode_id(i) in h for h in heat) for i in ODD)

    # The shards: keys hold the encoded id, meta.json the true one; wds and the training
    # reader read them; bags hold the true id and list back under it.
    (pdata,) = [p for p in (out / "tiles").iterdir() if p.is_dir()]
    pm = json.loads((pdata / "manifest.json").read_text())
    assert {s["slide_id"] for s in pm["slides"]} == set(ODD)
    rec = {s["slide_id"]: s for s in pm["slides"]}
    assert rec[ODD[0]]["mpp_source"] == "table" and rec[ODD[0]]["table_line"] == 2
    assert {s["name"].rsplit("-", 1)[0] for s in pm["shards"]} == {encode_id(i) for i in ODD}
    assert all((pdata / "thumbnails" / f"{encode_id(i)}.png").is_file() for i in ODD)
    urls = [str(pdata / s["name"]) for s in pm["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["meta.json"])
        assert sample["__key__"].rsplit("/", 1)[0] == encode_id(meta["slide_id"])
        assert sample["__key__"].endswith(f"/{meta['x']}_{meta['y']}")
        seen[meta["slide_id"]] = seen.get(meta["slide_id"], 0) + 1
    assert seen == {s["slide_id"]: s["tiles"] for s in pm["slides"]}
    read = [s for s in ShardReader(str(pdata), shuffle=False)]
    assert len(read) == sum(seen.values())
    assert {decode_id(s["__key__"].rsplit("/", 1)[0]) for s in read} == set(ODD)
    for enc in ("test-vit", "test-convnext"):
        listed = list_bags(str(out / "bags" / enc))
        assert set(listed) == set(ODD)
        assert {read_bag(u).slide_id for u in listed.values()} == set(ODD)

    # The MLflow model, loaded by MLflow alone, names the slides by their true ids.
    # set_tracking_uri also exports MLFLOW_TRACKING_URI: scoped, so no later test inherits it.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(db):
        m = mlflow.pyfunc.load_model(model)
        names = m.metadata.get_input_schema().input_names()
        encoders = [n for n in names if n != "slide_id" and not n.endswith(".coords")]
        frame = m.predict(bags_frame(str(out / "bags"), encoders))
    assert set(frame["slide_id"]) == set(ODD)


def test_a_slide_table_on_s3_tiles_the_same_bytes_as_the_gdc_folder(gdc, s3_bucket,
                                                                    moto_server, tmp_path):
    import boto3

    from fusedist import storage

    local = run_tile(_grid(gdc / "slides", tmp_path / "local"), progress=False)
    some = local.manifest["slides"][:3]
    client = boto3.client("s3", endpoint_url=moto_server)
    bucket = s3_bucket.removeprefix("s3://")
    lines = ["slide_id,path,patient_id"]
    for i, s in enumerate(some):  # a flat layout of its own, paths relative to the table
        client.upload_file(s["url"], bucket, f"cohort/files/slide{i}.svs")
        lines.append(f"{s['slide_id']},files/slide{i}.svs,{s['slide_id'][:12]}")
    storage.write_text(f"{s3_bucket}/cohort/slides.csv", "\n".join(lines) + "\n")
    cfg = _grid(f"{s3_bucket}/cohort/slides.csv", f"{s3_bucket}/tiles",
                **{"storage.endpoint_url": moto_server,
                   "storage.cache_dir": str(tmp_path / "cache")})
    remote = run_tile(cfg, progress=False)
    want = {s["name"]: s["sha256"] for s in local.manifest["shards"]
            if s["slide_id"] in {x["slide_id"] for x in some}}
    assert {s["name"]: s["sha256"] for s in remote.manifest["shards"]} == want
    assert [r.path for r in read_slide_table(f"{s3_bucket}/tiles/default/slides.csv")] == [
        f"{s3_bucket}/cohort/files/slide{i}.svs" for i in range(3)]


def test_bad_slide_tables_stop_before_work_naming_the_rows(gdc, fixtures_dir, tmp_path):
    good = sorted((gdc / "slides").glob("*/*.svs"))
    cases = {
        "dup": ([("a", good[0]), ("b", good[1]), ("a", good[2])],
                ["'a' (lines 2 and 4)", "unique"]),
        "missing": ([("a", good[0]), ("b", tmp_path / "nope.svs")],
                    ["line 3 'b'", "nope.svs", "do not exist"]),
        "not-a-slide": ([("a", good[0]), ("b", gdc / "slides" / "labels.csv")],
                        ["line 3 'b'", "labels.csv", "not slide files"]),
        "case": ([("TCGA-AB.1", good[0]), ("tcga-ab.1", good[1])],
                 ["'TCGA-AB.1' (line 2) and 'tcga-ab.1' (line 3)", "case-insensitive"]),
    }
    for name, (rows, words) in cases.items():
        t = tmp_path / f"{name}.csv"
        t.write_text("slide_id,path\n" + "".join(f"{i},{p}\n" for i, p in rows))
        r = CliRunner().invoke(app, ["tile", "-q", "-i", str(t), "-o", str(tmp_path / name)])
        assert r.exit_code == 2, (name, r.output)
        for w in words:
            assert w in r.stderr, (name, w, r.stderr)
        assert not (tmp_path / name).exists(), name  # nothing was written
    (tmp_path / "mpp.csv").write_text(f"slide_id,path,mpp\na,{good[0]},fast\n")
    with pytest.raises(ConfigError, match="mpp 'fast' is not a positive number"):
        discover(TileConfig(input=str(tmp_path / "mpp.csv")))
    # A file that only looks like a slide fails at plan time, recorded with its table line;
    # the other slide is tiled.
    (tmp_path / "bogus.svs").write_bytes((fixtures_dir / "unopenable.tiff").read_bytes())
    t = tmp_path / "planned.csv"
    t.write_text(f"slide_id,path\nok,{good[0]}\nbogus,bogus.svs\n")
    res = run_tile(_grid(t, tmp_path / "out"), progress=False)
    by = {s["slide_id"]: s for s in res.manifest["slides"]}
    assert by["ok"]["status"] == "ok" and by["bogus"]["code"] == "unopenable"
    assert by["bogus"]["reason"].startswith("slide table line 3: ")
