"""Sparse encoder self-attention: `local`, `block` and `transient-global` (docs/sparse.md).

Each mode is computed blocked, never through an [L, L] mask: local attention compares query
blocks of `local_radius + 1` tokens with three key blocks (like LongT5), block attention
compares each block with itself plus the `num_global` leading keys. Memory is linear in
the length L; transient-global adds L / global_block_size side keys per query, as LongT5
does. tests/test_sparse.py checks every function here against the same function written
as dense attention with an [L, L] mask.

Rules shared by all modes (t5-facts A1, A3):
- scores = q @ k^T with no 1/sqrt(d), plus the stack's table at bucket(k - q) with the
  true positions of both tokens; softmax in fp32, as LongT5 does.
- Padded keys are hidden. Padded queries are fully masked and output 0 (LongT5 masks them
  too and gets a meaningless uniform average; nothing downstream reads these rows).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .config import AttentionMode, T5Config
from .layers import RelativeBias, relative_position_bucket


@dataclass(frozen=True)
class SparseLayout:
    """What a sparse mode needs that is the same in every layer of one encoder forward.

    The stack builds it once (as the reference computes `position_bias` once, in layer 0).
    Transient-global side keys/values are not here: they come from each layer's own input.
    """

    mode: AttentionMode
    local_radius: int
    block_size: int
    num_global: int
    # transient-global only
    block_ids: Tensor | None = None  # [B, L] long: each token's side token; -1 = none (padding)
    side_bias_lut: Tensor | None = None  # [H, 2G - 1]: global table at bucket(rel), rel = g - block_id + G - 1
    side_visible: Tensor | None = None  # [B, G] bool: side tokens that hold real tokens
    global_table: Tensor | None = None  # [num_buckets, H]: what side_bias_lut is read from (the kernels' input)

    @property
    def num_side(self) -> int:
        return 0 if self.side_visible is None else self.side_visible.shape[1]


def make_layout(
    config: T5Config, key_mask: Tensor | None, batch: int, length: int, global_bias: RelativeBias | None
) -> SparseLayout:
    """The layout of `config.attention` for a batch of [batch, length] tokens."""
    layout = SparseLayout(config.attention, config.local_radius, config.block_size, config.num_global)
    if config.attention is not AttentionMode.TRANSIENT_GLOBAL:
        return layout
    device = global_bias.weight.device
    valid = _valid(key_mask, batch, length, device)
    block_ids, side_visible = global_block_ids(valid, config.global_block_size)
    num_side = side_visible.shape[1]
    # Side bias: rel = g - block_id(token) in [-(G-1), G-1], bidirectional, with the global table
    # (t5-facts A3). Kept per rel, not per [L, G] pair, so memory stays linear in L.
    # An input shorter than one global block has no side token (G = 0): an empty table.
    rel = torch.arange(max(2 * num_side - 1, 0), device=device) - (num_side - 1)
    buckets = relative_position_bucket(rel, True, global_bias.num_buckets, global_bias.max_distance)
    side_bias_lut = global_bias.weight[buckets].t()  # [2G - 1, H] -> [H, 2G - 1]
    return SparseLayout(
        config.attention, config.local_radius, config.block_size, config.num_global, block_ids, side_bias_lut,
        side_visible, global_bias.weight,
    )


def global_block_ids(valid: Tensor, global_block_size: int) -> tuple[Tensor, Tensor]:
    """LongT5's `_make_global_fixed_block_ids`: ([B, L] block of each token, [B, G] side token in use).

    A real token at index i belongs to block i // global_block_size; padding gets -1. Tokens
    of a trailing partial block ("orphans") join the last full block; with no full block at
    all, every token gets -1. G = L // global_block_size over the padded input length.
    """
    positions = torch.arange(valid.shape[1], device=valid.device)
    block_ids = torch.where(valid, positions // global_block_size, -1)
    block_ends = valid & (positions % global_block_size == global_block_size - 1)
    last_full_block = block_ends.sum(-1, keepdim=True) - 1
    block_ids = torch.minimum(block_ids, last_full_block)
    num_side = valid.shape[1] // global_block_size
    side_visible = torch.arange(num_side, device=valid.device)[None, :] <= block_ids.max(-1, keepdim=True).values
    return block_ids, side_visible


def global_aggregates(hidden: Tensor, layout: SparseLayout) -> Tensor:
    """Side-token inputs [B, G, d_model]: the *sum* (not the mean) of each block's normed inputs."""
    batch, _, width = hidden.shape
    num_side = layout.num_side
    slots = torch.where(layout.block_ids >= 0, layout.block_ids, num_side)  # padding -> a dropped extra slot
    sums = hidden.new_zeros(batch, num_side + 1, width)
    sums = sums.scatter_add(1, slots[:, :, None].expand(-1, -1, width), hidden)
    return sums[:, :num_side]


def attend_sparse(
    q: Tensor,  # [B, H, L, D]
    k: Tensor,  # [B, H, L, D]
    v: Tensor,  # [B, H, L, D]
    *,
    layout: SparseLayout,
    bias: RelativeBias | None,
    key_mask: Tensor | None,  # [B, L] bool, True = real token
    side_kv: tuple[Tensor, Tensor] | None = None,  # transient-global: side keys, values [B, H, G, D]
    dropout_p: float = 0.0,
) -> Tensor:  # [B, H, L, D]
    """Encoder self-attention in a sparse mode; reached through `attention.attend`.

    On CUDA, `local` and `block` run the Triton flash kernels over only the visible key tiles
    (t5core.kernels.sparse_attention), and `transient-global` the local kernel plus a side-key
    kernel in one softmax (t5core.kernels.transient_global_attention); the CPU and attention
    dropout use the blocked torch functions below (the same function: tests/kernels/test_sparse_*.py).
    """
    if _uses_kernel(q, layout.mode, dropout_p):
        return sparse_kernel_attention(q, k, v, layout=layout, bias=bias, key_mask=key_mask)
    if layout.mode is AttentionMode.TRANSIENT_GLOBAL and side_kv is not None and _uses_kernel(
            q, AttentionMode.LOCAL, dropout_p):
        return tglobal_kernel_attention(q, k, v, layout=layout, bias=bias, key_mask=key_mask, side_kv=side_kv)
    if layout.mode is AttentionMode.LOCAL:
        return local_attention(q, k, v, bias, key_mask, layout.local_radius, dropout_p=dropout_p)
    if layout.mode is AttentionMode.TRANSIENT_GLOBAL:
        if side_kv is None:
            raise ValueError("transient-global attention needs the layer's side keys and values (side_kv)")
        side = (side_kv[0], side_kv[1], layout.side_bias_lut, layout.side_visible, layout.block_ids)
        return local_attention(q, k, v, bias, key_mask, layout.local_radius, side=side, dropout_p=dropout_p)
    if layout.mode is AttentionMode.BLOCK:
        return block_attention(q, k, v, bias, key_mask, layout.block_size, layout.num_global, dropout_p=dropout_p)
    raise ValueError(f"{layout.mode!r} is not a sparse attention mode")


_KERNEL_MODES = {AttentionMode.LOCAL: "local", AttentionMode.BLOCK: "block"}


def _uses_kernel(q: Tensor, mode: AttentionMode, dropout_p: float) -> bool:
    # The kernels take fp16/bf16/fp32; float64 (a reference run on the GPU) stays in torch.
    if not q.is_cuda or dropout_p > 0.0 or mode not in _KERNEL_MODES or q.dtype == torch.float64:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def tglobal_kernel_attention(
    q: Tensor, k: Tensor, v: Tensor, *, layout: SparseLayout, bias: RelativeBias | None, key_mask: Tensor | None,
    side_kv: tuple[Tensor, Tensor],
) -> Tensor:
    """`transient-global` through the kernels: the local window and the side keys, one softmax."""
    from t5core.kernels import transient_global_attention  # lazily: triton is only needed here

    from .attention import key_lengths_from_mask  # lazily: attention imports this module

    return transient_global_attention(
        q, k, v, None if bias is None else bias.weight, side_kv[0], side_kv[1], layout.global_table,
        layout.block_ids, local_radius=layout.local_radius,
        key_lengths=None if key_mask is None else key_lengths_from_mask(key_mask),
        num_buckets=32 if bias is None else bias.num_buckets, max_distance=128 if bias is None else bias.max_distance,
    )


def sparse_kernel_attention(
    q: Tensor, k: Tensor, v: Tensor, *, layout: SparseLayout, bias: RelativeBias | None, key_mask: Tensor | None
) -> Tensor:
    """`local` / `block` through the Triton kernels (any device Triton runs on; the interpreter on CPU)."""
    from t5core.kernels import sparse_attention  # lazily: triton is only needed here

    from .attention import key_lengths_from_mask  # lazily: attention imports this module

    key_lengths = None if key_mask is None else key_lengths_from_mask(key_mask)
    return sparse_attention(
        q, k, v, None if bias is None else bias.weight, pattern=_KERNEL_MODES[layout.mode],
        local_radius=layout.local_radius, block_size=layout.block_size, num_global=layout.num_global,
        key_lengths=key_lengths, bidirectional=True if bias is None else bias.bidirectional,
        num_buckets=32 if bias is None else bias.num_buckets, max_distance=128 if bias is None else bias.max_distance,
    )


# Score elements computed at once by the blocked torch paths (fp32: 256 MB): query blocks are
# processed in chunks of at most this many scores, so memory stays linear in the length even
# with transient-global's L x G side scores.
SCORE_BUDGET = 1 << 26


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: RelativeBias | None,
    key_mask: Tensor | None,
    local_radius: int,
    side: tuple[Tensor, ...] | None = None,  # side k, v [B,H,G,D], bias LUT [H,2G-1], visible [B,G], block ids [B,L]
    dropout_p: float = 0.0,
) -> Tensor:
    """Each query sees the keys with |q - k| <= local_radius (and, with `side`, the side keys).

    Query blocks of local_radius + 1 tokens against their block and its two neighbours
    (3 blocks, zero-padded at the ends): every key within the radius is in that window.
    Blocks are processed in chunks of SCORE_BUDGET scores (recomputed in the backward).
    """
    batch, heads, length, _ = q.shape
    block = min(local_radius + 1, length)  # one block covers a sequence shorter than the window
    valid = _valid(key_mask, batch, length, q.device)
    q_blocks = _split_blocks(q, block, dim=2)  # [B, H, nb, blk, D]
    k_window = _three_blocks(_split_blocks(k, block, dim=2), block_dim=2)  # [B, H, nb, 3blk, D]
    v_window = _three_blocks(_split_blocks(v, block, dim=2), block_dim=2)
    valid_keys = _three_blocks(_split_blocks(valid, block, dim=1), block_dim=1)  # [B, nb, 3blk]
    # True distances k - q of the window: query j of a block sits at window position blk + j.
    rel = torch.arange(3 * block, device=q.device)[None, :] - torch.arange(block, block * 2, device=q.device)[:, None]
    local_bias = None if bias is None else _bias_at(bias, rel)[:, None]  # [H, 1, blk, 3blk]
    side_k = side_v = side_lut = side_visible = block_ids = None
    if side is not None:
        side_k, side_v, side_lut, side_visible, block_ids = side
        # Padding (-1) looks up any entry: padded query rows are zeroed below.
        block_ids = _split_blocks(block_ids.clamp_min(0), block, dim=1)  # [B, nb, blk]
    keys_per_query = 3 * block + (0 if side_k is None else side_k.shape[2])
    step = max(1, SCORE_BUDGET // (batch * heads * block * keys_per_query))
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, local_bias, side_k, side_v, side_lut)
    )
    outputs = []
    for start in range(0, q_blocks.shape[2], step):
        chunk = slice(start, start + step)
        args = (q_blocks[:, :, chunk], k_window[:, :, chunk], v_window[:, :, chunk], valid_keys[:, chunk],
                local_bias, rel, local_radius, side_k, side_v, side_lut, side_visible,
                None if block_ids is None else block_ids[:, chunk], dropout_p)
        outputs.append(checkpoint(_local_chunk, *args, use_reentrant=False) if recompute else _local_chunk(*args))
    out = torch.cat(outputs, dim=2)  # [B, H, nb, blk, D]
    return _zero_padded_queries(_merge_blocks(out, length), valid)


def _local_chunk(
    q_blocks: Tensor,  # [B, H, n, blk, D]
    k_window: Tensor,  # [B, H, n, 3blk, D]
    v_window: Tensor,
    valid_keys: Tensor,  # [B, n, 3blk]
    local_bias: Tensor | None,  # [H, 1, blk, 3blk]
    rel: Tensor,  # [blk, 3blk]
    local_radius: int,
    side_k: Tensor | None,  # [B, H, G, D]
    side_v: Tensor | None,
    side_lut: Tensor | None,  # [H, 2G - 1]
    side_visible: Tensor | None,  # [B, G]
    block_ids: Tensor | None,  # [B, n, blk]
    dropout_p: float,
) -> Tensor:  # [B, H, n, blk, D]
    scores = q_blocks @ k_window.transpose(-1, -2)  # [B, H, n, blk, 3blk]; no 1/sqrt(d) in T5
    if local_bias is not None:
        scores = scores + local_bias.to(scores.dtype)
    visible = (rel.abs() <= local_radius) & valid_keys[:, None, :, None, :]  # [B, 1, n, blk, 3blk]
    values = [v_window]
    if side_k is not None:
        num_side = side_k.shape[2]
        side_scores = q_blocks @ side_k[:, :, None].transpose(-1, -2)  # [B, H, n, blk, G]
        index = torch.arange(num_side, device=q_blocks.device) - block_ids[..., None] + (num_side - 1)  # [B, n, blk, G]
        side_scores = side_scores + side_lut[:, index].movedim(0, 1).to(scores.dtype)  # [H, B, ...] -> [B, H, ...]
        scores = torch.cat([scores, side_scores], dim=-1)
        side_mask = side_visible[:, None, None, None, :].expand(*visible.shape[:-1], -1)
        visible = torch.cat([visible.expand(scores.shape[0], -1, -1, -1, -1), side_mask], dim=-1)
        values.append(side_v[:, :, None])
    return _softmax_values(scores, visible, values, dropout_p)


def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: RelativeBias | None,
    key_mask: Tensor | None,
    block_size: int,
    num_global: int,
    dropout_p: float = 0.0,
) -> Tensor:
    """Each query sees its own block of `block_size` and the first `num_global` keys; those
    first `num_global` queries see every key."""
    batch, _, length, _ = q.shape
    block = min(block_size, length)
    num_global = min(num_global, length)
    valid = _valid(key_mask, batch, length, q.device)
    q_blocks = _split_blocks(q, block, dim=2)  # [B, H, nb, blk, D]
    k_blocks = _split_blocks(k, block, dim=2)
    v_blocks = _split_blocks(v, block, dim=2)
    num_blocks = q_blocks.shape[2]
    positions = torch.arange(block, device=q.device)
    scores = q_blocks @ k_blocks.transpose(-1, -2)  # [B, H, nb, blk, blk]
    if bias is not None:  # within a block, k - q does not depend on the block
        scores = scores + _bias_at(bias, positions[None, :] - positions[:, None])[:, None].to(scores.dtype)
    visible = _split_blocks(valid, block, dim=1)[:, None, :, None, :]  # [B, 1, nb, 1, blk]
    values = [v_blocks]
    if num_global > 0:
        global_positions = torch.arange(num_global, device=q.device)
        query_positions = torch.arange(num_blocks * block, device=q.device)
        global_scores = q_blocks @ k[:, :, None, :num_global].transpose(-1, -2)  # [B, H, nb, blk, G]
        if bias is not None:
            global_bias = _bias_at(bias, global_positions[None, :] - query_positions[:, None])  # [H, nb*blk, G]
            global_scores = global_scores + global_bias.view(-1, num_blocks, block, num_global).to(scores.dtype)
        # A leading key in the query's own block is already among the block's keys: count it once.
        in_other_block = (global_positions[None, :] // block) != torch.arange(num_blocks, device=q.device)[:, None]
        global_visible = valid[:, None, None, None, :num_global] & in_other_block[None, None, :, None, :]
        scores = torch.cat([scores, global_scores], dim=-1)
        visible = torch.cat([visible.expand(batch, 1, num_blocks, block, block), global_visible.expand(
            batch, 1, num_blocks, block, num_global)], dim=-1)
        values.append(v[:, :, None, :num_global])
    out = _merge_blocks(_softmax_values(scores, visible, values, dropout_p), length)
    if num_global > 0:  # the leading queries see everything: num_global dense rows, linear in L
        rows = q[:, :, :num_global] @ k.transpose(-1, -2)  # [B, H, G, L]
        if bias is not None:
            rows = rows + bias.materialize(num_global, length)[0].to(rows.dtype)
        rows_out = _softmax_values(rows, valid[:, None, None, :], [v], dropout_p)
        out = torch.cat([rows_out, out[:, :, num_global:]], dim=2)
    return _zero_padded_queries(out, valid)


# ----------------------------------------------------------------------------- helpers
def _valid(key_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    if key_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return key_mask.bool()


def _zero_padded_queries(out: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid[:, None, :, None], out, 0.0)


def _bias_at(bias: RelativeBias, rel: Tensor) -> Tensor:
    """The table at bucket(rel) for a [Lq, Lk] grid of true distances k - q: [H, Lq, Lk]."""
    buckets = relative_position_bucket(rel, bias.bidirectional, bias.num_buckets, bias.max_distance)
    return bias.weight[buckets].permute(2, 0, 1)


def _split_blocks(x: Tensor, block: int, dim: int) -> Tensor:
    """Zero-pad `dim` to a multiple of `block` and split it into [num_blocks, block]."""
    pad = -x.shape[dim] % block
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = F.pad(x, widths)
    return x.unflatten(dim, (x.shape[dim] // block, block))


def _three_blocks(x: Tensor, block_dim: int) -> Tensor:
    """Blocks i-1, i, i+1 side by side for every block i (zero blocks beyond the ends)."""
    widths = [0, 0] * (x.dim() - 1 - block_dim) + [1, 1]
    padded = F.pad(x, widths)
    count = x.shape[block_dim]
    return torch.cat([padded.narrow(block_dim, i, count) for i in range(3)], dim=block_dim + 1)


def _merge_blocks(x: Tensor, length: int) -> Tensor:
    """[B, H, nb, blk, D] -> [B, H, length, D]."""
    return x.flatten(2, 3)[:, :, :length]


def _softmax_values(scores: Tensor, visible: Tensor, values: list[Tensor], dropout_p: float) -> Tensor:
    """softmax over the last axis (fp32) of the visible scores, times the concatenated values.

    Rows with nothing visible (padded queries) come out as a uniform average; callers zero them.
    """
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # fp32 at least, like LongT5
    scores = scores.to(softmax_dtype).masked_fill(~visible, torch.finfo(softmax_dtype).min)
    probs = torch.softmax(scores, dim=-1).to(values[0].dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out, start = None, 0
    for value in values:
        part = probs[..., start : start + value.shape[-2]] @ value
        out = part if out is None else out + part
        start += value.shape[-2]
    return out


# ------------------------------------------------------------ transient-global on plain T5
class InitialisedWeightsWarning(UserWarning):
    """Weights the checkpoint lacks were initialised by t5core (see docs/sparse.md)."""


def derive_global_weights(state: dict[str, Tensor], missing: list[str], config: T5Config) -> dict[str, Tensor]:
    """Transient-global weights for a checkpoint that has none (plain T5, LongT5-local), warning once.

    - `encoder.blocks.{i}.global_norm.weight` = that layer's self-attention norm weight: the
      side token's input then has the scale of the layer's own attention inputs, which its
      k and v projections were trained on (ones would drop that per-channel scale).
    - `encoder.global_bias.weight` = the local table, re-indexed so a side token at block
      distance d gets the bias of a token at distance d * global_block_size: the model's
      locality prior carries over to the blocks the side tokens summarise.
    """
    derived = {}
    for name in missing:
        if name == "encoder.global_bias.weight":
            derived[name] = global_bias_from_local(
                state["encoder.relative_bias.weight"], config.num_buckets, config.max_distance, config.global_block_size
            )
        elif name.startswith("encoder.blocks.") and name.endswith(".global_norm.weight"):
            derived[name] = state[name.replace(".global_norm.", ".self_attn_norm.")].clone()
        else:
            raise KeyError(f"{name} is not a transient-global weight t5core can initialise")
    if derived:
        warnings.warn(
            f"the checkpoint has no transient-global weights; initialised {len(derived)} of them "
            "(global norms = each layer's attention norm, global bias = the local table at "
            "block distance x global_block_size). Outputs differ from a trained LongT5-TGlobal model.",
            InitialisedWeightsWarning,
            stacklevel=3,
        )
    return derived


def global_bias_from_local(local_table: Tensor, num_buckets: int, max_distance: int, global_block_size: int) -> Tensor:
    """[num_buckets, H] global table: bucket b of block distances gets local[bucket(d_b * size)],
    d_b the smallest block distance in b. Buckets no distance reaches keep the local value."""
    table = local_table.clone()
    distances = sorted(range(-max_distance, max_distance + 1), key=abs)  # smallest |d| first
    block_buckets = relative_position_bucket(torch.tensor(distances), True, num_buckets, max_distance).tolist()
    token_buckets = relative_position_bucket(
        torch.tensor(distances) * global_block_size, True, num_buckets, max_distance
    ).tolist()
    seen = set()
    for block_bucket, token_bucket in zip(block_buckets, token_buckets):
        if block_bucket not in seen:
            seen.add(block_bucket)
            table[block_bucket] = local_table[token_bucket]
    return table
