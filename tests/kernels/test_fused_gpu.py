"""The fused inference kernels (kernels/fused.py) on a CUDA device at model sizes, against the
torch ops they replace in float64; and the model's dispatch to them (inference only)."""
import pytest
import torch

from t5core.layers import RMSNorm, _gelu_new

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,dim", [(16384, 768), (3, 4096), (1000, 4672)])
def test_rms_norm_at_model_sizes(rows, dim, dtype):
    from t5core.kernels import fused

    x = (torch.randn(rows, dim, device="cuda") * 3).to(dtype)
    weight = (1 + torch.randn(dim, device="cuda") * 0.3).to(dtype)
    ref = weight.double() * (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6))
    assert rel_err(fused.rms_norm(x, weight, 1e-6), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_gelu_at_model_sizes(dtype):
    from t5core.kernels import fused

    a, b = ((torch.randn(16384, 2048, device="cuda") * 4).to(dtype) for _ in range(2))
    assert rel_err(fused.gated_gelu(a, b), _gelu_new(a.double()) * b.double()) < TOL[dtype]


def test_layers_use_the_fused_kernels_only_without_gradients(monkeypatch):
    from t5core.kernels import fused

    calls = []
    monkeypatch.setattr(fused, "rms_norm", lambda *a: calls.append("fused") or torch.zeros(1))
    norm = RMSNorm(64).cuda()
    x = torch.randn(4, 64, device="cuda")
    norm(x)  # the weight requires grad and grad mode is on: torch ops
    assert calls == []
    with torch.no_grad():
        norm(x)
    assert calls == ["fused"]
