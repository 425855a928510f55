"""kernels/launch.py on a CUDA device: a cached launch (the compiled kernel's launcher, no JIT)
computes what the JIT's launch does, for each specialisation the JIT would compile apart, and
defers to the JIT while a launch hook is registered."""
import pytest
import torch
import triton
import triton.language as tl

from t5core.kernels import launch as launch_mod

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@triton.jit
def _axpy_kernel(X, Y, Out, n, stride, alpha, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs * stride, mask=mask, other=0.0)
    y = tl.load(Y + offs, mask=mask, other=0.0)
    tl.store(Out + offs, alpha * x + y + SHIFT, mask=mask)


def run(x, y, n, stride, alpha, shift):
    out = torch.full_like(y, float("nan"))
    launch_mod.launch(_axpy_kernel, (triton.cdiv(n, 128),), x, y, out, n, stride, alpha, SHIFT=shift, BLOCK=128,
                      num_warps=4)
    expected = alpha * x[::stride][:n] + y[:n] + shift
    return out[:n], expected


@pytest.mark.parametrize("n,stride", [(1000, 1), (1, 1), (1000, 2), (32, 16), (777, 3)])
def test_cached_launches_match_torch(n, stride):
    torch.manual_seed(0)
    base = torch.randn(n * stride + 1, device="cuda")
    y = torch.randn(n + 1, device="cuda")
    for x in (base[:n * stride], base[1:]):  # 16-byte aligned, then not
        for alpha in (0.5, 2.0):
            for _ in range(2):  # the first launch fills the cache, the second uses it
                out, expected = run(x, y, n, stride, alpha, shift=1)
                torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out, expected = run(base, y, n, stride, 0.5, shift=3)  # another constexpr
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_a_second_launch_skips_the_jit(monkeypatch):
    x, y = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    run(x, y, 300, 1, 1.5, shift=2)
    jit_calls = []
    real_run = _axpy_kernel.run
    monkeypatch.setattr(_axpy_kernel, "run", lambda *a, **k: jit_calls.append(1) or real_run(*a, **k))
    out, expected = run(x, y, 300, 1, 1.5, shift=2)
    torch.testing.assert_close(out, expected)
    assert jit_calls == []
    run(x, y, 299, 1, 1.5, shift=2)  # a new length: the JIT again
    assert jit_calls == [1]


def test_a_launch_hook_sends_launches_through_the_jit():
    x, y = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    run(x, y, 300, 1, 1.5, shift=2)
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        out, expected = run(x, y, 300, 1, 1.5, shift=2)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    torch.testing.assert_close(out, expected)
    assert len(seen) == 1
