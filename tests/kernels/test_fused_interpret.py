"""The fused inference kernels (kernels/fused.py), run by Triton's CPU interpreter, against the
torch ops they replace (t5core.layers, the reference's numerics) evaluated in float64.

Tolerances (norm-wise relative error): fp32 1e-6 (both sides compute in fp32; only summation
order and the tanh formula differ); bf16 1e-2 (the kernels round once, the torch ops after
each op). Shapes are awkward on purpose: dims that are not powers of two, row counts that do
not fill the last program, a non-contiguous input.
"""
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from t5core.kernels import fused  # noqa: E402
from t5core.layers import RMSNorm, _gelu_new  # noqa: E402

from .interpreter import rel_err, require_interpreter  # noqa: E402

require_interpreter(fused._rms_norm_kernel, "test_fused_gpu.py")

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps).to(weight.dtype)
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        return norm(x)  # on the CPU this is the torch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,dim", [(1, 64), (7, 100), (33, 768), (5, 1100)])
def test_rms_norm_matches_torch_ops(rows, dim, dtype):
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(2, rows, dim, generator=g) * 3).to(dtype)
    weight = (1 + torch.randn(dim, generator=g) * 0.3).to(dtype)
    out = fused.rms_norm(x, weight, 1e-6)
    ref = torch_rms_norm(x.double(), weight.double(), 1e-6)
    assert out.dtype == torch_rms_norm(x, weight, 1e-6).dtype and out.shape == x.shape
    assert rel_err(out, ref) < TOL[dtype]


def test_rms_norm_fp32_weight_on_half_input_promotes_like_the_reference():
    # A bf16 residual stream with an fp32 norm weight: the reference returns fp32, unrounded.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 96, generator=g).to(torch.bfloat16)
    weight = 1 + torch.randn(96, generator=g) * 0.3
    out = fused.rms_norm(x, weight, 1e-6)
    ref = torch_rms_norm(x, weight, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    assert rel_err(out, ref.double()) < 1e-6


def test_rms_norm_non_contiguous_input():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 12, generator=g).t()  # [12, 64], stride (1, 12)
    weight = torch.randn(64, generator=g)
    assert rel_err(fused.rms_norm(x, weight, 1e-6), torch_rms_norm(x.double(), weight.double(), 1e-6)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 5), (3, 17, 130), (2, 2100)])
def test_gated_gelu_matches_torch_ops(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    a = (torch.randn(shape, generator=g) * 4).to(dtype)  # reaches the saturated ends of tanh
    b = torch.randn(shape, generator=g).to(dtype)
    out = fused.gated_gelu(a, b)
    ref = _gelu_new(a.double()) * b.double()
    assert out.dtype == dtype and out.shape == a.shape
    assert rel_err(out, ref) < TOL[dtype]


def test_gated_gelu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape and dtype"):
        fused.gated_gelu(torch.randn(3, 4), torch.randn(4, 3))
