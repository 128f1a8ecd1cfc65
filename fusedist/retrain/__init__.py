"""``fusedist retrain``: the scheduled retraining job (ingest, refit, evaluate, gate)."""

from fusedist.retrain.config import RetrainConfig
from fusedist.retrain.job import run_retrain

__all__ = ["RetrainConfig", "run_retrain"]
