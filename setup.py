"""Build dmmd_ops._C: the CPU kernels always, the CUDA kernels whenever the installed
torch is a CUDA build and nvcc is found (keyed on the torch build, not on a visible GPU).

Knobs (environment): DMMD_FORCE_CUDA=1, DMMD_SKIP_CUDA=1, TORCH_CUDA_ARCH_LIST, MAX_JOBS,
DEBUG=1, CUDA_HOME, DMMD_PTXAS_VERBOSE=1 (ptxas's per-kernel resource report);
DMMD_NO_EXTENSION=1 installs the Python packages only (the Makefile then builds the extension
in place, once, with ninja). Install with `pip install --no-build-isolation .`
after torch: the extension is built against that torch (its version is recorded in
`_build_info.json`, and `dmmd_ops` refuses to load a build made for another torch).
"""
from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_home_from_nvcc() -> str | None:
    """The toolkit directory behind the `nvcc` on the PATH.

    The `nvcc` found first may be a wrapper script, so torch's guess (the parent of its
    directory) can be wrong; `nvcc --dryrun` prints the real toolkit root as `TOP=`.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m and os.path.isdir(m.group(1).strip()):
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
if not os.environ.get("CUDA_HOME") and not _flag("DMMD_SKIP_CUDA"):
    _home = _cuda_home_from_nvcc()
    if _home:
        os.environ["CUDA_HOME"] = _home

try:
    import torch  # noqa: E402
except ModuleNotFoundError:  # pip's isolated build environment: no torch to build against
    sys.exit("dmmd compiles its kernels against the torch of the environment it installs into, and "
             "this build environment has none (pip's build isolation). Install torch first, then: "
             "pip install --no-build-isolation .")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    if _flag("DMMD_SKIP_CUDA"):
        return False
    if _flag("DMMD_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and \
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _extension():
    debug = _flag("DEBUG")
    with_cuda = _want_cuda()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # OpenMP: at::parallel_for runs serially without it. No FP contraction: every pass must
    # round a * (1 / temperature) - max identically (the nucleus bins depend on it).
    cxx = (["-O0", "-g"] if debug else ["-O3"]) + ["-fopenmp", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec only vectorizes for a named CPU capability; AVX2+FMA is the portable
        # baseline we build for (no -march=native).
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    extra = {"cxx": cxx}
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a visible GPU torch cannot guess the archs (and crashes); CUDA 13 has
            # nothing below 7.5.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # The CUDA wheels of torch ship the toolkit headers ATen's CUDA headers need.
        for site in sys.path:
            inc = os.path.join(site, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
                break
        # Sampling code must never see --use_fast_math.
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["--expt-relaxed-constexpr"]
        if os.environ.get("DMMD_PTXAS_VERBOSE") == "1":  # registers, spills, smem: scripts/ptxas_report.py
            extra["nvcc"].append("-Xptxas=-v")
        define_macros.append(("DMMD_WITH_CUDA", "1"))
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    BUILD_INFO.update({
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_home": CUDA_HOME if with_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "sources": sources,
        "debug": debug,
        "machine": platform.machine(),
    })
    return ext_cls(
        name="dmmd_ops._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )


BUILD_INFO: dict = {}


class BuildExt(BuildExtension):
    """Writes `_build_info.json` beside each built library, so that every build (in place,
    or a separate CUDA build directory) reports on itself via `python -m dmmd_ops.info`."""

    def run(self):
        super().run()
        for ext in self.extensions:
            out_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(BUILD_INFO, f, indent=2)


setup(
    packages=find_packages(include=["dmmd_ops", "dmmd_ops.*", "dmmd", "dmmd.*"]),
    ext_modules=[] if _flag("DMMD_NO_EXTENSION") else [_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
