"""Build report: ``python -m dmmd_ops.info`` prints what was compiled, for which archs,
against which torch, and which ops have a kernel for each backend."""
from __future__ import annotations

import json
import os

import torch

from dmmd_ops._ext import EXTENSION_ERROR, EXTENSION_LOADED, OPS, has_kernel


def build_info() -> dict:
    """The build record written by setup.py, plus what this process sees at run time."""
    built = {}
    if EXTENSION_LOADED:
        from dmmd_ops import _C

        path = os.path.join(os.path.dirname(_C.__file__), "_build_info.json")
    if EXTENSION_LOADED and os.path.exists(path):
        with open(path) as f:
            built = json.load(f)
    return {
        "built": built,
        "runtime_torch": torch.__version__,
        "runtime_torch_cuda": torch.version.cuda,
        "extension_loaded": EXTENSION_LOADED,
        "extension_error": EXTENSION_ERROR,
        "kernels": {op: [key for key in ("cpu", "cuda") if has_kernel(op, key)] for op in OPS},
    }


def main() -> None:
    info = build_info()
    b = info["built"]
    print(f"torch (runtime)        {info['runtime_torch']} (CUDA {info['runtime_torch_cuda']})")
    print(f"torch (build)          {b.get('torch_version', '?')} (CUDA {b.get('torch_cuda')})")
    print(f"extension loaded       {info['extension_loaded']}"
          + (f"  ({info['extension_error']})" if info["extension_error"] else ""))
    print(f"CUDA kernels compiled  {b.get('with_cuda', False)}"
          + (f"  archs {b.get('cuda_arch_list')}  CUDA_HOME {b.get('cuda_home')}" if b.get("with_cuda") else ""))
    print(f"debug build            {b.get('debug', False)}")
    print("kernels by op:")
    for op, keys in info["kernels"].items():
        print(f"  {op:26s} {', '.join(keys) if keys else '(reference only)'}")


if __name__ == "__main__":
    main()
