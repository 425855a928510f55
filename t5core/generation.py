"""Text generation for `T5`: greedy, sampling and beam search over a static KV cache.

The encoder runs once; cross-attention K/V are projected once into the cache; each step
feeds only the newest token. Output rows start with the decoder start token (as the
reference's `generate`), and rows that finished early are padded with the pad id.

Beam search follows the reference's (transformers >= 4.50) vectorised algorithm, so
beams, scores, length penalty and early stopping match it token for token.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Progress = Callable[[int, int], None]  # (steps done, max steps)


class GenerationError(ValueError):
    """Invalid generation options."""


@torch.inference_mode()
def generate(
    model,
    input_ids: Tensor,  # [B, L]
    attention_mask: Tensor | None = None,  # [B, L], 1 = real token
    *,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | Literal["never"] = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    progress: Progress | None = None,
) -> Tensor:  # [B, 1 + generated]
    """Generate ids for each input row.

    greedy (default), sampling (`do_sample=True` with temperature/top_k/top_p and an
    optional `seed`), or beam search (`num_beams > 1`, `length_penalty`, `early_stopping`).
    """
    config = model.config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    _check_options(max_new_tokens, num_beams, do_sample, temperature, top_k, top_p)
    encoder_hidden = model.encode(input_ids, attention_mask)
    mask = None if attention_mask is None else attention_mask.bool()
    if num_beams > 1:
        if do_sample:
            raise GenerationError("beam sampling is not supported; use num_beams=1 with do_sample=True")
        # Each input row becomes num_beams rows: [B, ...] -> [B*K, ...]
        encoder_hidden = encoder_hidden.repeat_interleave(num_beams, dim=0)
        mask = None if mask is None else mask.repeat_interleave(num_beams, dim=0)
        cache = model.new_cache(encoder_hidden, mask, max_new_tokens)
        return _beam_search(model, cache, input_ids.shape[0], num_beams, max_new_tokens, length_penalty,
                            early_stopping, eos, pad, progress)
    cache = model.new_cache(encoder_hidden, mask, max_new_tokens)
    generator = None
    if do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(torch.seed() if seed is None else seed)
    return _sample_or_greedy(model, cache, input_ids.shape[0], max_new_tokens, eos, pad, do_sample,
                             temperature, top_k, top_p, generator, progress)


def _check_options(max_new_tokens: int, num_beams: int, do_sample: bool, temperature: float, top_k: int,
                   top_p: float) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise GenerationError(f"num_beams must be >= 1, got {num_beams}")
    if do_sample and not temperature > 0:
        raise GenerationError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def _sample_or_greedy(model, cache, batch: int, max_new_tokens: int, eos: int, pad: int, do_sample: bool,
                      temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
                      progress: Progress | None) -> Tensor:
    device = cache.cross_k[0].device if cache.cross_k else model.embed.weight.device
    tokens = torch.full((batch, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = [tokens]
    for step in range(max_new_tokens):
        logits = model.decode(tokens, cache=cache)[:, -1].float()  # [B, V]
        if do_sample:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
        finished |= next_tokens == eos
        tokens = next_tokens[:, None]
        out.append(tokens)
        if progress is not None:
            progress(step + 1, max_new_tokens)
        if bool(finished.all()):
            break
    return torch.cat(out, dim=1)


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then nucleus (top-p) filtering, as the reference's warpers: removed entries -> -inf."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _gather_beams(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, ...], index [B, M] -> [B, M, ...]."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.gather(x, 1, index.expand(*index.shape[:2], *x.shape[2:]))


def _beam_search(model, cache, batch: int, num_beams: int, max_new_tokens: int, length_penalty: float,
                 early_stopping: bool | str, eos: int, pad: int, progress: Progress | None) -> Tensor:
    device = cache.cross_k[0].device if cache.cross_k else model.embed.weight.device
    K, max_len, NEG = num_beams, 1 + max_new_tokens, -1.0e9
    keep = 2 * K  # candidates per step: enough that K survive even if K of them end in EOS
    running = torch.full((batch, K, max_len), pad, dtype=torch.long, device=device)
    running[:, :, 0] = model.config.decoder_start_token_id
    running_scores = torch.zeros(batch, K, device=device)
    running_scores[:, 1:] = NEG  # all beams start identical: expand only the first
    finished = running.clone()
    finished_scores = torch.full((batch, K), NEG, device=device)
    finished_lengths = torch.zeros(batch, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_rank = torch.arange(keep, device=device) < K
    batch_offset = torch.arange(batch, device=device)[:, None] * K
    cur_len = 1
    while True:
        tokens = running[:, :, cur_len - 1].reshape(batch * K, 1)
        logits = model.decode(tokens, cache=cache)[:, -1].float()  # [B*K, V]
        vocab = logits.shape[-1]
        scores = F.log_softmax(logits, dim=-1).view(batch, K, vocab) + running_scores[:, :, None]
        top_scores, top_index = torch.topk(scores.view(batch, K * vocab), keep)  # [B, 2K]
        parent, token = top_index // vocab, top_index % vocab
        candidates = _gather_beams(running, parent)
        candidates[:, :, cur_len] = token
        hits_stop = (token == eos) | (cur_len + 1 >= max_len)

        # The K best candidates that did not stop keep running.
        alive_scores = top_scores + hits_stop.float() * NEG
        survivors = torch.topk(alive_scores, K).indices
        running = _gather_beams(candidates, survivors)
        running_scores = _gather_beams(alive_scores, survivors)
        cache.reorder((_gather_beams(parent, survivors) + batch_offset).flatten())

        # Candidates among the top K that stopped compete with the finished hypotheses.
        generated = cur_len  # tokens generated including this one
        just_finished = hits_stop & top_rank[None, :]
        normed = top_scores / (generated**length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        normed = normed + full.float() * NEG + (~can_improve).float() * NEG + (~just_finished).float() * NEG
        merged_scores = torch.cat((finished_scores, normed), dim=1)
        best = torch.topk(merged_scores, K).indices
        finished = _gather_beams(torch.cat((finished, candidates), dim=1), best)
        finished_scores = _gather_beams(merged_scores, best)
        finished_lengths = _gather_beams(
            torch.cat((finished_lengths, torch.full_like(top_index, generated)), dim=1), best
        )
        is_finished = _gather_beams(torch.cat((is_finished, just_finished), dim=1), best)

        cur_len += 1
        if progress is not None:
            progress(cur_len - 1, max_new_tokens)
        # Could a running beam still beat the worst finished one? (the reference's heuristic)
        hypothetical = (max_len - 1) if (early_stopping == "never" and length_penalty > 0.0) else (cur_len - 1)
        best_running = running_scores[:, :1] / (hypothetical**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_full = bool(is_finished.all()) and early_stopping is True
        if not bool(can_improve.any()) or all_full or bool(hits_stop.all()):
            break
    best_rows = finished[:, 0]  # [B, max_len]
    length = 1 + int(finished_lengths[:, 0].max())
    return best_rows[:, :length]
