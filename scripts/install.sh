#!/usr/bin/env bash
# Offline, cached install of kswap and every host stack into .venv (the route CI and `make install` use).
#
# End users install the hosts the upstream way (see README.md). This recipe exists because PyPI has no
# mmcv 2.x wheels and no detectron2 at all: both are built here from sdists, once, and the wheels are kept
# under $KSWAP_WHEEL_CACHE (default ~/.cache/kswap/wheels). Every step checks what is already installed
# and does nothing when it is right, so a second run takes seconds.
#
# Usage: scripts/install.sh [all|timm]   (timm: skip mmengine/mmcv/mmdet/detectron2; default: all)
set -euo pipefail
PROFILE=${1:-all}
case "$PROFILE" in all|timm) ;; *) echo "usage: $0 [all|timm]" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${KSWAP_VENV:-$ROOT/.venv}
WHEELS=${KSWAP_WHEEL_CACHE:-$HOME/.cache/kswap/wheels}
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check -q)

# pip 25+ refuses pb1-detectron2's sdist metadata (a direct-URL extra); 24.3.1 reads it.
PIP_PIN="pip==24.3.1"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
BUILD_PINS=("setuptools>=77.0.3,<81" wheel)
TIMM_PINS=(timm==1.0.31 peft==0.21.2 pluggy==1.7.0 wandb==0.31.0)
# fairscale: the activation checkpointing of DINO's encoder (num_cp), which the DDP test runs.
OPENMMLAB_PINS=(pycocotools==2.0.11 mmengine==0.10.7 mmdet==3.3.0 fairscale==0.4.13)
TOOL_PINS=(scikit-learn matplotlib pyyaml tqdm pytest ninja ruff)
MMCV=mmcv==2.1.0
# The patched build carries a local version label (scripts/patch_detectron2_sdist.py VERSION).
DETECTRON2=pb1-detectron2==0.6+kswap.2
DETECTRON2_SDIST=pb1-detectron2==0.6

log() { printf '[install] %s\n' "$*"; }

# Print the requirements in "$@" that the venv does not satisfy (empty when all are met).
missing() {
  "$PY" - "$@" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version

from pip._vendor.packaging.requirements import Requirement  # a fresh venv has pip, not packaging

for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        ok = req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(spec)
PYEOF
}

# Install those of "$@" that are missing; extra pip flags go before a literal "--".
ensure() {
  local flags=()
  while [ "$1" != "--" ]; do flags+=("$1"); shift; done; shift
  local out need
  out=$(missing "$@")  # a failing check stops the script (set -e) instead of reading as "nothing missing"
  mapfile -t need <<< "$out"
  [ -n "$out" ] || need=()
  if [ ${#need[@]} -gt 0 ]; then
    log "pip install ${need[*]}"
    "${PIP[@]}" install "${flags[@]}" "${need[@]}"
  fi
}

# Build a wheel from a patched sdist once, keep it in $WHEELS, install it without touching other packages.
# Args: the installed requirement (name==version), the wheel name, the patch command, the sdist to fetch.
ensure_built() {
  local req=$1 name=$2 patch=$3 sdist=${4:-$1} out
  out=$(missing "$req")
  [ -z "$out" ] && return 0
  mkdir -p "$WHEELS"
  local wheel
  wheel=$(ls "$WHEELS"/${name}-${req##*==}-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    local work
    work=$(mktemp -d)
    log "building $req from its sdist (once; cached in $WHEELS)"
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$work" "$sdist"
    tar xzf "$work"/*.tar.gz -C "$work"
    local src
    src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
    $patch "$src"
    MAX_JOBS=${MAX_JOBS:-2} CFLAGS="-O3 -g0 -DNDEBUG" "${PIP[@]}" wheel --no-deps --no-build-isolation -w "$WHEELS" "$src"
    rm -rf "$work"
    wheel=$(ls "$WHEELS"/${name}-${req##*==}-*.whl | head -n1)
  fi
  log "installing $(basename "$wheel")"
  "${PIP[@]}" install --no-deps "$wheel"
}

patch_mmcv() {
  # torch 2.14 headers need C++20; build the CPU ops only.
  sed -i 's/-std=c++1[47]/-std=c++20/g' "$1/setup.py"
  export MMCV_WITH_OPS=1 FORCE_CUDA=0
}
patch_detectron2() { "$PY" "$ROOT/scripts/patch_detectron2_sdist.py" "$1"; }

[ -x "$PY" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
ensure -- "$PIP_PIN" "${BUILD_PINS[@]}"
ensure -- "${TORCH_PINS[@]}"
ensure -- "${TIMM_PINS[@]}" "${TOOL_PINS[@]}"
if [ "$PROFILE" = all ]; then
  ensure -- "${OPENMMLAB_PINS[@]}"
  ensure_built "$MMCV" mmcv patch_mmcv
  # detectron2's own requirements come from PyPI; the package itself from the cached wheel.
  ensure -- "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "yacs>=0.1.8" "omegaconf>=2.1" "hydra-core>=1.1" \
    tabulate tensorboard cloudpickle termcolor pydot future
  ensure_built "$DETECTRON2" pb1_detectron2 patch_detectron2 "$DETECTRON2_SDIST"
fi

# Reinstall kswap (and rebuild kswap._C) only when its build inputs changed.
stamp="$VENV/.kswap-build.sha256"
build_hash=$(cd "$ROOT" && { cat pyproject.toml setup.py $(find csrc -type f | sort)
  echo "ext=${KSWAP_BUILD_EXT:-1} cuda=${KSWAP_BUILD_CUDA:-1}"; } | sha256sum | cut -d" " -f1)
if [ "$build_hash" != "$(cat "$stamp" 2>/dev/null)" ] || ! "$PY" -c "import kswap" 2>/dev/null; then
  log "installing kswap (editable; compiles kswap._C)"
  # torch finds nvcc on PATH but not the toolkit root this machine keeps it in.
  if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && command -v nvcc >/dev/null; then export CUDA_HOME=/usr/local/cuda; fi
  MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
  echo "$build_hash" > "$stamp"
fi
log "ready: $VENV"
