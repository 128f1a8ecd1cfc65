"""FuseCPath (methods.md §4), classification: multi-view clustering once per slide (before the
folds: it is unsupervised), sub-bags, the RRT student with collaborative distillation from
slide-level teachers; a slide's prediction is the mean over its sub-bags."""

from __future__ import annotations

import csv
import dataclasses
import io
import time

import numpy as np

from fusedist import storage
from fusedist.config import ConfigError
from fusedist.fusion.config import FuseCPathConfig
from fusedist.fusion.methods.base import FitInfo, Fitted, FoldContext, Method, Outputs, Skipped
from fusedist.fusion.methods.registry import register, register_fitted


def plan_slide(feats: list[np.ndarray], cfg, slide_id: str):
    """Sub-bag plan of one slide (``None`` when it has too few clusters) and why not."""
    return plan_unit(feats, cfg.fusecpath, cfg.seed, slide_id)


def plan_unit(feats: list[np.ndarray], fc: FuseCPathConfig, seed: int, unit_id: str):
    """``plan_slide`` from the ``fusecpath`` settings and the run's seed."""
    from fusedist.fusion.cluster import plan_subbags
    from fusedist.fusion.train import seed_for

    p = plan_subbags(feats, fc.n_clusters, fc.n_bags, fc.per_cluster, fc.clustering,
                     seed_for(seed, unit_id), rule=fc.subbag_rule)
    return (p.indices if p.ok else None), p.reason


def fusecpath_inputs(c, cfg, progress: bool
                     ) -> tuple[list, list[np.ndarray], dict[str, str], float]:
    """Sub-bag plans per slide, the slide-level teachers, skipped slides with reasons, and
    the seconds spent."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    plans, skipped = [], {}
    for i in tqdm(range(len(c.slide_ids)), desc="fusecpath clustering", unit="slide",
                  disable=not progress, dynamic_ncols=True):
        plan, why = plan_slide([c.aligned[e][i] for e in c.feature_group], cfg, c.slide_ids[i])
        plans.append(plan)
        if plan is None:
            skipped[c.slide_ids[i]] = why
    fc = cfg.fusecpath
    if fc.slide_embeddings:
        teachers = [_slide_embeddings(url, name, c) for name, url in fc.slide_embeddings.items()]
    else:  # no slide FM: each patch FM's mean-pooled bag is a slide-level teacher
        teachers = [np.stack([f.mean(0) for f in c.aligned[e]]) for e in c.feature_group]
    return plans, teachers, skipped, time.perf_counter() - t0


def _slide_embeddings(url: str, name: str, c) -> np.ndarray:
    if url.endswith(".npz"):
        with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as z:
            table = dict(zip([str(s) for s in z["slide_ids"]], z["features"]))
    else:
        rows = list(csv.reader(io.StringIO(storage.read_text(url))))
        table = {r[0]: np.array(r[1:], np.float32) for r in rows[1:]}
    def unit_row(i: int):
        # A patient unit: its own row, else the mean of its slides' rows (slide FMs embed
        # slides; the pooled bag is the patient's).
        s = c.slide_ids[i]
        if s in table:
            return np.asarray(table[s], np.float32)
        rows = [table[m] for m in c.unit_slides(i) if m in table]
        if c.members is None or len(rows) < len(c.unit_slides(i)):
            return None
        return np.mean(np.asarray(rows, np.float32), 0)

    got = [unit_row(i) for i in range(len(c.slide_ids))]
    missing = [s for s, g in zip(c.slide_ids, got) if g is None]
    if missing:
        raise ConfigError(f"fusecpath.slide_embeddings.{name}: {url} has no row for "
                          f"{len(missing)} {'patient' if c.members else 'slide'}(s), e.g. "
                          f"{missing[:3]}")
    out = np.stack(got)
    if not np.isfinite(out).all():
        raise ConfigError(f"fusecpath.slide_embeddings.{name}: {url} contains NaN or inf")
    return out


def _features(x, group: list[str], i: int):
    import torch

    return torch.as_tensor(np.concatenate([x.aligned[e][i] for e in group], 1))


@register_fitted
class FuseCPathFitted(Fitted):
    kind = "fusecpath"

    def __init__(self, targets, model, group: list[str], kw: dict, info=None) -> None:
        super().__init__(targets, info)
        self.model, self.group, self.kw = model, list(group), kw

    def encoders(self):
        return self.group

    def prepare_unit(self, x, unit_id, card):
        """The new slide's sub-bag plan, clustered as ``FuseCPath.prepare`` clusters the
        cohort's slides (the card's ``fusecpath`` settings and seed)."""
        fc = FuseCPathConfig(**card["fusecpath"])
        plan = plan_unit([x.aligned[e][0] for e in self.group], fc, card["seed"], unit_id)[0]
        return dataclasses.replace(x, plans=[plan])

    def predict(self, x, device=None):
        import torch

        from fusedist.fusion.train import predict_fusecpath

        device = device or torch.device("cpu")
        out = np.full((len(x.idx), self.targets.num_outputs), np.nan, np.float32)
        for row, i in enumerate(x.idx):
            if x.plans[i] is not None:
                out[row] = predict_fusecpath(self.model, _features(x, self.group, i),
                                             x.plans[i], device)
        skipped = int(np.isnan(out[:, 0]).sum())
        note = (f"{skipped} held-out slide(s) without enough clusters are not scored"
                if skipped else None)
        return Outputs(out, note=note)

    def state_dict(self):
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def spec(self):
        return {"kind": self.kind, "group": self.group, "kw": self.kw}

    @classmethod
    def from_spec(cls, spec, state, targets):
        from fusedist.fusion.fusecpath import FuseCPathModel

        kw = spec["kw"]
        model = FuseCPathModel(kw["in_dim"], kw["out"], kw["teacher_dims"],
                               region_num=kw["region_num"], topk=kw["topk"],
                               topk_ties=kw.get("topk_ties", "keep"))
        model.load_state_dict(state)
        model.eval()
        return cls(targets, model, spec["group"], kw)


@register
class FuseCPath(Method):
    key = "fusecpath"
    tasks = ("classification",)
    order = 60

    def label(self, task):
        return "FuseCPath"

    @classmethod
    def prepare(cls, c, cfg, progress):
        plans, teachers, skipped, secs = fusecpath_inputs(c, cfg, progress)
        notes = {}
        if skipped:
            notes["fusecpath.clustering"] = (f"{len(skipped)} slide(s) skipped, e.g. "
                                             f"{next(iter(skipped.items()))}")
        notes["fusecpath.cluster_s"] = f"{secs:.2f}"
        return (plans, teachers), notes

    def fit(self, ctx: FoldContext):
        import torch

        from fusedist.fusion.fusecpath import FuseCPathModel
        from fusedist.fusion.train import train_fusecpath, trainable_params

        plans, teachers = ctx.prepared["fusecpath"]
        fc, g, c = ctx.cfg.fusecpath, ctx.c.feature_group, ctx.c
        x = ctx.inputs(ctx.train)
        tr = [i for i in ctx.train if plans[i] is not None]
        if len({int(c.y[i]) for i in tr}) < 2:
            raise Skipped("skipped: too few clustered training slides", nan=True)
        feats = {i: _features(x, g, i) for i in tr}
        kw = {"in_dim": int(feats[tr[0]].shape[1]), "out": ctx.num_outputs,
              "teacher_dims": [int(t.shape[1]) for t in teachers],
              "region_num": fc.region_num, "topk": fc.topk, "topk_ties": fc.topk_ties}
        torch.manual_seed(ctx.seed("fusecpath", "init"))
        model = FuseCPathModel(kw["in_dim"], kw["out"], kw["teacher_dims"],
                               region_num=fc.region_num, topk=fc.topk, topk_ties=fc.topk_ties)
        secs = train_fusecpath(
            model, [feats[i] for i in tr], [plans[i] for i in tr],
            torch.as_tensor(c.y[tr]), [torch.as_tensor(t[tr]) for t in teachers],
            fc.epochs, fc.lr, fc.batch_size, fc.alpha, fc.temperature, ctx.seed("fusecpath"),
            ctx.device)
        return FuseCPathFitted(ctx.targets, model, g, kw,
                               FitInfo(train_s=secs, params=trainable_params(model)))
