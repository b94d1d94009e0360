#!/usr/bin/env bash
# The CUDA kernels' check, in one go on a machine with an NVIDIA GPU (never part of CI): build kswap._C with
# CUDA for this GPU, run the op's parity tests on cuda (forward, gradients, gradcheck in float64, against the
# grid_sample reference), then bench/msda.py on cuda (against mmcv's CUDA op where mmcv was built with it).
# Results go to $OUT (default bench/results): gpu_tests.txt and msda_cuda.json.
#
# Usage: scripts/gpu_check.sh   (after `make install`; PY=... picks another interpreter)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/bench/results}
mkdir -p "$OUT"
cd "$ROOT"

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export TORCH_CUDA_ARCH_LIST
echo "[gpu_check] building kswap._C with CUDA (arch $TORCH_CUDA_ARCH_LIST)"
MAX_JOBS=${MAX_JOBS:-8} KSWAP_BUILD_CUDA=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
"$PY" -c "from kswap import _C; assert _C.with_cuda(), 'kswap._C was built without CUDA (is CUDA_HOME set?)'"

status=0
"$PY" -m pytest -q -rs tests/core/test_ops.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=$?
# every cuda case must have run: a skip here means the CUDA path was not exercised
if grep -q "SKIPPED.*cuda" "$OUT/gpu_tests.txt"; then echo "[gpu_check] cuda tests were skipped" >&2; status=1; fi
"$PY" bench/msda.py --device cuda --note "scripts/gpu_check.sh on $("$PY" -c "import torch; print(torch.cuda.get_device_name())")" \
  --out "$OUT/msda_cuda.json" || status=$?
exit $status
