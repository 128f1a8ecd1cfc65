"""Slide tables: the cohort a user brings, one row per slide.

A slide table is a CSV or Parquet file with the columns

    slide_id    the user's id for the slide, kept verbatim (dots, spaces, unicode)
    path        the slide file: absolute, ``s3://...``, or relative to the table's folder
    patient_id  optional: the patient (case) the slide belongs to (TCGA: the first 12
                characters of the barcode); defaults to the slide id
    mpp         optional: level-0 µm/px, for slides whose files do not record it

This is the table hs2p, slide2vec, STAMP and TRIDENT (``--custom_list_of_wsis``) take.
fusedist reads one wherever slides are read and writes one beside each tile manifest
(``slides.csv``), so the id -> path map a run used can be edited and passed back.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from fusedist import storage
from fusedist.config import ConfigError

COLUMNS = ("slide_id", "path", "patient_id", "mpp")
"""The columns fusedist reads; other columns are ignored (a LIMS export may carry many)."""
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class SlideRow:
    """One slide of a table."""

    slide_id: str
    path: str
    patient_id: str
    mpp: float | None = None
    line: int = 0
    """The row's line in the file (1 = header), for error messages; 0 when not from a file."""


def is_slide_table(url: str) -> bool:
    """True when ``url`` names a table (by suffix) rather than a slide or a folder."""
    return str(url).lower().endswith(TABLE_SUFFIXES)


def _read_rows(url: str) -> tuple[list[str], list[dict[str, object]]]:
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ConfigError(f"slide table {url} does not exist; check the path (a CSV or Parquet "
                          "file with slide_id and path columns)") from None
    if url.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq  # pyarrow comes with ray[data]; only Parquet tables need it

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
            raise ConfigError(f"slide table {url}: not a readable Parquet file ({e})") from None
        return list(table.column_names), table.to_pylist()
    try:
        text = data.decode("utf-8-sig")  # Excel writes a BOM
    except UnicodeDecodeError as e:
        raise ConfigError(f"slide table {url}: not UTF-8 text ({e}); save it as UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    cols = [(c or "").strip() for c in (reader.fieldnames or [])]
    rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    return cols, rows


def _text(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v).strip()


def _mpp(url: str, line: int, v: object) -> float | None:
    s = _text(v)
    if not s:
        return None
    try:
        mpp = float(s)
    except ValueError:
        mpp = float("nan")
    if not math.isfinite(mpp) or mpp <= 0:
        raise ConfigError(f"slide table {url}, line {line}: mpp {s!r} is not a positive number "
                          "(level-0 µm/px, e.g. 0.25); fix it or leave it empty")
    return mpp


def read_slide_table(url: str) -> list[SlideRow]:
    """The rows of a slide table, in file order; relative paths are joined to its folder.

    A missing column, an empty id or path, a bad mpp, or two rows with one id is a ConfigError
    naming the lines. Whether each path exists is the caller's check
    (:func:`check_paths`), since it costs a request per slide on S3.
    """
    cols, raw = _read_rows(url)
    missing = [c for c in ("slide_id", "path") if c not in cols]
    if missing:
        raise ConfigError(f"slide table {url} has no {' or '.join(missing)} column (columns: "
                          f"{cols}); a slide table needs slide_id and path, optionally "
                          "patient_id and mpp")
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    rows, first, dups = [], {}, []
    for line, r in enumerate(raw, start=2):
        sid, path = _text(r.get("slide_id")), _text(r.get("path"))
        if not sid or not path:
            raise ConfigError(f"slide table {url}, line {line}: empty "
                              f"{'slide_id' if not sid else 'path'}; every row needs both")
        if sid in first:
            dups.append(f"{sid!r} (lines {first[sid]} and {line})")
        first.setdefault(sid, line)
        if not (storage.is_s3(path) or path.startswith(("/", "file://"))):
            path = storage.join(base, path)
        rows.append(SlideRow(sid, path, _text(r.get("patient_id")) or sid,
                             _mpp(url, line, r.get("mpp")), line))
    if dups:
        raise ConfigError(f"slide table {url} lists a slide id twice: {'; '.join(dups[:5])}"
                          f"{' ...' if len(dups) > 5 else ''}; slide ids must be unique")
    if not rows:
        raise ConfigError(f"slide table {url} has no rows; add one row per slide")
    return rows


def check_paths(url: str, rows: list[SlideRow]) -> None:
    """ConfigError naming every row whose file does not exist (before any work starts)."""
    gone = [r for r in rows if not storage.exists(r.path)]
    if gone:
        shown = "; ".join(f"line {r.line} {r.slide_id!r}: {r.path}" for r in gone[:5])
        raise ConfigError(f"slide table {url}: {len(gone)} slide file(s) do not exist: {shown}"
                          f"{' ...' if len(gone) > 5 else ''}; fix the path column")


def format_slide_table(rows: list[SlideRow]) -> str:
    """CSV text of ``rows`` (slide_id, path, patient_id, mpp), readable by read_slide_table."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.slide_id, r.path, r.patient_id, "" if r.mpp is None else repr(r.mpp)])
    return out.getvalue()


def write_slide_table(url: str, rows: list[SlideRow]) -> None:
    """Write ``rows`` as a CSV slide table (atomic, like every fusedist write)."""
    storage.write_text(url, format_slide_table(rows))


def patients(rows: list[SlideRow]) -> dict[str, str]:
    """slide_id -> patient_id."""
    return {r.slide_id: r.patient_id for r in rows}
