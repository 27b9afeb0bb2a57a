"""The scripts' pieces that run without a GPU: the GPU check's sanitizer command lines (--dry-run),
the sanitizer probe's cases on the CPU kernels, the ptxas report, and the fingerprints of short
runs that prove a restructure changes nothing."""
import json
import os
import subprocess
import sys

import dmmd_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_dry_run_prints_one_sanitizer_line_per_tool():
    out = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    tools = [line.split("--tool ")[1].split()[0] for line in out]
    assert tools == ["memcheck", "racecheck", "synccheck", "initcheck"]
    assert all("scripts/sanitizer_probe.py" in line and "--error-exitcode" in line for line in out)
    # initcheck must see torch's kernels' writes: it runs unfiltered, the others on ours only.
    assert ["kns=dmmd" in line for line in out] == [True, True, True, False]


def test_sanitizer_probe_runs_every_op(monkeypatch):
    called = set()
    for name in ("generator_loss", "aux_loss", "teacher_logprobs", "sample_categorical", "posterior_sample",
                 "denoise_step", "grad_gram", "philox4x32"):
        op = getattr(dmmd_ops, name)
        monkeypatch.setattr(dmmd_ops, name, lambda *a, _op=op, _n=name, **k: (called.add(_n), _op(*a, **k))[1])
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import sanitizer_probe
    finally:
        sys.path.pop(0)
    assert sanitizer_probe.main(["--cpu"]) == 0
    assert called == {"generator_loss", "aux_loss", "teacher_logprobs", "sample_categorical", "posterior_sample",
                      "denoise_step", "grad_gram", "philox4x32"}


PTXAS_LOG = """\
ptxas info    : Compiling entry function '_ZN4dmmd4cuda24generator_forward_kernelIfEEvPKT_' for 'sm_80'
ptxas info    : Function properties for _ZN4dmmd4cuda24generator_forward_kernelIfEEvPKT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1088 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN4dmmd4cuda17gram_trick_kernelEPKf' for 'sm_90'
ptxas info    : Function properties for _ZN4dmmd4cuda17gram_trick_kernelEPKf
    {stack} bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads
ptxas info    : Used {regs} registers, used 1 barriers, 60000 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN2at6native6kernelEv' for 'sm_80'
ptxas info    : Used 250 registers, 0 bytes smem
"""


def _report(tmp_path, capsys, **kw):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import ptxas_report
    finally:
        sys.path.pop(0)
    log = tmp_path / "build.log"
    log.write_text(PTXAS_LOG.format(**{"stack": 0, "spill": 0, "regs": 64, **kw}))
    rc = ptxas_report.main([str(log)])
    return rc, capsys.readouterr()


def test_ptxas_report_tables_our_kernels_with_their_occupancy(tmp_path, capsys):
    rc, out = _report(tmp_path, capsys)
    assert rc == 0
    lines = out.out.splitlines()
    assert len(lines) == 3 and "at::native" not in out.out  # torch's kernels are not ours to budget
    fwd = next(line for line in lines if "generator_forward_kernel<float>" in line).split()
    # 40 registers (1280 per warp, 8 warps a block: 6 blocks by registers) bind before threads (8)
    assert fwd[1:4] == ["sm_80", "40", "0/0"] and "6 (75%)" in " ".join(fwd) and fwd[-1] == "registers"
    gram = next(line for line in lines if "gram_trick_kernel" in line)  # 60 kB of smem: 3 blocks of 256
    assert "3 (37%)" in gram and gram.rstrip().endswith("shared memory")


def test_ptxas_report_fails_on_spills_and_over_budget_registers(tmp_path, capsys):
    rc, out = _report(tmp_path, capsys, spill=8)
    assert rc == 1 and "gram_trick_kernel (sm_90): 8 B spill stores" in out.err
    rc, out = _report(tmp_path, capsys, regs=200)
    assert rc == 1 and "200 registers > budget 128" in out.err


def test_ptxas_report_without_a_report_says_how_to_get_one(tmp_path, capsys):
    (tmp_path / "empty.log").write_text("nothing compiled\n")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import ptxas_report
    finally:
        sys.path.pop(0)
    assert ptxas_report.main([str(tmp_path / "empty.log")]) == 2
    assert "DMMD_PTXAS_VERBOSE=1" in capsys.readouterr().err


def _mutations():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import barrier_mutations
    finally:
        sys.path.pop(0)
    return barrier_mutations


def test_barrier_mutations_find_every_barrier_and_change_one(tmp_path):
    """The study's mutants: one per `__syncthreads();` and per `__syncthreads_or(...)` in the
    kernels (counted here independently), each copy differing from csrc/ in that one place."""
    bm = _mutations()
    mutants = bm.find_mutants()
    kernels = os.path.join(ROOT, "csrc", "cuda")
    text = "".join(open(os.path.join(kernels, f)).read() for f in sorted(os.listdir(kernels)) if f.endswith(".cuh"))
    assert len(mutants) == text.count("__syncthreads();") + text.count("__syncthreads_or(")
    assert {m.function for m in mutants} >= {"block_reduce", "block_exclusive_scan", "tile_dot", "row_max"}
    for m in (mutants[0], mutants[-1]):
        csrc = tmp_path / f"m{m.line}" / "csrc"
        bm.apply(m, str(csrc))
        before = open(os.path.join(ROOT, m.file)).read().split("\n")
        after = open(os.path.join(csrc.parent, m.file)).read().split("\n")
        changed = [i for i, (x, y) in enumerate(zip(before, after, strict=True)) if x != y]
        assert changed == [m.line - 1] and m.original not in after[m.line - 1]


def test_barrier_mutations_say_what_caught_a_mutant():
    bm = _mutations()
    assert bm.classify("FAILED tests/x.py::t - RuntimeError: race in k: s[1]\n")[0] == "race detector"
    assert bm.classify("FAILED tests/x.py::t - AssertionError: op under schedule 7: ...\n")[0] == "schedules"
    assert bm.classify("FAILED tests/x.py::t - RuntimeError: k: divergent __syncthreads in block 0\n")[0] == \
        "divergent barrier"
    assert bm.classify("FAILED tests/x.py::t - AssertionError: Tensor-likes are not close!\n") == \
        ("wrong value", "tests/x.py::t - AssertionError: Tensor-likes are not close!")


def test_fingerprints_hash_what_the_runs_left_and_see_a_change(tmp_path):
    # the script's lines; the same hashes read again from what it left; a changed weight changes its line
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import fingerprint_runs
    finally:
        sys.path.pop(0)
    out = tmp_path / "runs"
    lines = subprocess.run([sys.executable, "scripts/fingerprint_runs.py", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONPATH=ROOT)).stdout.splitlines()
    assert len(lines) == 7 and lines[0].startswith("teacher masked: ") and "samples" in lines[1]
    checkpoint = out / "student_masked_0" / "checkpoint"
    names = ("generator", "aux", "ema")
    digest = fingerprint_runs.checkpoint_digest(str(checkpoint), names)
    assert f"weights {digest} " in lines[1]
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "weights.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if k.startswith("ema/"))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights))
    assert fingerprint_runs.checkpoint_digest(str(checkpoint), names) != digest


def test_gpu_report_puts_unstaged_beside_staged(tmp_path):
    """The device check's table: per case the eager, compile and dmmd medians, and for the nucleus
    ops the unstaged kernels' (DMMD_ROW_STAGING=0) from the same run."""
    from bench.report import from_jsonl, gpu_table

    info = {"device": "NVIDIA H100", "copy_gbps": 3000.0, "gbps": 1500.0, "share_of_copy": 0.5}
    rows = [{"group": g, "impl": i, "median": m, "extra_info": info, "torch": "2.14.1"}
            for g, i, m in [("sample N=1 V=2", "eager", 0.004), ("sample N=1 V=2", "compile", 0.003),
                            ("sample N=1 V=2", "dmmd", 0.001), ("sample N=1 V=2", "dmmd_unstaged", 0.002),
                            ("loss N=1 V=2", "dmmd", 0.001)]]
    path = tmp_path / "gpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = gpu_table(from_jsonl(str(path))).splitlines()
    assert "NVIDIA H100" in table[0] and table[2].endswith("| dmmd unstaged (ms) |")
    assert table[4].startswith("| loss N=1 V=2 | n/a | n/a | 1.00 |") and table[4].endswith("|  |")  # sorted
    assert table[5] == "| sample N=1 V=2 | 4.00 | 3.00 | 1.00 | 4.0x | 3.0x | 1500 | 50% | 2.00 |"
