"""Every dmmd_ops CUDA kernel once, at small awkward shapes, for compute-sanitizer to watch.

scripts/device_check.sh runs this under memcheck, racecheck, synccheck (our kernels
instrumented only) and initcheck (every kernel). The shapes are small so that an instrumented run takes seconds,
but odd (V = 1031 and 50257: misaligned bf16 rows, ragged last tiles; one row; top-p < 1, which
takes the nucleus path, staged in shared memory and not) so that every branch of every kernel
runs. `--list` prints the cases;
`--cpu` runs them here on the CPU kernels.
Exits non-zero only if a case raises; the sanitizer's own exit code reports its findings.
"""
from __future__ import annotations

import sys

import torch

import dmmd_ops
from dmmd_ops.testing import unstaged_rows


def unstaged(run):
    """``run`` with rows read from global memory, not staged in shared memory."""
    def wrapped():
        with unstaged_rows():
            run()
    return wrapped


def cases(dev: str = "cuda"):
    """(name, thunk) pairs; each thunk runs one op (forward, and backward for the losses)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def logits(rows, v, dtype, grad=False):
        t = (torch.randn(rows, v, generator=g) * 3).to(dev, dtype)
        return t.requires_grad_(grad)

    def loss_case(rows, v, dtype, top_p):
        def run():
            u, a, b = logits(rows, v, dtype, True), logits(rows, v, dtype), logits(rows, v, dtype, True)
            dmmd_ops.generator_loss(u, a, b, temperature=0.9, top_p=top_p).backward()
            x = torch.randint(0, v, (rows,), generator=g).to(dev)
            dmmd_ops.aux_loss(b, x, a, top_p=top_p).backward()
            soft = torch.softmax(torch.randn(rows, v, generator=g), -1).to(dev)
            dmmd_ops.aux_loss(b, soft, None).backward()
            dmmd_ops.teacher_logprobs(a, temperature=1.1, top_p=top_p)
        return run

    def sampler_case(rows, v, dtype, top_p):
        def run():
            x = logits(rows, v, dtype)
            dmmd_ops.sample_categorical(x, temperature=0.8, top_p=top_p, seed=1)
            for process, mask in (("masked", v - 1), ("uniform", None)):
                z = torch.randint(0, v, (rows,), generator=g).to(dev)
                if process == "masked":
                    z[::2] = mask
                dmmd_ops.denoise_step(x, z, 0.7, 0.3, process=process, mask_id=mask, top_p=top_p, seed=2)
                clean = torch.randint(0, v - 1, (rows,), generator=g).to(dev)
                dmmd_ops.posterior_sample(z, clean, 0.7, 0.3, process=process, mask_id=mask,
                                          num_classes=v, seed=3)
                soft = torch.softmax(torch.randn(rows, v, generator=g), -1)
                if process == "masked":
                    soft[:, mask] = 0
                dmmd_ops.posterior_sample(z, soft.to(dev), 0.7, 0.3, process=process, mask_id=mask, seed=4)
        return run

    def gram_case(n, t, d_in, d_out):
        def run():
            a = torch.randn(n, t, d_in, generator=g).to(dev)
            gr = torch.randn(n, t, d_out, generator=g).to(dev)
            dmmd_ops.grad_gram(a, gr)
        return run

    def philox_case():
        def run():
            counter = torch.randint(0, 2**32, (129, 4), generator=g).to(dev)
            key = torch.randint(0, 2**32, (129, 2), generator=g).to(dev)
            dmmd_ops.philox4x32(counter, key)
        return run

    out = []
    for rows, v in ((1, 1031), (37, 1031), (5, 50257)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for top_p in (1.0, 0.9):
                tag = f"{rows}x{v} {str(dtype)[6:]} top_p={top_p}"
                out.append((f"losses {tag}", loss_case(rows, v, dtype, top_p)))
                out.append((f"samplers {tag}", sampler_case(rows, v, dtype, top_p)))
    # the nucleus ops' unstaged kernels: by the environment, and a row too big for shared memory
    for name, case in (("losses", loss_case), ("samplers", sampler_case)):
        out.append((f"{name} 37x1031 bfloat16 top_p=0.9 unstaged", unstaged(case(37, 1031, torch.bfloat16, 0.9))))
        out.append((f"{name} 2x131072 float32 top_p=0.9 (too big to stage)", case(2, 131072, torch.float32, 0.9)))
    out.append(("grad_gram trick 3x5x64x96", gram_case(3, 5, 64, 96)))
    out.append(("grad_gram trick 33x17x40x24", gram_case(33, 17, 40, 24)))
    out.append(("philox4x32 129", philox_case()))
    return out


def main(argv: list[str]) -> int:
    if "--list" in argv:
        print("\n".join(name for name, _ in cases()))
        return 0
    dev = "cpu" if "--cpu" in argv else "cuda"  # --cpu: try the cases here, with the CPU kernels
    if dev == "cuda" and not (torch.cuda.is_available() and dmmd_ops.has_kernel("generator_loss_forward", "cuda")):
        print("sanitizer_probe: needs a CUDA device and the CUDA build of dmmd_ops", file=sys.stderr)
        return 2
    for name, run in cases(dev):
        run()
        if dev == "cuda":
            torch.cuda.synchronize()
        print("ok", name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
