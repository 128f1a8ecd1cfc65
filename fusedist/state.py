"""The resumable state of a stage: done-entries under ``<output>/_state/``.

Every long stage keeps what it has finished as one small JSON *done-entry* per unit (a slide's
plan, a shard, a fold, a predicted slide), written atomically only after the unit's outputs are
committed. A re-run reads the entries (concurrently: on S3 each is a ~10 ms request), skips the
units whose entry is current and does the rest, so an interrupted run finishes with the same
outputs as an uninterrupted one. What "current" means is the stage's business (a config
digest, a weights digest, a source shard's sha256); where the entries live, how they are read
and written, the guard against mixing two configs in one output, and the error a user sees
are this module's, once for every stage:

    tile      <dataset>/_state/slides/<slide>.json, _state/shards/<shard>.json
    cache     <features>/<teacher>/<dataset>/_state/shards/<shard>.json
    embed     <output>/_state/bags/<encoder>/<slide>.json (beside <output>/<encoder>/<slide>.h5)
    fuse      <output>/_state/digest.json, _state/fold-NN.json
    distill   <storage_path>/<run_name>/_state/digest.json (what the run trains: student,
              teacher and its weights, data); its progress is the checkpoints and sample log
    predict   <output>/_state/<slide>.json
"""

from __future__ import annotations

from typing import Any, Iterable

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.formats.slide_ids import decode_id, encode_id
from fusedist.lookups import concurrently, read_state

DIGEST = "digest"


OVERWRITE_FIX = ("choose another output (--output / --dataset), or pass "
                 "--set overwrite=true to replace them")


def mismatch_error(where: str, what: str, differs: str = "config",
                   fix: str = OVERWRITE_FIX) -> ConfigError:
    """The one error for outputs that a re-run with other settings would mix with its own."""
    return ConfigError(f"{where} already holds {what} made with a different {differs}; {fix}")


class StageState:
    """Done-entries of one stage, keyed by unit name, in ``<root>/_state/<sub...>/``."""

    def __init__(self, root: str, *sub: str):
        self.root = root
        self.url = storage.join(root, "_state", *sub)

    def entry_url(self, name: str) -> str:
        # Units are often slides: their ids may hold characters a file name cannot.
        return storage.join(self.url, f"{encode_id(name)}.json")

    def read(self, name: str) -> Any | None:
        """The entry of ``name``, or None when it has none (one request, not exists + read)."""
        return read_state(self.entry_url(name))

    def read_many(self, names: Iterable[str]) -> dict[str, Any]:
        """The entries that exist among ``names``, read concurrently."""
        names = list(names)
        entries = concurrently(read_state, [self.entry_url(n) for n in names],
                               remote=storage.is_s3(self.url))
        return {n: e for n, e in zip(names, entries) if e is not None}

    def write(self, name: str, entry: Any) -> None:
        """Record ``name`` as done (atomic: a reader sees the old entry or the new one)."""
        storage.write_json(self.entry_url(name), entry)

    def names(self) -> list[str]:
        return [decode_id(n[:-len(".json")]) for n in storage.listdir(self.url, ".json")]

    def delete(self, name: str) -> None:
        storage.delete(self.entry_url(name))

    def clear(self) -> None:
        for name in self.names():
            self.delete(name)

    def guard(self, digest: str, overwrite: bool, what: str, differs: str = "config",
              fix: str = OVERWRITE_FIX) -> None:
        """Bind this state to ``digest`` (the config and inputs that made it).

        A state made under another digest raises :func:`mismatch_error`, or with
        ``overwrite`` is discarded; either way the folder then belongs to ``digest``."""
        old = self.read(DIGEST)
        if old is not None and old.get("digest") != digest:
            if not overwrite:
                raise mismatch_error(self.root, what, differs, fix)
            self.clear()
        if old is None or old.get("digest") != digest:
            self.write(DIGEST, {"digest": digest})
