"""``fusedist retrain``: the scheduled retraining job (ingest, refit, evaluate, gate)."""

from fusedist.retrain.config import RetrainConfig

__all__ = ["RetrainConfig", "run_retrain"]


def __getattr__(name: str):
    if name == "run_retrain":  # the job imports the stages (torch, Ray) only when it runs
        from fusedist.retrain.job import run_retrain

        return run_retrain
    raise AttributeError(name)
