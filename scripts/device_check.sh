#!/usr/bin/env bash
# One-shot GPU check, for a fresh GPU machine with torch (CUDA), nvcc, ninja, pytest and
# pytest-benchmark installed and no network: build dmmd_ops for the local GPU with all cores,
# run the CUDA tests of the ops, and write what happened under $OUT (./device_results when
# unset): build log, build report, test results (JUnit XML + text) and a summary table,
# printed last. GPU benchmarks join this script with the CUDA row kernels (issue 4).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
start=$(date +%s)

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo 9.0)}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  [ -d "$CUDA_HOME" ] || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_HOME
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

DMMD_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - start ))
"$PY" -m dmmd_ops.info > "$OUT/info.json" 2>&1 || true

# Only the op tests: the dmmd package's tests need tqdm / safetensors, which may be missing here.
"$PY" -m pytest -q -m cuda tests/test_philox.py tests/test_kernels.py tests/test_custom_ops.py \
  -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" > "$OUT/cuda_tests.txt" 2>&1
test_rc=$?

"$PY" - "$OUT" "$build_rc" "$build_s" "$test_rc" <<'PYEOF'
import json, re, sys
out, build_rc, build_s, test_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gpu = open(f"{out}/gpu.txt").read().strip()
tail = open(f"{out}/cuda_tests.txt").read().strip().splitlines()
summary = next((line for line in reversed(tail) if re.search(r"passed|failed|error|skipped|no tests", line)), "?")
result = {"gpu": gpu, "build_rc": build_rc, "build_s": build_s, "cuda_tests_rc": test_rc, "cuda_tests": summary}
json.dump(result, open(f"{out}/device_check.json", "w"), indent=1)
table = "| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in result.items())
open(f"{out}/device_check.md", "w").write(table + "\n")
print(table)
PYEOF
[ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
