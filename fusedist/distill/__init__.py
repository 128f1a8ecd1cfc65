"""XMAG distillation: losses, paired augmentation, EMA, LR schedules, export.

Kept import-light on purpose: the Ray Train + DeepSpeed runtime (``fusedist.distill.train``)
is imported only by whoever runs training, never as a side effect of importing this package.
"""
