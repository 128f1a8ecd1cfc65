"""Slide-level validation of the EMA student (``DistillConfig.validation``).

**Split** (:mod:`fusedist.distill.split`): every shard of a held-out slide goes to
validation, so no tile of a validation slide is trained on, and the training reader (its
cursor, its sample log) never sees them. The split is written to ``<run>/validation.json``,
logged to MLflow (``validation/split.json``), guarded on resume (a re-run with other
validation slides is refused) and copied into the export card.

**Metrics.** On every validation tile, unaugmented, with ``t_j`` the teacher's cached
embedding of sub-tile ``j`` (methods.md §1, the two terms of ``XmagObjective``):

    val/global_cos = mean over tiles of cos(global_head(CLS), mean_j t_j)
    val/local_cos  = mean over tiles and j of cos(local_head(block_j), t_j)

computed with the EMA student (the model that is exported: rank 0's), in fp32. Each rank
evaluates a contiguous share of the validation stream (``ShardReader(equal=False)``: every
tile exactly once over all ranks) and the sums are all-reduced, so every rank holds the same
numbers. The ranks' EMA parameters are identical (ZeRO 0-2 keep the weights replicated), but
their BatchNorm running statistics are not: each rank's heads see only its own micro-batches
and DeepSpeed does not synchronise buffers. So rank 0's buffers are broadcast first, and every
rank evaluates exactly the exported EMA (only its buffers change, and the next EMA update
copies the training module's again).
Validation reads no training data and draws no random numbers the training uses, so a
resumed run trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from fusedist.data import ShardReader
from fusedist.distill.data import PairDecoder
from fusedist.distill.losses import _cos

# Model-version tags set from a card's ``validation`` (registered-model search filters on them).
TAG_KEYS = ("global_cos", "local_cos", "step", "tiles")


def validation_tags(card: Mapping[str, Any]) -> dict[str, str]:
    """Model-version tags of an export card's final validation (``validation.global_cos``,
    ``validation.local_cos``, ``validation.step``, ``validation.tiles``,
    ``validation.slides``: the count); none for a run without validation."""
    v = card.get("validation") or {}
    tags = {f"validation.{k}": str(v[k]) for k in TAG_KEYS if v.get(k) is not None}
    if v.get("slides") is not None:
        tags["validation.slides"] = str(len(v["slides"]))
    return tags


# ----------------------------------------------------------------------------- worker side

class Validator:
    """One rank's side of the validation (a no-op when the run holds no slide out)."""

    def __init__(self, cfg: Any, info: Any, rank: int, world: int, device: torch.device):
        self.cfg, self.info, self.rank, self.world = cfg, info, rank, world
        self.device = device
        self.enabled = bool(info.val_shards)
        self.last: dict[str, float] = {}

    def due(self, step: int, total: int) -> bool:
        """Every ``validation.every_steps`` steps and after the last one (the same answer on
        every rank: the all-reduce below is a collective)."""
        return self.enabled and (step % self.cfg.validation.every_steps == 0 or step == total)

    def _loader(self) -> Any:
        reader = ShardReader([self.cfg.tiles, self.cfg.features], shuffle=False, equal=False,
                             rank=self.rank, world_size=self.world,
                             shards=self.info.val_shards, decode=PairDecoder(self.info.teacher))
        # Own generator: the loader's worker seed must not come from (and advance) the global
        # RNG, so validating changes nothing the training draws.
        return DataLoader(reader, batch_size=self.cfg.batch.micro_batch,
                          num_workers=self.cfg.batch.loader_workers, drop_last=False,
                          pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def sums(self, module: torch.nn.Module) -> torch.Tensor:
        """(sum of global cosines, sum of local cosines, tiles, local pairs) on this rank."""
        total = torch.zeros(4, dtype=torch.float64, device=self.device)
        was_training = module.training
        module.eval()
        try:
            for batch in self._loader():
                images = batch["image"].to(self.device, non_blocking=True).float().div_(255.0)
                targets = batch["target"].to(self.device, non_blocking=True).float()
                out = module(module.normalize(images))
                g = _cos(out["global"], targets.mean(dim=1))
                loc = _cos(out["local"], targets)
                total += torch.stack([g.double().sum(), loc.double().sum(),
                                      torch.tensor(float(g.numel()), device=self.device,
                                                   dtype=torch.float64),
                                      torch.tensor(float(loc.numel()), device=self.device,
                                                   dtype=torch.float64)])
        finally:
            module.train(was_training)
        return total

    def __call__(self, module: torch.nn.Module, step: int) -> dict[str, Any]:
        """Validate ``module`` (the EMA student) on every validation tile; every rank calls
        this at the same step and gets the same result."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        if dist.is_initialized() and self.world > 1:
            for b in module.buffers():  # rank 0's BatchNorm statistics: the exported ones
                dist.broadcast(b.data, src=0)
        total = self.sums(module)
        if dist.is_initialized():
            dist.all_reduce(total)
        g, loc, n, pairs = total.tolist()
        if n == 0:
            raise RuntimeError(f"validation at step {step} read no tile of the "
                               f"{len(self.info.val_shards)} validation shard(s)")
        result = {"global_cos": g / n, "local_cos": loc / pairs, "tiles": int(n),
                  "step": step}
        self.last = {"val/global_cos": result["global_cos"],
                     "val/local_cos": result["local_cos"],
                     "val/seconds": time.perf_counter() - t0}
        return result
