"""Per-kernel resources from a CUDA build log made with ptxas -v (DMMD_PTXAS_VERBOSE=1), checked
against budgets, with the theoretical occupancy each implies.

    python scripts/ptxas_report.py build.log [--max-registers 128] [--markdown]

For every `__global__` of ours (namespace dmmd) and every architecture: registers, spill
stores / loads, stack frame and static shared memory, then blocks per SM from the occupancy
formula (threads, registers at the allocation granularity, shared memory, the block limit)
and which of them binds. Exits 1 naming the kernel on any spill or any kernel over the
register budget; 2 when the log holds no ptxas report of ours (the flag was not set).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass

THREADS = 256  # every kernel of ours launches 256-thread blocks (row_block.cuh, philox_cuda.cu)
MAX_REGISTERS = 128  # the stated budget: at 256 threads, 128 registers still fit one block per SM twice

# Per-SM limits by architecture (CUDA occupancy calculator): threads, blocks, registers, the
# register allocation unit (per warp), shared memory usable by blocks (bytes), and the shared
# memory each block reserves for the system.
SM = {
    "sm_80": dict(threads=2048, blocks=32, regs=65536, reg_unit=256, smem=167936, smem_reserved=1024),
    "sm_90": dict(threads=2048, blocks=32, regs=65536, reg_unit=256, smem=233472, smem_reserved=1024),
    "sm_90a": dict(threads=2048, blocks=32, regs=65536, reg_unit=256, smem=233472, smem_reserved=1024),
}


@dataclass
class Kernel:
    name: str
    arch: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0


def parse(log: str) -> list[Kernel]:
    """Every entry function ptxas reports, in order (our kernels and any other)."""
    kernels, current = [], None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line):
            current = Kernel(m.group(1), m.group(2))
            kernels.append(current)
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            current.registers = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current.smem = int(s.group(1))
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines(), strict=True))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def occupancy(k: Kernel, threads: int = THREADS) -> tuple[int, str]:
    """Resident blocks per SM and the limit that binds (threads, registers, shared memory, blocks)."""
    sm = SM.get(k.arch, SM["sm_80"])
    warps = -(-threads // 32)
    regs_per_warp = -(-max(k.registers, 1) * 32 // sm["reg_unit"]) * sm["reg_unit"]
    limits = {
        "threads": sm["threads"] // threads,
        "registers": sm["regs"] // (regs_per_warp * warps),
        "shared memory": sm["smem"] // (k.smem + sm["smem_reserved"]),
        "blocks": sm["blocks"],
    }
    bind = min(limits, key=lambda n: limits[n])
    return limits[bind], bind


def short(name: str) -> str:
    """``dmmd::cuda::generator_forward_kernel<__nv_bfloat16>`` without its argument list."""
    name = name.replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")  # templates: return type
    return name.replace("dmmd::cuda::", "").replace("dmmd::", "").replace(" ", "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--max-registers", type=int, default=MAX_REGISTERS)
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args(argv)
    with open(args.log, errors="replace") as f:
        found = parse(f.read())
    names = demangle(sorted({k.name for k in found}))
    ours = [k for k in found if "dmmd" in names[k.name]]
    if not ours:
        print(f"ptxas_report: no ptxas report of dmmd kernels in {args.log} (build with DMMD_PTXAS_VERBOSE=1)",
              file=sys.stderr)
        return 2
    unique = {(short(names[k.name]), k.arch): k for k in ours}  # a kernel built in two files reports twice
    sep = "|" if args.markdown else " "
    head = ["kernel", "arch", "registers", "spill st/ld (B)", "stack (B)", "smem (B)", "blocks/SM", "bound by"]
    rows = []
    for (name, arch), k in sorted(unique.items()):
        blocks, bind = occupancy(k)
        rows.append([name, arch, str(k.registers), f"{k.spill_stores}/{k.spill_loads}", str(k.stack), str(k.smem),
                     f"{blocks} ({blocks * THREADS * 100 // SM.get(arch, SM['sm_80'])['threads']}%)", bind])
    if args.markdown:
        print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
        print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    else:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            print(sep.join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    bad = [f"{name} ({arch}): {k.spill_stores} B spill stores, {k.spill_loads} B spill loads"
           for (name, arch), k in unique.items() if k.spill_stores or k.spill_loads]
    bad += [f"{name} ({arch}): {k.registers} registers > budget {args.max_registers}"
            for (name, arch), k in unique.items() if k.registers > args.max_registers]
    for b in bad:
        print(f"ptxas_report: over budget: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
