"""Fail unless every op implemented in csrc/cuda/ is registered for the CUDA dispatch key.

Run from the directory that holds the CUDA build of dmmd_ops; needs no GPU.
Usage: python check_cuda_registration.py <csrc/cuda>
"""
from __future__ import annotations

import glob
import os
import re
import sys

import torch


def cuda_ops(cuda_dir: str) -> set[str]:
    """Op names registered by `m.impl("name", ...)` in the CUDA sources."""
    names: set[str] = set()
    for path in glob.glob(os.path.join(cuda_dir, "*.cu")):
        with open(path) as f:
            names.update(re.findall(r'm\.impl\(\s*"([a-z0-9_]+)"', f.read()))
    return names


def main() -> int:
    import dmmd_ops
    from dmmd_ops.info import build_info

    info = build_info()
    if not info["extension_loaded"]:
        print(f"FAIL: dmmd_ops._C did not load: {info['extension_error']}")
        return 1
    if not info["built"].get("with_cuda"):
        print("FAIL: the extension was built without CUDA")
        return 1
    expected = cuda_ops(sys.argv[1])
    if not expected:
        print("FAIL: no CUDA op implementations found in", sys.argv[1])
        return 1
    missing = sorted(op for op in expected if not dmmd_ops.has_kernel(op, "cuda"))
    print(f"CUDA build of {dmmd_ops.__file__}: archs {info['built'].get('cuda_arch_list')}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    for op in sorted(expected):
        print(f"  dmmd::{op:26s} {'registered for CUDA' if op not in missing else 'MISSING'}")
    if missing:
        print("FAIL: not registered for CUDA:", ", ".join(missing))
        return 1
    print(f"OK: {len(expected)} CUDA ops registered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
