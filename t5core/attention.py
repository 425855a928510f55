"""One entry point, `attend`, for every attention in the model.

All modes compute the same function (T5: no 1/sqrt(d) scaling, relative bias added to
the scores, softmax in fp32):

    out = softmax(q @ k^T + bias(bucket(k_pos - q_pos)) + mask) @ v

- `basic`: the torch reference; materialises the [1, H, Lq, Lk] bias.
- `flash`: the Triton relative-bias kernel on CUDA (bias computed in the kernel, memory
  linear in the length); on the CPU a chunked torch path over query blocks that also keeps
  memory linear (the bias is computed per block).
- `local`, `block`, `transient-global`: sparse encoder self-attention, each its own function
  (t5core/sparse.py, docs/sparse.md); they take a `SparseLayout` built once per forward.

Masks are described, not materialised: `key_mask` ([B, Lk] bool, True = a real key),
`causal`, and `q_offset` (the true position of query row 0, i.e. the cache length when
decoding incrementally; the bias and the causal mask both use true positions).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .config import AttentionMode
from .layers import RelativeBias
from .sparse import SparseLayout, attend_sparse

# A bias is either its description (the module: fast paths bucket in-kernel) or, for the
# basic path, the materialised [1, H, Lq, Lk] tensor shared by all layers of a stack.
BiasArg = Union[RelativeBias, Tensor, None]

CPU_QUERY_BLOCK = 256  # rows per block of the chunked CPU path: memory B*H*256*Lk floats


def prepare_bias(mode: AttentionMode, bias: RelativeBias | None, q_len: int, k_len: int, q_offset: int) -> BiasArg:
    """What a stack passes to every layer: the materialised bias for `basic`, else the module.

    The reference computes the bias once per stack forward and reuses it in every layer;
    `basic` does the same.
    """
    if bias is None or mode is not AttentionMode.BASIC:
        return bias
    return bias.materialize(q_len, k_len, q_offset)


def attend(
    q: Tensor,  # [B, H, Lq, D]
    k: Tensor,  # [B, H, Lk, D]
    v: Tensor,  # [B, H, Lk, D]
    *,
    mode: AttentionMode,
    bias: BiasArg = None,
    key_mask: Tensor | None = None,  # [B, Lk] bool, True where the key is real
    causal: bool = False,
    q_offset: int = 0,
    dropout_p: float = 0.0,
    layout: SparseLayout | None = None,  # sparse modes: the pattern of this forward
    side_kv: tuple[Tensor, Tensor] | None = None,  # transient-global: side keys, values [B, H, G, D]
) -> Tensor:  # [B, H, Lq, D]
    """Attention with T5's relative bias; see the module docstring for the semantics."""
    if mode.is_sparse:
        if layout is None or layout.mode is not mode or causal or q_offset:
            raise ValueError(f"attention={mode.value!r} is encoder self-attention only and needs its SparseLayout")
        if isinstance(bias, Tensor):
            raise TypeError("sparse attention takes the RelativeBias description, not a materialised bias")
        return attend_sparse(q, k, v, layout=layout, bias=bias, key_mask=key_mask, side_kv=side_kv, dropout_p=dropout_p)
    if mode is AttentionMode.BASIC:
        if isinstance(bias, RelativeBias):
            bias = bias.materialize(q.shape[2], k.shape[2], q_offset)
        return attend_block(q, k, v, bias, key_mask, causal, q_offset, 0, dropout_p)
    if mode is AttentionMode.FLASH:
        if isinstance(bias, Tensor):
            raise TypeError("flash attention takes the RelativeBias description, not a materialised bias")
        if q.is_cuda and dropout_p == 0.0:
            return _attend_flash_cuda(q, k, v, bias, key_mask, causal, q_offset)
        if q.is_cuda:
            _warn_once("attention dropout is not in the flash kernel; training with dropout uses the chunked path")
        return _attend_chunked(q, k, v, bias, key_mask, causal, q_offset, dropout_p)
    raise ValueError(f"attention mode {mode!r} is not implemented")


def attend_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | RelativeBias | None,  # materialised [B or 1, H, Lq, Lk], or the description
    key_mask: Tensor | None,  # [B, Lk] bool, True = visible
    causal: bool = False,
    q_offset: int = 0,
    q_start: int = 0,
    dropout_p: float = 0.0,
) -> Tensor:
    """Reference attention for query rows [q_start, q_start + Lq) of the full query range.

    The scores' additive term (bias, and finfo.min where masked, as the reference adds) is
    materialised and handed to torch's SDPA with scale 1 (T5 has no 1/sqrt(d) scaling: it
    is folded into the q initialisation). SDPA's CPU kernel is the same math as the
    reference's matmul-softmax-matmul, in fp32, and runs faster than writing it out.
    """
    if isinstance(bias, RelativeBias):
        bias = bias.materialize(q.shape[2], k.shape[2], q_offset, q_start)
    masked = _masked_positions(key_mask, causal, q.shape[2], k.shape[2], q_offset + q_start, q.device)
    additive = None if bias is None else bias.to(q.dtype)
    if masked is not None:
        floor = torch.finfo(q.dtype).min
        additive = (
            torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(masked, floor)
            if additive is None
            else additive.masked_fill(masked, floor)
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=dropout_p, scale=1.0)


def _masked_positions(
    key_mask: Tensor | None, causal: bool, q_len: int, k_len: int, first_q_pos: int, device: torch.device
) -> Tensor | None:
    """Boolean [B or 1, 1, Lq, Lk] tensor, True where a score must be hidden; None if nothing is."""
    masked = None
    if key_mask is not None:
        masked = ~key_mask.bool()[:, None, None, :]
    if causal:
        query_pos = torch.arange(q_len, device=device)[:, None] + first_q_pos
        future = torch.arange(k_len, device=device)[None, :] > query_pos  # [Lq, Lk]
        masked = future[None, None] if masked is None else (masked | future)
    return masked


def _attend_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: RelativeBias | None,
    key_mask: Tensor | None,
    causal: bool,
    q_offset: int,
    dropout_p: float,
) -> Tensor:
    """The flash mode off CUDA: query blocks, bias per block, so memory stays linear in Lk.

    Under autograd each block is recomputed in the backward (checkpointed), so training
    memory stays linear too.
    """
    outputs = []
    for start in range(0, q.shape[2], CPU_QUERY_BLOCK):
        q_block = q[:, :, start : start + CPU_QUERY_BLOCK]
        args = (q_block, k, v, bias, key_mask, causal, q_offset, start, dropout_p)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            outputs.append(checkpoint(attend_block, *args, use_reentrant=False))
        else:
            outputs.append(attend_block(*args))
    return torch.cat(outputs, dim=2)


def _attend_flash_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: RelativeBias | None,
    key_mask: Tensor | None,
    causal: bool,
    q_offset: int,
) -> Tensor:
    from t5core.kernels import flash_attention  # imported lazily: triton is only needed on CUDA

    key_lengths = None
    if key_mask is not None:
        key_lengths = key_lengths_from_mask(key_mask)
    return flash_attention(
        q,
        k,
        v,
        None if bias is None else bias.weight,
        bidirectional=True if bias is None else bias.bidirectional,
        num_buckets=32 if bias is None else bias.num_buckets,
        max_distance=128 if bias is None else bias.max_distance,
        causal=causal,
        q_offset=q_offset,
        key_lengths=key_lengths,
    )


def key_lengths_from_mask(key_mask: Tensor) -> Tensor:
    """[B, Lk] right-padded mask -> [B] int32 lengths, checked on the device (no host sync).

    The kernels take lengths, which describe right padding only; a mask with holes or left
    padding would silently change the result, so it is rejected. Every layer of a stack
    passes the same mask: the lengths of the last mask seen are kept (while that tensor lives
    and is unmodified), so a forward computes them once instead of once per layer.
    """
    key = (key_mask.device, torch.is_inference_mode_enabled())  # inference tensors stay in inference mode
    version = -1 if key_mask.is_inference() else key_mask._version  # inference tensors have no version counter
    memo = _lengths_memo.get(key)
    if memo is not None and memo[0]() is key_mask and memo[1] == version:
        return memo[2]
    mask = key_mask.bool()
    lengths = mask.sum(-1, dtype=torch.int32)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    torch._assert_async(
        (mask == (positions[None, :] < lengths[:, None])).all(),
        "attention='flash' needs right-padded attention masks (ones then zeros per row); "
        "pad on the right, or use attention='basic' for arbitrary masks",
    )
    if not torch.compiler.is_compiling():
        _lengths_memo[key] = (weakref.ref(key_mask), version, lengths)
    return lengths


# (device, inference mode) -> (weak reference to the last mask, its version, its lengths)
_lengths_memo: dict[tuple[torch.device, bool], tuple[weakref.ref, int, Tensor]] = {}


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
