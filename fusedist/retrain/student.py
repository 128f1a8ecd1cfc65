"""The XMAG student in a retrain: the warm start, the challenger's distillation, its score.

Score: on the pairs of slides that *neither* student trained on (the intersection of the
validation slides of the two distillations, ``DistillConfig.validation``, which each export
card records), the linear CKA between the student's 5x embedding of ``lo.jpg`` and the
teacher's mean 20x tile embedding (its cached features): how much of the teacher's
representation the student reproduces, 0..1, higher is better. An export keeps the backbone
only (no projection heads), so the XMAG objective itself (distill's ``val/global_cos``) cannot
be recomputed for a registered student on new slides; CKA needs no heads and compares
students of any width alike. Each card's own ``validation`` (its run's val/global_cos and
val/local_cos, on its own split) is recorded beside it.
"""

from __future__ import annotations

import io
import logging

import numpy as np

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.distill.config import DistillConfig
from fusedist.distill.split import shard_slide
from fusedist.features.config import EncoderRef
from fusedist.formats import tile_manifest
from fusedist.formats.export_card import read_card
from fusedist.formats.feature_manifest import read_feature_manifest
from fusedist.models.refs import load_encoders

log = logging.getLogger("fusedist.retrain")

MIN_PAIRS = 8
"""Fewest validation pairs a CKA is computed from."""


def warm_start(distill: DistillConfig, mode: str, champion_dir: str | None) -> DistillConfig:
    """``distill`` with ``student.weights`` set to the champion's backbone (``champion``) or
    left as the recipe's own (``base``, or no champion yet)."""
    if mode != "champion" or champion_dir is None:
        return distill
    card = read_card(champion_dir)[1]
    if card.get("backbone") != distill.student.name:
        raise ConfigError(f"student.warm_start=champion: the champion student is a "
                          f"{card.get('backbone')!r} backbone but student.distill.student.name "
                          f"is {distill.student.name!r}; use the same backbone, or "
                          "student.warm_start=base")
    weights = storage.join(champion_dir, str(card.get("weights_file", "model.safetensors")))
    if not storage.is_s3(weights):
        weights = str(storage.local_path(weights).resolve())
    student = distill.student.model_copy(update={"weights": weights})
    return distill.model_copy(update={"student": student})


def evaluation_slides(champion_card: dict, challenger_card: dict) -> tuple[list[str], str]:
    """Validation slides of both distillations (neither student trained on them), and a note;
    the challenger's alone (the champion may have trained on them) when they share none."""
    chal = set((challenger_card.get("validation") or {}).get("slides") or [])
    champ = set((champion_card.get("validation") or {}).get("slides") or [])
    if not chal:
        return [], ("the challenger's distillation held no slide out (validation.fraction=0): "
                    "no student score")
    both = sorted(chal & champ)
    if both:
        return both, f"{len(both)} validation slide(s) held out of both distillations"
    return sorted(chal), (f"{len(chal)} validation slide(s) of the challenger's distillation; "
                          "the champion's held none of them out (it may have trained on them)")


def validation_shards(tiles: str, slides: list[str]) -> list[str]:
    """Pairs shards of ``slides``."""
    m = tile_manifest.read_manifest(tiles)
    keep = set(slides)
    return [s["name"] for s in m["shards"] if shard_slide(s) in keep]


def read_pairs(tiles: str, features: str, teacher: str, shards: list[str], limit: int
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 (N, 3, H, W) ``lo.jpg`` images, (N, D) mean teacher tile features, keys."""
    from PIL import Image

    # lazy: the shard reader imports torch, which the retrain job's other steps do not need
    from fusedist.data.reader import iter_tar_samples

    imgs, targets, keys = [], [], []
    for name in shards:
        feats = iter_tar_samples(storage.join(features, name))
        for (k, tile), (k2, f) in zip(iter_tar_samples(storage.join(tiles, name)), feats):
            if k != k2:
                raise ConfigError(f"{name}: tile key {k} but feature key {k2}; the feature "
                                  "cache does not mirror the tiles (re-run fusedist cache)")
            with Image.open(io.BytesIO(tile["lo.jpg"])) as im:
                imgs.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
            t = np.load(io.BytesIO(f[f"{teacher}.npy"]), allow_pickle=False)
            targets.append(t.astype(np.float32).reshape(-1, t.shape[-1]).mean(0))
            keys.append(k)
            if len(keys) >= limit:
                return np.stack(imgs), np.stack(targets), keys
    if not keys:
        raise ConfigError(f"no validation pairs in {tiles} ({len(shards)} shards)")
    return np.stack(imgs), np.stack(targets), keys


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same N samples."""
    x = x.astype(np.float64) - x.mean(0)
    y = y.astype(np.float64) - y.mean(0)
    num = np.linalg.norm(y.T @ x) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


def embed_pairs(export_dir: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The exported student's embedding of 5x images (as ``fusedist embed`` computes it)."""
    import torch

    (enc,) = load_encoders([EncoderRef(name=export_dir)])
    out = [enc.embed(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
           for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def score_students(distill: DistillConfig, exports: dict[str, str], limit: int) -> dict:
    """{role: {cka, pairs, card_validation}} for each export (champion, challenger), on the
    same pairs (``evaluation_slides``), plus ``slides``, ``note`` and ``delta``."""
    cards = {r: read_card(f)[1] for r, f in exports.items()}
    slides, note = evaluation_slides(cards["champion"], cards["challenger"])
    out: dict = {"slides": slides, "note": note, "delta": None,
                 **{r: {"cka": None, "card_validation": c.get("validation")}
                    for r, c in cards.items()}}
    if not slides:
        return out
    teacher = distill.teacher or read_feature_manifest(distill.features)["teacher"]
    shards = validation_shards(distill.tiles, slides)
    images, targets, keys = read_pairs(distill.tiles, distill.features, teacher, shards, limit)
    if len(keys) < MIN_PAIRS:  # CKA of one or two centred samples says nothing
        out["note"] += f"; only {len(keys)} pair(s) there (< {MIN_PAIRS}): no student score"
        return out
    for role, folder in exports.items():
        cka = linear_cka(embed_pairs(folder, images), targets)
        out[role].update(cka=cka, pairs=len(keys))
        log.info("student %s: CKA %.4f to %s on %d validation pairs", role, cka, teacher,
                 len(keys))
    out["delta"] = out["challenger"]["cka"] - out["champion"]["cka"]
    return out
