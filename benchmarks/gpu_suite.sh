#!/usr/bin/env bash
# Every GPU figure docs/benchmarks.md owes, in one run on one H100/H200 (about 8 minutes).
#
# On the device machine (torch + timm only), carry the missing packages as wheels first, as
# the device README says (ray, deepspeed, webdataset, openslide-python, safetensors, ...):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME
# then run, from the repository root:
#   bash benchmarks/gpu_suite.sh            # figures to stdout and to $OUT (or ./gpu-suite)
# Each benchmark prints its own reference measured in the same run (model-only forward, plain
# compiled torch step), so the ratios hold whatever the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-suite}"
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

step() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  echo; echo "== $name"
  if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "!! $name failed or ran past ${limit}s (log: $OUT/$name.log)"
  fi
}

# 1. cache: UNI- and UNI2-h-sized random-weight teachers, end to end vs model-only.
step cache_uni 150 "$PY" benchmarks/cache_throughput.py --teachers uni --weights random \
  --batch-size 512 --slides 4 --size 16000 --seconds 10
step cache_uni2h 150 "$PY" benchmarks/cache_throughput.py --teachers uni2-h --weights random \
  --batch-size 512 --slides 4 --size 16000 --seconds 10
# 2. XMAG student step: ViT-B/14 under DeepSpeed (ZeRO-2, bf16) vs plain compiled torch.
step student_vitb14 150 "$PY" benchmarks/student_throughput.py --student dinov2-vitb14 \
  --teacher-dim 1536 --batch 48 --bf16 --zero 2 --ds-compile --seconds 30
# 3. 5x embedding: WSIs/min with a ViT-B/14-sized student through the engine.
step embed_5x 120 "$PY" benchmarks/engine_throughput.py --encoder dinov2-vitb14 --slides 4 \
  --size 16000 --batch-size 256 --seconds 10
echo; echo "logs in $OUT/"
