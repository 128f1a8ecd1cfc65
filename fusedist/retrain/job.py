"""``fusedist retrain``: ingest new slides, refit, evaluate against the champion, gate.

One run (``<output>/runs/<run_id>/``)::

    ingest.json          the new slides and what each stage wrote for them
    champion-student/    the champion student's export (from the registry), if any
    challenger/          fuse output of the challenger's recipe on every labelled slide (+ model/)
    champion-model/      the champion fused model (from the registry)
    champion/            fuse output of the champion's recipe, trained on its own slides
    promotion.json       the decision, both scores per fold, the reason
    summary.md           the same for people

A run that nothing changed (no slide to ingest, the cohort and recipe of the newest registered
version) does nothing: "no new slides; champion kept", no run, no version. A killed run is
resumed by the next one (``<output>/_state/pending.json``): every stage skips what it finished.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from fusedist import storage
from fusedist.config import ConfigError, config_digest
from fusedist.formats.bags import encoder_folders, list_bags
from fusedist.fusion.config import FuseConfig
from fusedist.fusion.data import read_labels
from fusedist.fusion.model import flat_reason, recipe_of
from fusedist.fusion.run import lineage_inputs, run_fuse
from fusedist.fusion.units import join_patients
from fusedist.models.refs import resolve_ref
from fusedist.retrain import ingest as ing
from fusedist.retrain.config import RetrainConfig
from fusedist.retrain.evaluate import (Decision, Score, champion_config, check_metric,
                                       check_same_folds, decide, score_of)
from fusedist.retrain.registry import FUSED_ARTIFACT, STUDENT_ARTIFACT, Registry, Version
from fusedist.retrain.student import score_students, warm_start
from fusedist.state import StageState
from fusedist.tracking import start_run

log = logging.getLogger("fusedist.retrain")

NOTHING = "no new slides; champion kept"
TAG = "fusedist.retrain"
DIGEST_TAG = f"{TAG}.inputs_digest"
RUN_TAG = f"{TAG}.run_id"
PENDING = "pending"


@dataclass
class RetrainResult:
    """What a retrain run did; ``promotion`` is promotion.json (None when nothing ran)."""

    status: str  # nothing | promoted | kept
    message: str
    run_id: str | None = None
    run_url: str | None = None
    promotion: dict | None = None
    ingest: dict = field(default_factory=dict)
    elapsed: float = 0.0

    def summary(self) -> str:
        if self.promotion is None:
            return self.message
        return summary_md(self.promotion)


# ----------------------------------------------------------------------------- helpers

def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def _student_name(v: Version | None) -> str | None:
    return v.tags.get("name") if v is not None else None


def challenger_encoders(cfg: RetrainConfig, student: str | None) -> list[str] | None:
    """The encoders the challenger fuses: ``fuse.encoders``, else every embed stage's plus the
    student; None (every bag folder) for a recipe with neither."""
    if cfg.fuse.encoders:
        return list(cfg.fuse.encoders)
    names = [resolve_ref(r.name) for e in cfg.embed.values() for r in e.encoders]
    names += [student] if student else []
    return list(dict.fromkeys(names)) or None


def cohort_slides(cfg: RetrainConfig, encoders: list[str] | None) -> list[str]:
    """Labelled slides with a bag for every encoder (a listing, no bag is opened): the
    labels' slides, or (labels keyed by patient_id) the labelled patients' slides in
    ``fuse.slides``, patient by patient in label order, each patient's in slide-id order."""
    rows, cols = read_labels(cfg.labels)
    folders = encoder_folders(cfg.fuse.bags) if storage.exists(cfg.fuse.bags) else {}
    names = encoders or list(folders)
    have = [set(list_bags(folders.get(e) or storage.join(cfg.fuse.bags, e))) for e in names]
    return [s for s in _labelled_slides(cfg, rows, cols) if have and all(s in h for h in have)]


def _labelled_slides(cfg: RetrainConfig, rows: list[dict[str, str]], cols: list[str]
                     ) -> list[str]:
    if "slide_id" in cols:
        return [r["slide_id"] for r in rows]
    if not cfg.fuse.slides:
        raise ConfigError(f"labels: {cfg.labels} is keyed by patient_id; set fuse.slides to a "
                          "slide table (slide_id, path, patient_id) so retrain can join its "
                          "patients to their slides' bags")
    _, slides_of, labelled = join_patients(cfg.fuse, rows, "patient_id")
    return [s for p in labelled for s in sorted(slides_of.get(p, []))]


def inputs_digest(cfg: RetrainConfig, encoders: list[str] | None) -> str:
    """What a retrain's result depends on: labels, cohort, encoders, the recipes, and the
    slide table that joins slides to patients (``fuse.slides``, when set)."""
    student = None
    if cfg.student is not None and cfg.student.retrain and cfg.student.distill is not None:
        student = [cfg.student.warm_start, config_digest(cfg.student.distill, {
            "run_name", "ray", "storage", "mlflow", "export", "storage_path"})]
    payload = {"labels": _sha256(cfg.labels),
               "slides": cohort_slides(cfg, encoders), "encoders": encoders,
               "recipe": recipe_of(cfg.fuse), "student": student}
    if cfg.fuse.slides:  # only then: recipes without one keep the digests they registered
        payload["slide_table"] = _sha256(cfg.fuse.slides)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _sha256(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def _stage_mlflow(cfg, parent_run_id: str | None, run_id: str):
    tags = {RUN_TAG: run_id, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    return cfg.mlflow.model_copy(update={"tags": {**cfg.mlflow.tags, **tags}})


def _fuse_config(base: FuseConfig, **update) -> FuseConfig:
    return FuseConfig.model_validate({**base.model_dump(mode="json"), **update})


def _fresh_id(cfg: RetrainConfig, run_id: str) -> str:
    """``run_id``, or ``run_id.2``, ``.3``... when a finished run already has that folder (a
    second run on the day of a daily ``--run-id``)."""
    base, n = run_id, 1
    while storage.exists(storage.join(cfg.output, "runs", run_id, "promotion.json")):
        n += 1
        run_id = f"{base}.{n}"
    return run_id


# ----------------------------------------------------------------------------- the job

def run_retrain(cfg: RetrainConfig, progress: bool = True, force_promote: bool = False,
                run_id: str | None = None) -> RetrainResult:
    """One scheduled retraining run; see the module docstring."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    _labelled_slides(cfg, *read_labels(cfg.labels))  # bad labels / slide table: before any work
    reg = Registry(cfg.mlflow)
    state = StageState(cfg.output)
    pending = state.read(PENDING)
    new = ing.new_slides(cfg)
    student_champ = (reg.by_alias(cfg.student.registered_model, cfg.student.alias)
                     if cfg.student else None)
    if cfg.student and student_champ is None and not cfg.student.retrain:
        raise ConfigError(f"student: no {cfg.student.registered_model}@{cfg.student.alias} in "
                          "the MLflow registry; distil one (fusedist distill registers it), "
                          "set student.retrain=true, or set student: null")
    if pending is None and not new and not force_promote:
        latest = reg.latest(cfg.registry.fused_model)
        encoders = challenger_encoders(cfg, _student_name(student_champ))
        if latest is not None and latest.tags.get(DIGEST_TAG) == inputs_digest(cfg, encoders):
            log.info("retrain: %s (newest version %s has these inputs)", NOTHING,
                     latest.version)
            return RetrainResult("nothing", NOTHING, elapsed=time.perf_counter() - t0)
    if pending is not None:
        run_id = pending["run_id"]
        new = list(dict.fromkeys([*pending.get("new_slides", []), *new]))
        log.info("retrain: resuming run %s", run_id)
    else:
        run_id = _fresh_id(cfg, run_id or _stamp())
    state.write(PENDING, {"run_id": run_id, "new_slides": new})
    run_url = storage.join(cfg.output, "runs", run_id)
    with start_run(cfg.mlflow, run_name=f"retrain-{run_id}", params=cfg,
                   tags={"fusedist.stage": "retrain", RUN_TAG: run_id}) as run:
        job = _Job(cfg, reg, run, run_id, run_url, progress)
        promotion = job.run(new, bool(new) or pending is not None, student_champ,
                            force_promote)
    state.delete(PENDING)
    status = "promoted" if promotion["promoted"] else "kept"
    return RetrainResult(status, promotion["reason"], run_id, run_url, promotion,
                         promotion["ingest"], time.perf_counter() - t0)


class _Job:
    """The steps of one run, sharing its registry, MLflow run and folder."""

    def __init__(self, cfg: RetrainConfig, reg: Registry, run, run_id: str, run_url: str,
                 progress: bool):
        self.cfg, self.reg, self.tracker, self.run_id = cfg, reg, run, run_id
        self.url, self.progress = run_url, progress
        self.stage_mlflow = _stage_mlflow(cfg, run.run_id, run_id)

    def _download(self, v: Version, name: str, artifact: str) -> str:
        dest = storage.join(self.url, name)
        if not storage.exists(storage.join(dest, "card.json")):  # a resumed run has it
            self.reg.download(v, dest, artifact)
        return dest

    def run(self, new: list[str], ingest: bool, student_champ: Version | None,
            force: bool) -> dict:
        cfg, st = self.cfg, self.cfg.student
        champion = self._champion()
        res = (ing.run_ingest(cfg, new, self.stage_mlflow, self.progress) if ingest
               else ing.IngestResult())
        champ_student = champ_student_name = None
        if st is not None and student_champ is not None:
            champ_student = self._download(student_champ, "champion-student",
                                           STUDENT_ARTIFACT)
            champ_student_name = ing.embed_student(cfg, champ_student, self.stage_mlflow,
                                                   "student.champion", res, self.progress)
        digest = inputs_digest(cfg, challenger_encoders(cfg, champ_student_name))
        storage.write_json(storage.join(self.url, "ingest.json"), res.to_dict())

        student = None  # the challenger student: (folder, name, version)
        if st is not None and st.retrain:
            student = self._distill(champ_student, res)
        student_name = student[1] if student else champ_student_name
        chal_cfg = _fuse_config(cfg.fuse, output=storage.join(self.url, "challenger"),
                                encoders=challenger_encoders(cfg, student_name),
                                final={**cfg.fuse.final.model_dump(mode="json"),
                                       "enabled": True},
                                mlflow=self._mlflow(cfg.fuse.mlflow).model_dump())
        chal = run_fuse(chal_cfg, progress=self.progress)
        chal_card = storage.read_json(storage.join(chal.model, "card.json"))
        if self.tracker.active:  # the data this retrain fitted on (its fuse run lists it too)
            fused = storage.read_json(storage.join(chal.output, "manifest.json"))["encoders"]
            self.tracker.log_datasets(lineage_inputs(chal_cfg, fused))
        metric = cfg.promotion.metric or chal.primary_metric
        check_metric(metric, cfg.fuse.task)
        c_score = score_of(chal, cfg.promotion.method or chal_card["methods"][0], metric)
        _trained(c_score, chal_card)
        c_score.extra["flat_refit"] = flat_reason(chal_card)

        k_score, champ_card, unscored = None, None, None
        if champion is not None:
            try:
                k_score, champ_card = self._score_champion(champion, chal, metric,
                                                           chal_card.get("unit", "slide"))
            except ConfigError as e:
                if not force:
                    raise
                unscored = str(e)  # --force-promote replaces a champion that cannot be scored
        students = None
        if student is not None and champ_student is not None:
            students = self._score_students(champ_student, student[0])
        if unscored is not None:
            decision = Decision(True, f"--force-promote; the champion (version "
                                      f"{champion.version}) was not scored: {unscored}")
        else:
            decision = decide(cfg.promotion, c_score, k_score, force, students,
                              flat=flat_reason(chal_card))

        version = self._register(chal.model, digest, c_score, decision.promote)
        c_score.version = version.version
        student_version = student[2] if student else None
        if decision.promote:
            self.reg.promote(version, cfg.registry.alias)
            if student_version is not None:
                self.reg.promote(student_version, st.alias)
        promotion = {
            "run_id": self.run_id, "promoted": decision.promote,
            "decision": "promoted" if decision.promote else "kept", "reason": decision.reason,
            "forced": force, "metric": metric, "min_delta": cfg.promotion.min_delta,
            "delta": decision.delta, "folds": cfg.fuse.folds, "seed": cfg.fuse.seed,
            "registered_model": cfg.registry.fused_model, "alias": cfg.registry.alias,
            "challenger": {**c_score.to_dict(), "model": chal.model,
                           "encoders": sorted(chal_card["encoders"])},
            "champion": (None if champion is None else
                         {**(k_score.to_dict() if k_score else {}),
                          "version": champion.version,
                          "encoders": sorted((champ_card or {}).get("encoders", {}))}),
            "student": None if st is None else {
                "retrained": bool(st.retrain), "registered_model": st.registered_model,
                "champion": champ_student_name,
                "champion_version": student_champ.version if student_champ else None,
                "challenger": student[1] if student else None,
                "challenger_version": student_version.version if student_version else None,
                "promoted": bool(decision.promote and student_version is not None),
                "validation": students},
            "new_slides": new, "ingest": res.to_dict(), "run": self.url,
            "mlflow_run_id": self.tracker.run_id}
        promotion = _finite(promotion)  # NaN (a fold that could not be scored) -> null
        self._record(promotion, version)
        return promotion

    # ------------------------------------------------------------------ steps
    def _mlflow(self, own):
        return ing.nested_mlflow(self.stage_mlflow, own)

    def _champion(self) -> Version | None:
        """The champion fused model; the bootstrap folder registered first if there is none."""
        r = self.cfg.registry
        champion = self.reg.by_alias(r.fused_model, r.alias)
        if champion is None and r.bootstrap:
            if not storage.exists(storage.join(r.bootstrap, "card.json")):
                raise ConfigError(f"registry.bootstrap: {r.bootstrap} holds no card.json; point "
                                  "it at a fuse output's model/ folder, or unset it")
            champion = self.reg.register_fused(self.tracker, r.bootstrap, r.fused_model,
                                               r.alias, tags={f"{TAG}.bootstrap": r.bootstrap})
        return champion

    def _distill(self, champion_dir: str | None, res: ing.IngestResult):
        """Distil the challenger student, embed every slide with it; (folder, name, version)."""
        # lazy: imports torch, Ray Train and DeepSpeed (a recipe without a student never does)
        from fusedist.distill.train import run_distill

        st = self.cfg.student
        d = warm_start(st.distill, st.warm_start, champion_dir)
        export = d.export.model_copy(update={"registered_model": st.registered_model,
                                             "alias": "latest"})  # no alias: promotion moves it
        d = d.model_copy(update={"run_name": f"{d.run_name}-{self.run_id}", "export": export,
                                 "mlflow": self._mlflow(d.mlflow)})
        out = run_distill(d, progress=self.progress)
        if out.export_dir is None:
            raise ConfigError(f"student: distill run {out.run_url} exported nothing "
                              "(student.distill.export.enabled must be true)")
        card = storage.read_json(storage.join(out.export_dir, "card.json"))
        version = (self.reg.get(st.registered_model, out.model_version) if out.model_version
                   else self.reg.find(st.registered_model, "weights_sha256",
                                      card["weights_sha256"]))
        name = ing.embed_student(self.cfg, out.export_dir, self.stage_mlflow,
                                 "student.challenger", res, self.progress)
        return out.export_dir, name, version

    def _score_champion(self, champion: Version, chal, metric: str, unit: str
                        ) -> tuple[Score, dict]:
        folder = self._download(champion, "champion-model", FUSED_ARTIFACT)
        card = storage.read_json(storage.join(folder, "card.json"))
        if card.get("unit", "slide") != unit:  # per-slide and per-patient folds never match
            raise ConfigError(f"the champion (version {champion.version}) predicts "
                              f"{card.get('unit', 'slide')}s, the challenger {unit}s (the labels "
                              "or fuse.unit changed): they cannot be scored on the same folds; "
                              "run `fusedist retrain --force-promote` once to replace it")
        row = self.cfg.promotion.method or card["methods"][0]
        kcfg = champion_config(card, self.cfg.fuse, storage.join(self.url, "champion"), [row])
        kcfg = kcfg.model_copy(update={"mlflow": self._mlflow(kcfg.mlflow)})
        res = run_fuse(kcfg, progress=self.progress)
        check_same_folds(chal.output, res.output)
        score = score_of(res, row, metric)
        _trained(score, card)
        return score, card

    def _score_students(self, champion_dir: str, challenger_dir: str) -> dict:
        st = self.cfg.student
        return score_students(st.distill, {"champion": champion_dir,
                                           "challenger": challenger_dir}, st.validation_pairs)

    def _register(self, model: str, digest: str, score: Score, promote: bool) -> Version:
        name = self.cfg.registry.fused_model
        found = self.reg.find(name, RUN_TAG, self.run_id)  # a resumed run registered it
        if found is not None:
            return found
        return self.reg.register_fused(
            self.tracker, model, name, None,
            tags={RUN_TAG: self.run_id, DIGEST_TAG: digest,
                  f"{TAG}.{score.metric}": f"{score.mean:.6g}", f"{TAG}.method": score.method})

    def _record(self, promotion: dict, version: Version) -> None:
        text = json.dumps(promotion, indent=2, default=float)
        storage.write_text(storage.join(self.url, "promotion.json"), text)
        md = summary_md(promotion)
        storage.write_text(storage.join(self.url, "summary.md"), md)
        run = self.tracker
        run.log_dict(promotion, "promotion.json")
        run.log_text(md, "summary.md")
        champ = promotion["champion"] or {}
        run.set_tags({f"{TAG}.decision": promotion["decision"], f"{TAG}.reason":
                      promotion["reason"], f"{TAG}.challenger_version": version.version,
                      f"{TAG}.champion_version": champ.get("version") or "none",
                      f"{TAG}.new_slides": len(promotion["new_slides"])})
        metrics = {"challenger_" + promotion["metric"]: promotion["challenger"]["mean"],
                   "new_slides": len(promotion["new_slides"])}
        if champ.get("mean") is not None:
            metrics["champion_" + promotion["metric"]] = champ["mean"]
        if promotion["delta"] is not None:
            metrics["delta"] = promotion["delta"]
        run.log_metrics(metrics)
        self.reg.set_tags(version, {f"{TAG}.decision": promotion["decision"]})


def _trained(score: Score, card: dict) -> None:
    """What the model was fitted on: its slides, and its patients when samples are patients."""
    score.trained_slides = len(card["trained_slides"])
    if card.get("unit") == "patient":
        score.extra["trained_patients"] = card["trained_on"]["patients"]


def _finite(x):
    """``x`` with every non-finite float replaced by None (strict JSON, MLflow-safe)."""
    import math

    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def summary_md(p: dict) -> str:
    """The run summary (summary.md, the CLI's output)."""
    c, k, new = p["challenger"], p["champion"], p["new_slides"]
    listed = ", ".join(new[:10]) + (", ..." if len(new) > 10 else "")
    lines = [f"# retrain {p['run_id']}: {p['decision'].upper()}", "", p["reason"], "",
             f"New slides: {len(new)}" + (f" ({listed})" if new else ""), "",
             f"| model | version | method | trained slides | {p['metric']} (mean) | per fold |",
             "|---|---|---|---:|---:|---|"]

    def row(label: str, s: dict) -> str:
        folds = ", ".join("-" if v is None else f"{v:.4f}" for v in s.get("folds", []))
        mean = s.get("mean")
        patients = (f" ({s['trained_patients']} patients)" if s.get("trained_patients")
                    is not None else "")
        return (f"| {label} | {s.get('version') or '-'} | {s.get('method', '-')} | "
                f"{s.get('trained_slides', '-')}{patients} | "
                f"{'-' if mean is None else f'{mean:.4f}'} | {folds} |")

    lines.append(row("challenger", c))
    if k:
        lines.append(row("champion", k))
    lines += ["", f"{p['folds']} folds (seed {p['seed']}) on the current labelled cohort; "
              "the champion's recipe trains only on the slides it was trained on.",
              f"Registry: {p['registered_model']}@{p['alias']} -> version "
              f"{c['version'] if p['promoted'] else (k or {}).get('version')}"]
    s = p.get("student")
    if s:
        val = s.get("validation")
        lines += ["", f"Student ({s['registered_model']}): champion {s['champion']} "
                  f"(v{s['champion_version']})"
                  + (f", challenger {s['challenger']} (v{s['challenger_version']}), "
                     f"{'promoted' if s['promoted'] else 'not promoted'}" if s["retrained"]
                     else ", not retrained")]
        if val and val.get("delta") is not None:
            lines.append(f"Validation CKA to the teacher ({val['champion']['pairs']} pairs; "
                         f"{val['note']}): champion {val['champion']['cka']:.4f}, challenger "
                         f"{val['challenger']['cka']:.4f}")
        elif val:
            lines.append(f"Student validation: {val['note']}")
    failed = p["ingest"].get("failed") or []
    if failed:
        lines += ["", f"{len(failed)} ingest failure(s):"]
        lines += [f"- {f.get('stage')}: {f.get('slide_id') or f.get('name')}: {f.get('reason')}"
                  for f in failed[:20]]
    lines += ["", f"Run folder: {p['run']}", ""]
    return "\n".join(lines)
