#!/usr/bin/env bash
# CUDA build check (CI, no GPU needed): build dmmd_ops._C with the CUDA 13.0 torch in its own
# virtualenv and build directory, import it, and fail unless every op that csrc/cuda/
# implements is registered for the CUDA dispatch key. Any .cu that fails to compile or link
# fails the build, and so this script; so does any kernel that spills or is over the register
# budget (scripts/ptxas_report.py, which prints every kernel's resources and occupancy).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CUDA_VENV:-.venv-cuda}
TORCH_CUDA_VERSION=${TORCH_CUDA_VERSION:-2.14.1}
BUILD=${CUDA_BUILD_DIR:-build-cuda}

command -v nvcc >/dev/null || { echo "cuda_build_check: nvcc not on PATH" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_CUDA_VERSION"
fi
"$VENV/bin/python" -m pip install -q ninja numpy setuptools wheel

# The nvcc on the PATH may be a wrapper script: ask nvcc itself where the toolkit is.
CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
[ -d "$CUDA_HOME" ] && CUDA_HOME=$(readlink -f "$CUDA_HOME") || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CUDA_HOME CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS=${MAX_JOBS:-2}
echo "cuda_build_check: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

start=$(date +%s)
# No objects kept: every file compiles, so ptxas reports every kernel (kept in $BUILD/build.log)
rm -rf "$BUILD"/temp.*
mkdir -p "$BUILD"
DMMD_FORCE_CUDA=1 DMMD_PTXAS_VERBOSE=1 "$VENV/bin/python" setup.py -q build --build-base "$BUILD" \
  > "$BUILD/build.log" 2>&1 || true
grep -v -E "Warning|warn\(|^\s*$|!!|\*\*\*|ptxas info|bytes stack frame" "$BUILD/build.log" || true
LIB=$(ls -d "$BUILD"/lib.* | head -n1)
[ -f "$LIB"/dmmd_ops/_C*.so ] || { echo "cuda_build_check: the extension did not build" >&2; exit 1; }
echo "cuda_build_check: built in $(( $(date +%s) - start ))s"
# Resource budgets: no spills, registers within budget; prints registers and occupancy per kernel.
python3 scripts/ptxas_report.py "$BUILD/build.log"

cd "$LIB"
PYTHONPATH="$PWD" "$OLDPWD/$VENV/bin/python" "$OLDPWD/scripts/check_cuda_registration.py" "$OLDPWD/csrc/cuda"
