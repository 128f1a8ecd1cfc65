"""The slide table format (fusedist/formats/slide_table.py): ids verbatim, paths resolved,
bad tables refused with the rows named, and a written table reads back the same."""

from __future__ import annotations

import pytest

from fusedist.config import ConfigError
from fusedist.formats.slide_table import (SlideRow, check_paths, is_slide_table, patients,
                                          read_slide_table, write_slide_table)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_ids_kept_verbatim_and_relative_paths_joined(tmp_path):
    url = _write(tmp_path / "t.csv",
                 "slide_id,path,patient_id,mpp,site\n"
                 "TCGA-2F-A9KO-01Z-00-DX1.2163,a/x.svs,TCGA-2F-A9KO,0.25,lung\n"
                 "é slide 2,/abs/y.tiff,,,\n")
    rows = read_slide_table(url)
    assert [r.slide_id for r in rows] == ["TCGA-2F-A9KO-01Z-00-DX1.2163", "é slide 2"]
    assert rows[0].path == str(tmp_path / "a" / "x.svs") and rows[1].path == "/abs/y.tiff"
    assert rows[0].mpp == 0.25 and rows[1].mpp is None
    # patient_id defaults to the slide id, so an unpatiented slide is its own patient.
    assert patients(rows) == {"TCGA-2F-A9KO-01Z-00-DX1.2163": "TCGA-2F-A9KO",
                              "é slide 2": "é slide 2"}


def test_round_trip_csv_and_parquet(tmp_path):
    rows = [SlideRow("a.b c", str(tmp_path / "a.svs"), "p1", 0.5),
            SlideRow("ü", "s3://bucket/ü.svs", "p1", None)]
    write_slide_table(str(tmp_path / "out.csv"), rows)
    back = read_slide_table(str(tmp_path / "out.csv"))
    assert [(r.slide_id, r.path, r.patient_id, r.mpp) for r in back] == \
        [(r.slide_id, r.path, r.patient_id, r.mpp) for r in rows]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"slide_id": ["x.1", "y"], "path": ["x.svs", "y.svs"],
                             "mpp": [0.25, None]}), str(tmp_path / "t.parquet"))
    pr = read_slide_table(str(tmp_path / "t.parquet"))
    assert [(r.slide_id, r.mpp) for r in pr] == [("x.1", 0.25), ("y", None)]
    assert is_slide_table("s3://b/t.parquet") and not is_slide_table("/x/slide.svs")


@pytest.mark.parametrize("text, words", [
    ("slide_id,path\na,a.svs\nb,b.svs\na,c.svs\n", ["'a'", "lines 2 and 4"]),
    ("slide_id,file\na,a.svs\n", ["no path column"]),
    ("slide_id,path\n,a.svs\n", ["line 2", "empty slide_id"]),
    ("slide_id,path,mpp\na,a.svs,-1\n", ["line 2", "mpp '-1'"]),
    ("slide_id,path\n", ["no rows"]),
])
def test_bad_tables_name_the_rows(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        read_slide_table(_write(tmp_path / "t.csv", text))
    for w in words:
        assert w in str(e.value)


def test_missing_files_are_named_before_work(tmp_path):
    (tmp_path / "here.svs").write_bytes(b"x")
    url = _write(tmp_path / "t.csv", "slide_id,path\nhere,here.svs\ngone,gone.svs\n")
    with pytest.raises(ConfigError, match=r"line 3 'gone'"):
        check_paths(url, read_slide_table(url))
