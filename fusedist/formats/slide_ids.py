"""Slide ids in file names and WebDataset keys: the user's id, encoded only where it must be.

A slide id is the user's, verbatim: a TCGA barcode with dots, a name with spaces, unicode.
Most of that is safe in every place fusedist puts an id (shard names ``<key>-<part>.tar``,
sample keys ``<key>/<x>_<y>``, bags ``<encoder>/<key>.h5``, thumbnails, ``_state/`` entries,
on local disk and S3). What is not, and why:

    /            separates folders (and the slide from the tile in a sample key)
    \\           a separator on Windows, and the escape of this very scheme's neighbours
    %            the escape character of this scheme itself
    # ?          cut a URL into fragment and query (s3:// and file:// URLs)
    { }          WebDataset expands ``{000..009}`` braces in shard URLs
    : * " < > |  not allowed in Windows / SMB file names
    control chars (< 0x20, 0x7f), and a leading '.' (a hidden file: listings skip it)

Each of these becomes ``%XX`` (its UTF-8 byte in upper-case hex, as in URLs); every other
character, dots and non-ASCII included, stays as it is, so a TCGA id stays readable in file
names. A dot inside an id is harmless for WebDataset: it splits a key from its extensions at
the first '.' of the *last* path component, which is the ``<x>_<y>`` of the tile. Decoding
(:func:`decode_id`) turns only those ``%XX`` back, so ``decode_id(encode_id(i)) == i`` for
every id, and a foreign file name (a TRIDENT bag) without them is its own id.

Two ids that would name the same file somewhere (equal after case folding and Unicode NFC
normalisation, as on macOS and Windows disks) are refused before any work
(:func:`check_ids`), as is a key too long for a file name.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from fusedist.config import ConfigError

_UNSAFE = frozenset('/\\%#?{}:*"<>|')
MAX_KEY_BYTES = 200
"""The longest encoded id in UTF-8 bytes: 255-byte file names less ``-000000.tar.idx.json``."""


def _escaped(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def _unsafe(ch: str) -> bool:
    return ch in _UNSAFE or ord(ch) < 0x20 or ord(ch) == 0x7F


def encode_id(slide_id: str) -> str:
    """The id as it appears in file names and sample keys (see the module doc)."""
    out = [_escaped(ch) if _unsafe(ch) else ch for ch in slide_id]
    if out and out[0] == ".":
        out[0] = _escaped(".")
    return "".join(out)


_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def _unescape(m: re.Match) -> str:
    ch = chr(int(m.group(1), 16))
    return ch if _unsafe(ch) or ch == "." else m.group(0)


def decode_id(key: str) -> str:
    """The slide id of a file-name key written by :func:`encode_id` (the inverse)."""
    return _ESCAPE.sub(_unescape, key)


def _folded(key: str) -> str:
    return unicodedata.normalize("NFC", key).casefold()


def check_ids(ids: Iterable[tuple[str, str]], fix: str) -> None:
    """ConfigError naming ids that would share a file, or are too long for one.

    ``ids``: (slide id, where it comes from: a table line or a path) pairs; ``fix``: what the
    user should do (e.g. "rename one in the slide table").
    """
    seen: dict[str, tuple[str, str]] = {}
    clashes, long = [], []
    for sid, where in ids:
        key = encode_id(sid)
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            long.append(f"{sid[:40]!r}... ({where})")
        other = seen.setdefault(_folded(key), (sid, where))
        if other[0] != sid:
            clashes.append(f"{other[0]!r} ({other[1]}) and {sid!r} ({where})")
    if clashes:
        raise ConfigError(f"slide ids that differ only in case or Unicode form would name the "
                          f"same files on case-insensitive disks: {'; '.join(clashes[:5])}"
                          f"{' ...' if len(clashes) > 5 else ''}; {fix}")
    if long:
        raise ConfigError(f"slide ids too long for a file name (over {MAX_KEY_BYTES} bytes "
                          f"encoded): {'; '.join(long[:5])}; {fix}")
