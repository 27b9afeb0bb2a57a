#!/usr/bin/env bash
# One-shot GPU check, for a fresh GPU machine with torch (CUDA), nvcc, ninja, pytest and
# pytest-benchmark installed and no network (numpy comes from ./.whl when it is missing there):
#   1. build dmmd_ops for the local GPU's architecture with all cores,
#   2. run every CUDA test (pytest -m cuda: the ops against the reference and the CPU kernels,
#      CPU-identical draws, sampler statistics, opcheck, torch.compile, CUDA graphs, 2^32 rows),
#   3. run the GPU benchmarks: first the cases the targets name (32768 x 50257), then the rest
#      of the grid while time remains,
# and write what happened under $OUT (./device_results when unset): logs, device_check.json
# and device_check.md (tests summary and the benchmark table), printed last. Finishes within
# 8 minutes (DMMD_CHECK_SECONDS, default 470).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${DMMD_CHECK_SECONDS:-470}
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# Seconds for a step: what the budget leaves after `reserve`, never below `floor` (the tests
# run even when a slow build ate the budget; the benchmarks are what gives way).
allot() { local s=$(( $(left) - $1 )); [ "$s" -lt "$2" ] && s=$2; echo "$s"; }
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
if ! "$PY" -c "import numpy" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --find-links .whl numpy > "$OUT/pip.log" 2>&1 || true
fi
"$PY" -c "import importlib.util as u; print({m: bool(u.find_spec(m)) for m in ('numpy', 'pytest_benchmark', 'ninja')})" \
  > "$OUT/modules.txt" 2>&1

# 1. Build.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo 9.0)}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  [ -d "$CUDA_HOME" ] || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_HOME
fi
DMMD_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - start ))
"$PY" -m dmmd_ops.info > "$OUT/info.json" 2>&1 || true
echo "build rc=$build_rc in ${build_s}s"

# 2. CUDA tests (the op tests only: the dmmd package's tests need tqdm / safetensors).
tests_start=$(date +%s)
timeout "$(allot 150 180)" "$PY" -m pytest -q -m cuda -p no:cacheprovider --durations=5 \
  tests/test_cuda.py tests/test_philox.py tests/test_samplers.py tests/test_losses.py tests/test_grad_gram.py \
  --junitxml="$OUT/cuda_tests.xml" > "$OUT/cuda_tests.txt" 2>&1
test_rc=$?
tests_s=$(( $(date +%s) - tests_start ))
tail -n 30 "$OUT/cuda_tests.txt"

# 3. GPU benchmarks: the target cases first, then the rest of the grid while time remains.
export DMMD_BENCH_GPU_LOG="$OUT/gpu_bench.jsonl"
: > "$DMMD_BENCH_GPU_LOG"
bench() {
  local secs=$(( $(left) - 10 ))
  [ "$secs" -gt 30 ] || { echo "no time left for: $*" >> "$OUT/gpu_bench.txt"; return 0; }
  timeout "$secs" "$PY" -m pytest -q -p no:cacheprovider bench/bench_gpu.py "$@" >> "$OUT/gpu_bench.txt" 2>&1
}
DMMD_BENCH_GPU_SIZES=32768x50257 bench -k "generator_loss or denoise_step"
DMMD_BENCH_GPU_SIZES=4096x32768,4096x50257,32768x131072,4096x131072,32768x32768 \
  bench -k "generator_loss or denoise_step"
DMMD_BENCH_GPU_SIZES=32768x50257,4096x50257 bench -k "teacher_logprobs or sample_categorical"

"$PY" - "$OUT" "$build_rc" "$build_s" "$test_rc" "$tests_s" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, re, subprocess, sys
out, build_rc, build_s, test_rc, tests_s, total_s = sys.argv[1], *map(int, sys.argv[2:])
gpu = open(f"{out}/gpu.txt").read().strip()
lines = open(f"{out}/cuda_tests.txt").read().strip().splitlines()
summary = next((l for l in reversed(lines) if re.search(r"passed|failed|error|skipped|no tests", l)), "?")
failed = [l for l in lines if l.startswith("FAILED") or l.startswith("ERROR")]
table = subprocess.run([sys.executable, "bench/report.py", "--gpu", f"{out}/gpu_bench.jsonl"],
                       capture_output=True, text=True).stdout
result = {"gpu": gpu, "build_rc": build_rc, "build_s": build_s, "cuda_tests_rc": test_rc,
          "cuda_tests_s": tests_s, "cuda_tests": summary, "failed": failed[:40], "total_s": total_s,
          "benchmarks": [json.loads(l) for l in open(f"{out}/gpu_bench.jsonl") if l.strip()]}
json.dump(result, open(f"{out}/device_check.json", "w"), indent=1)
head = "| check | result |\n|---|---|\n" + "\n".join(
    f"| {k} | {result[k]} |" for k in ("gpu", "build_rc", "build_s", "cuda_tests_rc", "cuda_tests_s", "cuda_tests",
                                       "total_s"))
md = head + "\n\n" + ("\n".join(failed[:40]) + "\n\n" if failed else "") + table
open(f"{out}/device_check.md", "w").write(md)
print(md)
PYEOF
[ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
