#!/usr/bin/env bash
# Wheel check (CI): build a wheel with the documented command against the torch of .venv,
# install it into a fresh virtualenv that has the same torch (and nothing of this checkout),
# and smoke-test it there: the extension loads with its CPU kernels, an op runs, `dmmd --help`
# works, and a missing optional dependency is one line naming the pip extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")

start=$(date +%s)
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" . > "$WORK/wheel.log" 2>&1 \
  || { tail -n 40 "$WORK/wheel.log"; exit 1; }
echo "wheel_check: built $(ls "$WORK/dist") in $(( $(date +%s) - start ))s"

python3 -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install -q "torch==$TORCH" > "$WORK/pip.log" 2>&1 || { tail -n 20 "$WORK/pip.log"; exit 1; }
"$V" -m pip install -q "$WORK"/dist/*.whl > "$WORK/pip.log" 2>&1 || { tail -n 20 "$WORK/pip.log"; exit 1; }
[ "$("$V" -c "import torch; print(torch.__version__.split('+')[0])")" = "$TORCH" ] \
  || { echo "wheel_check: installing the wheel changed torch" >&2; exit 1; }

cd "$WORK"  # nothing of the checkout on the path
"$V" - <<'PY'
import torch

import dmmd_ops

assert dmmd_ops.EXTENSION_LOADED and dmmd_ops.has_kernel("generator_loss_forward", "cpu"), "no CPU kernels"
u, a, b = (torch.randn(4, 50257) for _ in range(3))
loss = dmmd_ops.generator_loss(u.requires_grad_(), a, b, top_p=0.9)
loss.backward()
torch.testing.assert_close(loss.double(), dmmd_ops.reference.generator_loss(u.double(), a, b, top_p=0.9),
                           rtol=1e-4, atol=1e-4)
print("wheel_check: the installed wheel's kernels match the reference")
PY
"$WORK/venv/bin/dmmd" --help > /dev/null
set +e
err=$("$WORK/venv/bin/dmmd" reference train --steps 1 --out "$WORK/ref" 2>&1)
rc=$?
set -e
[ "$rc" = 2 ] && [ "$(echo "$err" | wc -l)" = 1 ] && echo "$err" | grep -q "pip install 'dmmd\[metrics\]'" \
  || { echo "wheel_check: a missing extra was not one line naming it (rc $rc): $err" >&2; exit 1; }
echo "wheel_check: OK ($err)"
