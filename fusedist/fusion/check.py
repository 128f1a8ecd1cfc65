"""``fusedist fuse``'s input check, run before Ray and torch: the labels CSV parses for the
task (and meets the slide table for a patient unit), and the bags folder has bags. It calls
the stage's own helpers, so the message is the one the stage would give later."""

from __future__ import annotations

from typing import Any

from fusedist import storage
from fusedist.formats.slide_table import read_slide_table
from fusedist.fusion.data import (bag_index, discover_encoders, keyed_rows, parse_targets,
                                  read_labels)
from fusedist.fusion.units import join_patients, label_key, resolve_unit


def check(cfg: Any) -> None:
    """``fusedist fuse``: the labels CSV parses for the task and the bags folder has bags."""
    storage.configure(cfg.storage)
    rows, cols = read_labels(cfg.labels)
    parse_targets(cfg, keyed_rows(rows, cols), cols)
    key = label_key(cfg.labels, cols)
    if resolve_unit(cfg, key) == "patient":  # the clinical table meets the slide table
        join_patients(cfg, keyed_rows(rows, cols), key)
    elif cfg.slides:
        read_slide_table(cfg.slides)
    bag_index(cfg, discover_encoders(cfg))
