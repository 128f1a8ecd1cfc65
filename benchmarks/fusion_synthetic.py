"""Fusion on a synthetic cohort whose encoders each see different latent cues.

Builds ``fusedist.synth.cohort.synthetic_cohort`` (three encoders, each a random nonlinear
view of 2 of the 4 cues, so none sees everything), runs the ``fusedist fuse`` pipeline for
each task, and prints one table (rows = methods, columns = each task's primary metric, mean ±
std over the outer folds) plus, per task: the best single expert, LogitProd, their difference,
whether LogitProd beat the best expert on held-out folds, and whether LogitProd's training
objective was <= the experts' (a weighted product of experts can put all its weight on one
expert, so its optimum can be no worse than any single expert's).

    python benchmarks/fusion_synthetic.py                    # the figures in docs/benchmarks.md
    python benchmarks/fusion_synthetic.py --quick            # a smoke run (small, few epochs)
    python benchmarks/fusion_synthetic.py --tasks survival --set experts.epochs=10

Writes ``<output>/fusion_synthetic.md`` (and ``.json``); each task's full report stays in
``<output>/<task>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = ("classification", "survival", "regression")
QUICK_METHODS = "best_expert,mean_ensemble,concat,logitprod"
EXPERT = "expert."

# Overrides that fit the synthetic cohort (48-96 tiles, 48-96 dims) rather than real slides:
# FuseCPath's 50 clusters x 10 tiles would leave no slide with enough tiles. Not applied
# over a --config (which is then the whole recipe).
COHORT_SETS = ["fusecpath.n_clusters=6", "fusecpath.n_bags=16", "fusecpath.per_cluster=4"]
# --quick: a smoke run of every stage in a few minutes on 2 CPUs, not a measurement.
QUICK_SETS = ["experts.epochs=4", "experts.survival_epochs=6", "experts.hidden=64",
              "logitprod.max_epochs=60", "logitprod.patience=10", "inner_folds=2",
              "meta.strategies=[self_attention]", "meta.embed_dim=64", "meta.token_dim=32",
              "fusecpath.epochs=3", "heatmaps=0"]


@dataclass
class TaskVerdict:
    """What one task says about LogitProd versus the single experts."""

    task: str
    metric: str
    best_expert: str | None
    best_expert_score: float
    logitprod_score: float
    delta: float                      # LogitProd - best expert (primary metric, higher better)
    beat_best_expert: bool | None     # None: no LogitProd row (not defined for the task)
    folds_won: str | None             # "k/n" folds where LogitProd > that expert, if known
    best_fusion: str | None           # best non-expert method and its score
    best_fusion_score: float
    objective_logitprod: float
    objective_best_expert: float      # lowest training objective among the experts
    objective_expert: str | None
    objective_ok: bool | None
    seconds: float


# ----------------------------------------------------------------------------- running

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=None, help="slides (default 200; quick: 60)")
    p.add_argument("--folds", type=int, default=None, help="outer CV folds (default 5; quick 3)")
    p.add_argument("--seed", type=int, default=0, help="cohort and fuse seed")
    p.add_argument("--output", default="bench-fusion-synthetic", help="output folder")
    p.add_argument("--quick", action="store_true", help="small cohort, few epochs (smoke run)")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated fuse methods (default: all; quick: {QUICK_METHODS})")
    p.add_argument("--classes", type=int, default=2, help="classes of the cohort")
    p.add_argument("--risk-scale", type=float, default=2.0,
                   help="survival risk weight multiplier (1 = fusedist synth's labels, where "
                        "even the true cues reach c ~0.67; 2: ~0.78)")
    p.add_argument("--config", default=None, help="a FuseConfig YAML to start from")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="FuseConfig override, e.g. experts.epochs=10 (repeatable)")
    p.add_argument("--mlflow-uri", default=None,
                   help="log to this MLflow store (e.g. sqlite:///mlruns.db); default: off")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        p.error(f"unknown task(s) {sorted(unknown)}; choose from {list(TASKS)}")
    args.slides = args.slides or (60 if args.quick else 200)
    args.folds = args.folds or (3 if args.quick else 5)
    if args.methods is None and args.quick:
        args.methods = QUICK_METHODS
    return args


def fuse_config(args: argparse.Namespace, cohort: Any, task: str, num_genes: int) -> Any:
    """The FuseConfig of one task: cohort paths and CLI choices over the recipe defaults."""
    from fusedist.config import load_config
    from fusedist.fusion.config import FuseConfig

    fields: dict[str, Any] = {
        "bags": cohort.bags, "labels": cohort.labels, "task": task,
        "output": str(Path(args.output) / task), "folds": args.folds, "seed": args.seed,
        # A rerun with other settings must not resume folds of the previous one.
        "overwrite": True,
    }
    if args.mlflow_uri:
        fields["mlflow"] = {"enabled": True, "tracking_uri": args.mlflow_uri,
                            "experiment": "fusion-synthetic", "run_name": task}
    elif args.config is None:  # a --config decides for itself
        fields["mlflow"] = {"enabled": False}
    if task == "regression":
        fields["target"] = [f"gene_{g}" for g in range(num_genes)]
    if args.methods:
        fields["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    # Overrides beat the YAML, so the cohort defaults only apply without one.
    base = COHORT_SETS if args.config is None else []
    sets = [*base, *(QUICK_SETS if args.quick else []), *args.sets]
    return load_config(FuseConfig, args.config, sets, **fields)


def run_task(args: argparse.Namespace, cohort: Any, task: str, num_genes: int) -> tuple[Any, float]:
    from fusedist.fusion.run import run_fuse

    cfg = fuse_config(args, cohort, task, num_genes)
    t = time.perf_counter()
    result = run_fuse(cfg, progress=True)
    return result, time.perf_counter() - t


# ----------------------------------------------------------------------------- verdicts

def _mean(summary: dict, method: str, metric: str) -> float:
    stats = summary.get(method, {}).get(metric)
    return float(stats[0]) if stats is not None else math.nan


def _best(summary: dict, metric: str, methods: list[str]) -> tuple[str | None, float]:
    """The method with the highest finite mean of ``metric`` (None if there is none)."""
    scored = [(m, _mean(summary, m, metric)) for m in methods]
    scored = [(m, s) for m, s in scored if math.isfinite(s)]
    return max(scored, key=lambda ms: ms[1]) if scored else (None, math.nan)


def _folds_won(result: Any, metric: str, expert: str | None) -> str | None:
    """"k/n" outer folds where LogitProd beat ``expert``, when the result keeps fold scores."""
    folds = getattr(result, "fold_metrics", None)
    if not folds or expert is None or "logitprod" not in folds or expert not in folds:
        return None
    pairs = [(a.get(metric, math.nan), b.get(metric, math.nan))
             for a, b in zip(folds["logitprod"], folds[expert])]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    return f"{sum(a > b for a, b in pairs)}/{len(pairs)}" if pairs else None


def verdict(task: str, result: Any, seconds: float) -> TaskVerdict:
    """Best single expert (by held-out mean, an oracle choice) vs LogitProd for one task."""
    summary, metric = result.summary, result.primary_metric
    experts = [m for m in summary if m.startswith(EXPERT)]
    fusion = [m for m in summary if not m.startswith(EXPERT) and m != "best_expert"]
    best, best_score = _best(summary, metric, experts)
    lp = _mean(summary, "logitprod", metric)
    has_lp = "logitprod" in summary and math.isfinite(lp)
    fuse_best, fuse_score = _best(summary, metric, fusion)
    objectives = getattr(result, "objectives", None) or {}
    exp_obj = {m: float(v) for m, v in objectives.items() if m.startswith(EXPERT)
               and math.isfinite(float(v))}
    obj_expert = min(exp_obj, key=exp_obj.get) if exp_obj else None
    obj_lp = float(objectives.get("logitprod", math.nan))
    obj_best = exp_obj[obj_expert] if obj_expert else math.nan
    obj_ok = (obj_lp <= obj_best + 1e-9) if math.isfinite(obj_lp) and obj_expert else None
    return TaskVerdict(
        task=task, metric=metric, best_expert=best, best_expert_score=best_score,
        logitprod_score=lp, delta=lp - best_score if has_lp else math.nan,
        beat_best_expert=(lp > best_score) if has_lp and best else None,
        folds_won=_folds_won(result, metric, best) if has_lp else None,
        best_fusion=fuse_best, best_fusion_score=fuse_score,
        objective_logitprod=obj_lp, objective_best_expert=obj_best,
        objective_expert=obj_expert, objective_ok=obj_ok, seconds=round(seconds, 1))


# ----------------------------------------------------------------------------- reporting

def _cell(stats: tuple[float, float] | None) -> str:
    if stats is None or not math.isfinite(float(stats[0])):
        return "—"
    mean, std = float(stats[0]), float(stats[1])
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def combined_table(results: dict[str, Any]) -> str:
    """Markdown: rows = methods (experts first), columns = each task's primary metric."""
    rows: list[str] = []
    for res in results.values():
        for m in res.summary:
            if m not in rows:
                rows.append(m)
    # Experts first (by name), then the fusion methods in the order the runs listed them.
    rows = sorted(m for m in rows if m.startswith(EXPERT)) + [m for m in rows
                                                             if not m.startswith(EXPERT)]
    head = ["method", *(f"{t} ({r.primary_metric})" for t, r in results.items())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        cells = [_cell(r.summary.get(m, {}).get(r.primary_metric)) for r in results.values()]
        lines.append("| " + " | ".join([m, *cells]) + " |")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else "n/a"


def verdict_lines(v: TaskVerdict) -> list[str]:
    yes = {True: "yes", False: "NO", None: "n/a"}
    won = f" ({v.folds_won} folds)" if v.folds_won else ""
    return [
        f"- **{v.task}** ({v.metric}, {v.seconds:.0f} s): best single expert "
        f"{v.best_expert} {v.best_expert_score:.3f}; LogitProd "
        + (f"{v.logitprod_score:.3f} (Δ {_fmt(v.delta)}); beat the best expert on held-out "
           f"folds: {yes[v.beat_best_expert]}{won}" if math.isfinite(v.logitprod_score)
           else "not run for this task")
        + (f"; best fusion method {v.best_fusion} {v.best_fusion_score:.3f}"
           if v.best_fusion else ""),
        f"  - training objective: LogitProd {v.objective_logitprod:.4f} vs best expert "
        f"{v.objective_expert} {v.objective_best_expert:.4f} -> LogitProd <= expert: "
        f"{yes[v.objective_ok]}" if v.objective_expert and math.isfinite(v.objective_logitprod)
        else "  - training objective: n/a",
    ]


def write_report(args: argparse.Namespace, cohort: Any, results: dict[str, Any],
                 verdicts: list[TaskVerdict], cohort_s: float) -> str:
    table = combined_table(results)
    lines = [
        "# Fusion on a synthetic cohort", "",
        f"{cohort.num_slides} slides, {cohort.num_classes} classes, survival risk x"
        f"{args.risk_scale:g}, encoders "
        f"{', '.join(cohort.encoders)}; {args.folds}-fold CV, seed {args.seed}"
        f"{', quick' if args.quick else ''}; cohort built in {cohort_s:.1f} s; "
        f"{platform.processor() or platform.machine()}, {platform.python_version()}.", "",
        table, "",
    ]
    for v in verdicts:
        lines += verdict_lines(v)
    text = "\n".join(lines)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_synthetic.md").write_text(text)
    (out / "fusion_synthetic.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items()}, "cohort": asdict(cohort),
         "summary": {t: r.summary for t, r in results.items()},
         "costs": {t: getattr(r, "costs", {}) for t, r in results.items()},
         "verdicts": [asdict(v) for v in verdicts]}, indent=2, default=str))
    return text


def main(argv: list[str] | None = None) -> int:
    from fusedist.synth.cohort import synthetic_cohort

    args = parse_args(argv)
    num_genes = 8
    t = time.perf_counter()
    cohort = synthetic_cohort(str(Path(args.output) / "cohort"), num_slides=args.slides,
                              num_classes=args.classes, seed=args.seed, num_genes=num_genes,
                              risk_scale=args.risk_scale)
    cohort_s = time.perf_counter() - t
    results: dict[str, Any] = {}
    verdicts: list[TaskVerdict] = []
    for task in args.tasks:
        print(f"== {task}", flush=True)
        result, seconds = run_task(args, cohort, task, num_genes)
        results[task] = result
        verdicts.append(verdict(task, result, seconds))
    print(write_report(args, cohort, results, verdicts, cohort_s))
    print(f"wrote {Path(args.output) / 'fusion_synthetic.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
