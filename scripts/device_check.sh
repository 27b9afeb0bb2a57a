#!/usr/bin/env bash
# One-shot GPU check, for a fresh GPU machine with torch (CUDA), nvcc, ninja, pytest and
# pytest-benchmark installed and no network (numpy comes from ./.whl when it is missing there):
#   1. build dmmd_ops for the local GPU's architecture with all cores,
#   2. run every CUDA test (pytest -m cuda: the ops against the reference and the CPU kernels,
#      CPU-identical draws, sampler statistics, opcheck, torch.compile, CUDA graphs, 2^32 rows),
#   3. run compute-sanitizer's memcheck, racecheck, synccheck and initcheck over every kernel
#      (scripts/sanitizer_probe.py: small awkward shapes; our kernels instrumented only), each
#      capped at DMMD_SANITIZER_SECONDS (default 45),
#   4. run the GPU benchmarks: first the cases the targets name (32768 x 50257), then the rest
#      of the grid while time remains,
# and write what happened under $OUT (./device_results when unset): device_check.json and
# device_check.md (tests, sanitizer findings and the benchmark table; printed last) and
# logs.tar.gz (every log). Finishes within 8 minutes (DMMD_CHECK_SECONDS, default 470).
# `--dry-run` prints the sanitizer command lines and exits (runs anywhere, no GPU needed).
# 3b. runs three FSDP distillation steps on the GPU (NCCL) and prints the memory plan against the
# measured peak (fsdp.txt).
# DMMD_CHECK_SKIP="tests sanitizer fsdp bench" leaves out any of those steps (a rerun that checks one fix).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SAN_SECONDS=${DMMD_SANITIZER_SECONDS:-45}
SAN_TOOLS="memcheck racecheck synccheck initcheck"
# Only kernels whose names hold "dmmd" (our namespace) are instrumented, torch's are not ours;
# except under initcheck, which then misses what torch's kernels write and reports their outputs
# (our kernels' inputs) as uninitialised: two such false reports on the first H200 run.
san_cmd() {
  local only="--kernel-name kns=dmmd"
  [ "$1" = initcheck ] && only=""
  echo "env PYTHONPATH=$PWD compute-sanitizer --tool $1 $only --error-exitcode 9 --print-limit 20 $PY scripts/sanitizer_probe.py"
}
if [ "${1:-}" = "--dry-run" ]; then
  for tool in $SAN_TOOLS; do echo "timeout $SAN_SECONDS $(san_cmd "$tool")"; done
  exit 0
fi
OUT=${OUT:-./device_results}
mkdir -p "$OUT"
# At most a handful of files come back from a lent machine: logs go to LOGS, packed at the end.
LOGS=$(mktemp -d)
BUDGET=${DMMD_CHECK_SECONDS:-470}
skipped() { [[ " ${DMMD_CHECK_SKIP:-} " == *" $1 "* ]]; }
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# Seconds for a step: what the budget leaves after `reserve`, never below `floor` (the tests
# run even when a slow build ate the budget; the benchmarks are what gives way).
allot() { local s=$(( $(left) - $1 )); [ "$s" -lt "$2" ] && s=$2; echo "$s"; }
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$LOGS/gpu.txt" 2>&1 || true
if ! "$PY" -c "import numpy" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --find-links .whl numpy > "$LOGS/pip.log" 2>&1 || true
fi
"$PY" -c "import importlib.util as u; print({m: bool(u.find_spec(m)) for m in ('numpy', 'pytest_benchmark', 'ninja')})" \
  > "$LOGS/modules.txt" 2>&1

# 1. Build.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo 9.0)}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  [ -d "$CUDA_HOME" ] || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_HOME
fi
DMMD_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > "$LOGS/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - start ))
"$PY" -m dmmd_ops.info > "$LOGS/info.json" 2>&1 || true
echo "build rc=$build_rc in ${build_s}s"

# 2. CUDA tests (every test marked cuda: the ops' files).
tests_start=$(date +%s)
# A hung kernel must not eat the whole budget: pytest-timeout (where installed) ends that test.
per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=120)
if skipped tests; then
  echo "skipped (DMMD_CHECK_SKIP)" > "$LOGS/cuda_tests.txt"; test_rc=0
else
  timeout "$(allot $(( 150 + 4 * SAN_SECONDS )) 180)" "$PY" -m pytest -q -m cuda -p no:cacheprovider --durations=10 \
    "${per_test[@]}" tests/test_cuda.py tests/test_kernels.py tests/test_philox.py tests/test_samplers.py \
    tests/test_losses.py tests/test_grad_gram.py \
    --junitxml="$LOGS/cuda_tests.xml" > "$LOGS/cuda_tests.txt" 2>&1
  test_rc=$?
fi
tests_s=$(( $(date +%s) - tests_start ))
tail -n 30 "$LOGS/cuda_tests.txt"

# 3. compute-sanitizer over every kernel (skipped where the toolkit has none).
san_start=$(date +%s)
: > "$LOGS/sanitizer.txt"
for tool in $SAN_TOOLS; do
  if skipped sanitizer; then echo "$tool: skipped (DMMD_CHECK_SKIP)" >> "$LOGS/sanitizer.txt"; continue; fi
  if ! command -v compute-sanitizer >/dev/null; then echo "$tool: no compute-sanitizer" >> "$LOGS/sanitizer.txt"; continue; fi
  timeout "$SAN_SECONDS" $(san_cmd "$tool") > "$LOGS/sanitizer_$tool.log" 2>&1
  rc=$?
  echo "$tool: rc=$rc $(grep -E '^========= (ERROR SUMMARY|RACECHECK SUMMARY)' "$LOGS/sanitizer_$tool.log" | tr '\n' ' ')" >> "$LOGS/sanitizer.txt"
done
san_s=$(( $(date +%s) - san_start ))
cat "$LOGS/sanitizer.txt"

# 3b. FSDP on this one GPU (NCCL, a group of one): a teacher of 8 blocks of width 1024, three
# sharded distillation steps, the memory plan against torch.cuda.max_memory_allocated.
if skipped fsdp; then
  echo "skipped (DMMD_CHECK_SKIP)" > "$LOGS/fsdp.txt"
else
  FS=$(mktemp -d)
  timeout 120 bash -c "$PY -m dmmd train-teacher --data markov --vocab-size 512 --length 256 --width 1024 --depth 8 \
      --heads 8 --batch-size 8 --steps 1 --warmup 1 --eval-every 0 --save-every 1 --device cuda --no-progress \
      --out $FS/teacher > $LOGS/fsdp.txt 2>&1 && $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
      -m dmmd distill --teacher $FS/teacher/checkpoint --parallel fsdp --device cuda --batch-size 8 --steps 3 \
      --warmup 1 --save-every 3 --no-progress --out $FS/student >> $LOGS/fsdp.txt 2>&1"
  echo "fsdp rc=$?" >> "$LOGS/fsdp.txt"
fi
tail -n 3 "$LOGS/fsdp.txt"

# 4. GPU benchmarks: the target cases first, then the rest of the grid while time remains.
export DMMD_BENCH_GPU_LOG="$LOGS/gpu_bench.jsonl"
: > "$DMMD_BENCH_GPU_LOG"
bench() {
  skipped bench && { echo "skipped (DMMD_CHECK_SKIP): $*" >> "$LOGS/gpu_bench.txt"; return 0; }
  local secs=$(( $(left) - 10 ))
  [ "$secs" -gt 30 ] || { echo "no time left for: $*" >> "$LOGS/gpu_bench.txt"; return 0; }
  timeout "$secs" "$PY" -m pytest -q -p no:cacheprovider bench/bench_gpu.py "$@" >> "$LOGS/gpu_bench.txt" 2>&1
}
# The nucleus ops run staged and unstaged (impl dmmd_unstaged: DMMD_ROW_STAGING=0) side by side.
DMMD_BENCH_GPU_SIZES=32768x50257 bench -k "(generator_loss or denoise_step) and not linear"
DMMD_BENCH_GPU_SIZES=32768x50257,32768x131072 bench -k "teacher_logprobs or sample_categorical"
DMMD_BENCH_GPU_SIZES=4096x32768,4096x50257,32768x131072,4096x131072,32768x32768 \
  bench -k "(generator_loss or denoise_step) and not linear"
DMMD_BENCH_GPU_SIZES=4096x50257,4096x1031 bench -k "teacher_logprobs or sample_categorical"
bench -k "linear_generator_loss"   # 32768 rows x d 4096 x V 128256: unfused, fused, Liger's fused CE

"$PY" - "$OUT" "$LOGS" "$build_rc" "$build_s" "$test_rc" "$tests_s" "$san_s" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, re, subprocess, sys
out, logs, build_rc, build_s, test_rc, tests_s, san_s, total_s = *sys.argv[1:3], *map(int, sys.argv[3:])
gpu = open(f"{logs}/gpu.txt").read().strip()
lines = open(f"{logs}/cuda_tests.txt").read().strip().splitlines()
summary = next((l for l in reversed(lines) if re.search(r"passed|failed|error|skipped|no tests", l)), "?")
failed = [l for l in lines if l.startswith("FAILED") or l.startswith("ERROR")]
table = subprocess.run([sys.executable, "bench/report.py", "--gpu", f"{logs}/gpu_bench.jsonl"],
                       capture_output=True, text=True).stdout
sanitizer = open(f"{logs}/sanitizer.txt").read().strip().splitlines()
findings = {}  # the sanitizer's own report lines (errors, hazards), per tool
for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
    try:
        text = open(f"{logs}/sanitizer_{tool}.log").read().splitlines()
    except FileNotFoundError:
        continue
    findings[tool] = [l for l in text if l.startswith("=========")][:60]
result = {"gpu": gpu, "build_rc": build_rc, "build_s": build_s, "cuda_tests_rc": test_rc,
          "cuda_tests_s": tests_s, "cuda_tests": summary, "failed": failed[:40], "sanitizer_s": san_s,
          "sanitizer": sanitizer, "sanitizer_findings": findings, "total_s": total_s,
          "fsdp": open(f"{logs}/fsdp.txt").read().strip().splitlines()[-3:],
          "benchmarks": [json.loads(l) for l in open(f"{logs}/gpu_bench.jsonl") if l.strip()]}
json.dump(result, open(f"{out}/device_check.json", "w"), indent=1)
head = "| check | result |\n|---|---|\n" + "\n".join(
    f"| {k} | {result[k]} |" for k in ("gpu", "build_rc", "build_s", "cuda_tests_rc", "cuda_tests_s", "cuda_tests",
                                       "sanitizer_s", "sanitizer", "fsdp", "total_s"))
md = head + "\n\n" + ("\n".join(failed[:40]) + "\n\n" if failed else "") + table
open(f"{out}/device_check.md", "w").write(md)
print(md)
PYEOF
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
[ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
