"""The export card: an exported XMAG student's folder (local or ``s3://``) holds

- ``model.safetensors``: the backbone's state dict (heads dropped), fp32;
- ``card.json``: what the encoder is (arch/kwargs, mean/std, input size, mpp, output, dim),
  where it came from and the weights' sha256. Written last: a folder with a card is a
  complete export.

This module reads and verifies an export (:func:`read_card`, :func:`local_weights`,
:func:`verify_sha`); ``fusedist.distill.export`` writes it, and
``fusedist.models.refs`` turns it into a registry name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

from fusedist import storage

CARD = "card.json"
WEIGHTS = "model.safetensors"
FORMAT = "fusedist.xmag-export/1"
ARTIFACT = "export"
"""The MLflow artifact of a registered student that holds its export folder."""

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def card_url(path_or_url: str) -> str:
    """The card of an export folder (or the card itself)."""
    u = str(path_or_url).rstrip("/")
    return u if u.endswith(".json") else storage.join(u, CARD)


def folder(card_url: str) -> str:
    return card_url.rsplit("/", 1)[0] if "/" in card_url else "."


def read_card(path_or_url: str) -> tuple[str, dict[str, Any]]:
    """(card URL, card) of the export at ``path_or_url`` (its folder or card.json)."""
    url = card_url(path_or_url)
    try:
        card = storage.read_json(url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no exported model at {path_or_url}: {url} is missing "
                                "(an export is complete once its card.json exists)") from e
    if card.get("format") != FORMAT:
        raise ValueError(f"{url} is not a fusedist XMAG export card "
                         f"(format {card.get('format')!r}, expected {FORMAT!r})")
    return url, card


def local_weights(card: Mapping[str, Any], card_url: str) -> Path:
    """The card's weights as a local file (downloaded from ``s3://``), sha256 checked."""
    url = storage.join(folder(card_url), str(card.get("weights_file", WEIGHTS)))
    path = (storage.fetch_local(url, subdir="models") if storage.is_s3(url)
            else storage.local_path(url).expanduser().resolve())
    if not path.is_file():
        raise FileNotFoundError(f"export card {card_url} names weights {url}, which is missing")
    verify_sha(path, card, card_url)
    return path


def verify_sha(path: Path, card: Mapping[str, Any], card_url: str) -> None:
    """A card describing other weights than the file beside it is an error, not a warning."""
    expected = card.get("weights_sha256")
    if not expected:
        return
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:  # hash a file once per version: re-registering stays cheap
        _SHA_CACHE[key] = file_sha256(path)
    if _SHA_CACHE[key] != expected:
        raise ValueError(f"{path}: sha256 {_SHA_CACHE[key][:12]} does not match "
                         f"{card_url} (weights_sha256 {str(expected)[:12]}); re-export the model")
