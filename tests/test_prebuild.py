"""``python -m fusedist.distill.prebuild`` (run by ``make venv``): the DeepSpeed op a CPU
``deepspeed.initialize`` loads is in torch's extension cache afterwards, so no training run
compiles it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_prebuild_leaves_the_shm_op_compiled_in_the_extension_cache():
    from torch.utils.cpp_extension import _get_build_directory

    from fusedist.distill.prebuild import prebuild_ops

    assert prebuild_ops() == ["deepspeed.ops.comm.deepspeed_shm_comm_op"]  # built or cached
    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    assert (built / "deepspeed_shm_comm.so").is_file()
    # A new process (what a training worker is) finds it: nothing is recompiled (ninja logs
    # one line per compile and link).
    log = (built / ".ninja_log").read_text()
    again = subprocess.run([sys.executable, "-m", "fusedist.distill.prebuild"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "deepspeed_shm_comm_op" in again.stdout, again.stderr
    assert (built / ".ninja_log").read_text() == log
