"""The small building blocks of T5: RMSNorm, the feed-forward variants and the relative bias.

Numerics follow the reference exactly (see ../shared/reference/t5-facts.md, A1).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import T5Config


def _fused_kernels(x: Tensor, *params: Tensor):
    """The fused inference kernels (t5core.kernels.fused) when they apply, else None.

    They apply on CUDA when no gradient is being recorded; training and the CPU run the torch
    ops below, which are the reference's, op for op."""
    if not x.is_cuda or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return None
    try:
        from t5core.kernels import fused  # triton is needed only on CUDA
    except ImportError:
        return None
    return fused


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused_kernels(x, self.weight)
        if fused is not None:
            return fused.rms_norm(x, self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # promotes to fp32, as the reference does
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def _gelu_new(x: Tensor) -> Tensor:
    # The tanh GELU of the original T5 code ("gelu_new"), written out as the reference does.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_accurate(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_accurate": _gelu_accurate,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "hardswish": F.hardswish,
    "linear": lambda x: x,
}


class FeedForward(nn.Module):
    """`wo(act(wi x))` (T5 v1.0) or `wo(act(wi_0 x) * wi_1 x)` (gated: v1.1, Flan, mT5, ByT5, UMT5)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated = config.gated_ffn
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATION_FUNCTIONS[config.activation]
        self.fusable_gelu = self.gated and config.activation == "gelu_new"
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused_kernels(x, self.wi_0.weight) if self.fusable_gelu and not self.training else None
        if fused is not None:
            hidden = fused.gated_gelu(self.wi_0(x), self.wi_1(x))
        elif self.gated:
            hidden = self.act(self.wi_0(x)) * self.wi_1(x)
        else:
            hidden = self.act(self.wi(x))
        hidden = self.dropout(hidden)
        # `wo` may be kept in fp32 under fp16 (see model.keep_fp32_modules): cast as the reference does.
        return self.wo(hidden.to(self.wo.weight.dtype))


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucket of `rel = key_pos - query_pos`, bit for bit as the reference computes it.

    Small distances get their own bucket; larger ones share log-spaced buckets up to
    max_distance, beyond which the last bucket is used. The encoder splits the buckets
    between the two directions; the decoder sees only the past (future keys map to 0).
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).to(torch.long) * num_buckets
        distance = torch.abs(relative_position)
    else:
        distance = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 log and truncation, exactly as the reference (boundaries at n = 16, 32, 64 are exact).
    log_bucket = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    log_bucket = torch.min(log_bucket, torch.full_like(log_bucket, num_buckets - 1))
    return bucket + torch.where(is_small, distance, log_bucket)


class RelativeBias(nn.Module):
    """Owns the `[num_buckets, heads]` table and describes how to bucket (direction, distances).

    Fast attention paths receive this description and compute buckets themselves; only the
    `basic` path materialises the `[1, H, Lq, Lk]` bias through `materialize`.
    """

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_buckets, num_heads))  # [num_buckets, H]
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def materialize(self, q_len: int, k_len: int, q_offset: int = 0, q_start: int = 0) -> Tensor:
        """Bias for query rows [q_start, q_start + q_len) against all keys: [1, H, q_len, k_len].

        `q_offset` is the true position of query row 0 (the KV-cache length when decoding).
        """
        device = self.weight.device
        query_pos = torch.arange(q_start, q_start + q_len, device=device)[:, None] + q_offset
        key_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key_pos - query_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.weight[buckets].permute(2, 0, 1).unsqueeze(0)  # [q, k, H] -> [1, H, q, k]

    def extra_repr(self) -> str:
        return (
            f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
            f"heads={self.weight.shape[1]}, bidirectional={self.bidirectional}"
        )
