"""Float64 torch reference for T5 attention: materialised bias, masks, softmax."""
from __future__ import annotations

import torch

from t5core.kernels import relative_position_bucket


def reference_attention(q, k, v, table, *, bidirectional=True, num_buckets=32, max_distance=128,
                        causal=False, q_offset=0, key_lengths=None):
    """softmax(q kᵀ + table[bucket(k - q), h] + masks) v in the inputs' dtype (use float64).

    Rows with no visible key give 0 (the kernel's contract), not NaN.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2)  # T5: no 1/sqrt(d)
    dev = q.device
    rel = torch.arange(lk, device=dev)[None, :] - (torch.arange(lq, device=dev)[:, None] + q_offset)
    if table is not None:
        bucket = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
        scores = scores + table[bucket].permute(2, 0, 1).to(scores.dtype)  # [H, Lq, Lk]
    visible = torch.ones(q.shape[0], 1, lq, lk, dtype=torch.bool, device=dev)
    if causal:
        visible = visible & (rel <= 0)
    if key_lengths is not None:
        visible = visible & (torch.arange(lk, device=dev)[None, None, None, :] < key_lengths.to(dev).view(-1, 1, 1, 1))
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def reference_varlen(q, k, v, table, cu_q, cu_k, **kwargs):
    """Packed [T, H, D] documents, each attended separately with positions restarting at 0."""
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        o = reference_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                v[ks].transpose(0, 1)[None], table, **kwargs)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)


def sparse_visible(length, pattern, *, local_radius=0, block_size=1, num_global=0, device=None):
    """[L, L] bool: query i sees key j under a sparse pattern (docs/sparse.md), written as a mask."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    if pattern == "local":
        return (k - q).abs() <= local_radius
    if pattern == "block":
        return (q // block_size == k // block_size) | (k < num_global) | (q < num_global)
    raise ValueError(pattern)


def reference_sparse(q, k, v, table, pattern, *, key_lengths=None, num_buckets=32, max_distance=128, **params):
    """Sparse encoder self-attention as dense attention with an [L, L] mask: bias at the true
    distance (bidirectional), padded keys hidden, padded query rows 0 (use float64)."""
    length = q.shape[-2]
    scores = q @ k.transpose(-1, -2)  # T5: no 1/sqrt(d)
    rel = torch.arange(length, device=q.device)[None, :] - torch.arange(length, device=q.device)[:, None]
    if table is not None:
        scores = scores + table[relative_position_bucket(rel, True, num_buckets, max_distance)].permute(2, 0, 1)
    lengths = torch.full((q.shape[0],), length) if key_lengths is None else key_lengths.cpu()
    real = (torch.arange(length)[None, :] < lengths[:, None]).to(q.device)  # [B, L]
    visible = sparse_visible(length, pattern, device=q.device, **params)[None, None] & real[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v) * real[:, None, :, None]
