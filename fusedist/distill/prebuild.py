"""Build, once at install time, the DeepSpeed op that ``deepspeed.initialize`` would otherwise
JIT-compile inside the first training run.

On a CPU accelerator DeepSpeed's comm backend loads its shared-memory all-reduce
(``ShareMemCommBuilder``, C++ through torch's cpp_extension) in every worker's
``deepspeed.initialize``. The first load compiles it: 40-60 s on 2 cores, with the other ranks
waiting on the build lock, paid by the first ``distill`` after every fresh install (every CI
run, every new laptop venv). Compiled here, it lands in torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and later loads take well
under a second. GPU accelerators have no such op: nothing is built there.

``python -m fusedist.distill.prebuild`` (``make venv`` runs it).
"""

from __future__ import annotations

import sys
import time


def prebuild_ops() -> list[str]:
    """Compile (or find cached) the JIT ops DeepSpeed loads at init here; returns their names."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    built = []
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    # The same test DeepSpeed's comm backend applies before it loads the op (comm/torch.py).
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
        built.append(builder.absolute_name())
    return built


def main() -> int:
    t = time.perf_counter()
    try:
        names = prebuild_ops()
    except Exception as e:  # noqa: BLE001 - the op is an optimisation; training still works
        print(f"fusedist: DeepSpeed op prebuild failed ({type(e).__name__}: {e}); the first "
              "distill run will try to build it again (a C++ compiler is needed for the CPU "
              "shared-memory all-reduce)", file=sys.stderr)
        return 0
    print(f"fusedist: DeepSpeed ops ready in {time.perf_counter() - t:.1f} s: "
          f"{', '.join(names) or 'none needed on this accelerator'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
