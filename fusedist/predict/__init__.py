"""``fusedist predict``: apply a fused model to new slides (their bags, or the slides
themselves, tiled and embedded first as the model's card records).

- ``config``: :class:`PredictConfig` (and ``SlideEncoder``, what ``--slides`` overrides per
  encoder);
- ``slides``: tile and embed ``--slides`` into bags the way the model's training bags were made;
- ``run``: :func:`check` (before torch and Ray load) and :func:`run_predict`.

Turning a slide's bags into the model's inputs and the prediction columns belong to the
fused model (:mod:`fusedist.fusion.model`), shared with its pyfunc model.
"""

from fusedist.predict.config import PredictConfig, SlideEncoder
from fusedist.predict.run import check, run_predict

__all__ = ["PredictConfig", "SlideEncoder", "check", "run_predict"]
