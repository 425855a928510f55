"""Fused inference kernels for the non-attention parts of a T5 layer: RMSNorm and the gated GELU.

Written as torch ops, T5's RMSNorm is eight kernels (cast, square, mean, add, rsqrt, multiply,
cast, scale) and the gated `gelu_new` nine; each reads and writes the whole activation. At long
inputs that is memory traffic (a flan-t5-base encoder over 16k tokens spends more time there than
in its matrix products); in a decode step it is launches (hundreds per token, each a CUDA-graph
node). One kernel each does the same arithmetic in fp32 registers.

Numerics (t5-facts A1): the RMSNorm statistics are fp32 as in the reference, and the normed value
is rounded to the weight's dtype before the scale, exactly where the reference rounds. The gated
GELU computes in fp32 and rounds once, where the reference (in bf16/fp16) rounds after each of its
ops: the two agree to the output dtype's precision. Forward only: training runs the torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import cdiv, launch, next_power_of_2


@triton.jit
def _rms_norm_kernel(X, W, Y, n_rows, dim, stride_x, stride_y, eps, ROUND_TO_W: tl.constexpr,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    mask = (rows < n_rows) & (cols < dim)
    x = tl.load(X + rows.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=1) / dim  # [ROWS]
    normed = x * tl.math.rsqrt(variance + eps)[:, None]
    w = tl.load(W + cols, mask=cols < dim, other=0.0)
    if ROUND_TO_W:  # half-precision weight: the reference casts the normed value to it first
        normed = normed.to(W.dtype.element_ty)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(Y + rows.to(tl.int64) * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """T5 RMSNorm of x [..., dim] with weight [dim]: weight * (x / sqrt(mean(x^2) + eps)).

    Output dtype as the reference's: the weight's when it is fp16/bf16, else fp32 promotion."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)  # [N, dim]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    half_weight = weight.dtype in (torch.float16, torch.bfloat16)
    out_dtype = weight.dtype if half_weight else torch.promote_types(weight.dtype, torch.float32)
    y = torch.empty((x2.shape[0], dim), dtype=out_dtype, device=x.device)
    block = next_power_of_2(dim)
    rows = max(1, min(16, 4096 // block))  # a few short rows per program
    grid = (cdiv(x2.shape[0], rows),)
    launch(_rms_norm_kernel, grid, x2, weight, y, x2.shape[0], dim, x2.stride(0), y.stride(0), eps,
           ROUND_TO_W=half_weight, BLOCK=block, ROWS=rows, num_warps=4 if block <= 2048 else 8)
    return y.view(*x.shape[:-1], dim)


@triton.jit
def _gated_gelu_kernel(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)  # sqrt(2/pi) * (a + 0.044715 a^3)
    # tanh(z) = 1 - 2 / (exp(2z) + 1); tanh(20) is 1 in fp32, so clamping z keeps exp finite
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(inner, 20.0)) + 1.0)
    y = 0.5 * a * (1.0 + tanh) * b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def gated_gelu(a: Tensor, b: Tensor) -> Tensor:
    """gelu_new(a) * b (the tanh GELU of T5 v1.1, Flan-T5, mT5), one pass; a and b same shape."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"gated_gelu needs a and b of one shape and dtype, got {a.shape}/{a.dtype}, "
                         f"{b.shape}/{b.dtype}")
    a, b = a.contiguous(), b.contiguous()
    y = torch.empty_like(a)
    block = 2048
    launch(_gated_gelu_kernel, (cdiv(a.numel(), block),), a, b, y, a.numel(), BLOCK=block, num_warps=8)
    return y
