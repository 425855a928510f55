"""Quick GPU check of the current kernels (a short device call): float64-reference errors for a
few cases, printed as one line each. The full suite is tests/kernels/test_flash_gpu.py."""
import sys
import time

import torch

sys.path.insert(0, "tests/kernels")
from reference import reference_attention  # noqa: E402

from t5core.kernels import flash_attention  # noqa: E402


def check(B, H, Lq, Lk, dtype, **kw):
    t0 = time.time()
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(B, H, L, 64, generator=g, device="cuda").to(dtype).requires_grad_() for L in (Lq, Lk, Lk)]
    leaves.append((torch.randn(32, H, generator=g, device="cuda") * 3).requires_grad_())
    kl = kw.pop("key_lengths", None)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference_attention(*leaves64, key_lengths=kl, **kw)
    dout = torch.randn(ref.shape, generator=g, device="cuda", dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves64, dout)
    out = flash_attention(*leaves, key_lengths=kl, **kw)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip([out, *grads], [ref, *ref_grads])]
    print(f"check {dtype} B{B} H{H} Lq{Lq} Lk{Lk} {kw}: out/dq/dk/dv/dtable rel err "
          + " ".join(f"{e:.1e}" for e in errs) + f" ({time.time() - t0:.1f}s)", flush=True)


check(2, 4, 1000, 1000, torch.bfloat16, key_lengths=torch.tensor([1000, 613], device="cuda"))
check(2, 4, 1000, 1000, torch.float32, key_lengths=torch.tensor([1000, 613], device="cuda"))

