"""Text generation for `T5`: greedy, sampling and beam search over a static KV cache.

The encoder runs once; cross-attention K/V are projected once into the cache; each step
feeds only the newest token. Output rows start with the decoder start token (as the
reference's `generate`), and rows that finished early are padded with the pad id.

Beam search follows the reference's (transformers >= 4.50) vectorised algorithm, so
beams, scores, length penalty and early stopping match it token for token.

Two ways to run a step, one loop for both (docs/generation.md):
  * basic: `model.decode(tokens, cache=KVCache)`, the reference path (`fast=False`; also used
    for a model in training mode, since only it applies dropout);
  * fast (the default): `model.decode_step` over a `StaticKVCache` (fixed shapes, the cache
    length on the device; on CUDA flash-decoding kernels, captured once as a CUDA graph and
    replayed for every token, falling back to eager where capture is impossible). On the CPU
    it runs the same step with torch attention; beam search gains most there, since the
    beams of one input share its cross-attention K/V.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import AttentionMode

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
    fast: bool | None = None,
    cuda_graphs: bool | None = None,
    decode_kernel: Literal["triton", "torch"] | None = None,
    attention: str | AttentionMode | None = None,
) -> Tensor:  # [B, 1 + generated]
    """Generate ids for each input row.

    greedy (default), sampling (`do_sample=True` with temperature/top_k/top_p and an
    optional `seed`), or beam search (`num_beams > 1`, `length_penalty`, `early_stopping`).

    fast: the shape-static decode step (None = for a model in eval mode); same tokens.
    cuda_graphs: capture the fast step as a CUDA graph (None = on CUDA); falls back to eager
    with a warning when asked for explicitly but impossible; False also keeps the encoder off
    its graphs (`T5.encode`'s cuda_graph). decode_kernel: attention of the
    fast step, "triton" (flash decoding; None = on CUDA) or "torch". attention: the encoder's
    mode for this call (None: the model's own; `T5.encode`).
    """
    config = model.config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    _check_options(max_new_tokens, num_beams, do_sample, temperature, top_k, top_p)
    if num_beams > 1 and do_sample:
        raise GenerationError("beam sampling is not supported; use num_beams=1 with do_sample=True")
    if decode_kernel not in (None, "triton", "torch"):
        raise GenerationError(f"decode_kernel must be 'triton', 'torch' or None, got {decode_kernel!r}")
    # The encoder's own graphs follow cuda_graphs=False; otherwise its default (short inputs).
    encoder_hidden = model.encode(input_ids, attention_mask, attention=attention,
                                  cuda_graph=False if cuda_graphs is False else None)
    mask = None if attention_mask is None else attention_mask.bool()
    on_cuda = input_ids.is_cuda
    if fast is None:
        fast = not model.training
    if fast:
        kernel = decode_kernel or ("triton" if on_cuda else "torch")
        if kernel == "triton" and mask is not None and not _right_padded(mask):
            kernel = "torch"  # the kernel takes key lengths; the torch path reads any mask
        cache = model.new_static_cache(encoder_hidden, mask, max_new_tokens, rows_per_input=num_beams,
                                       kernel=kernel)
        step = FastStep(model, cache, on_cuda if cuda_graphs is None else cuda_graphs,
                        warn_on_fallback=cuda_graphs is True)
    else:
        if num_beams > 1:  # each input row becomes num_beams rows: [B, ...] -> [B*K, ...]
            encoder_hidden = encoder_hidden.repeat_interleave(num_beams, dim=0)
            mask = None if mask is None else mask.repeat_interleave(num_beams, dim=0)
        step = BasicStep(model, model.new_cache(encoder_hidden, mask, max_new_tokens))
    if num_beams > 1:
        return _beam_search(model, step, input_ids.shape[0], num_beams, max_new_tokens, length_penalty,
                            early_stopping, eos, pad, progress)
    generator = None
    if do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(torch.seed() if seed is None else seed)
    return _sample_or_greedy(model, step, input_ids.shape[0], max_new_tokens, eos, pad, do_sample,
                             temperature, top_k, top_p, generator, progress)


def _right_padded(mask: Tensor) -> bool:
    """Ones then zeros in every row, at least one token (what key lengths describe); one host sync."""
    lengths = mask.sum(-1)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return bool(((mask == (positions[None, :] < lengths[:, None])).all() & (lengths > 0).all()))


class BasicStep:
    """One decoder token per row through `model.decode` and the growing-view `KVCache`."""

    def __init__(self, model, cache) -> None:
        self.model, self.cache = model, cache
        self.device = model.embed.weight.device
        self.sync_every = 1  # check "all rows finished" after every token, as the reference does

    def __call__(self, tokens: Tensor) -> Tensor:  # [B, 1] -> float logits [B, V]
        return self.model.decode(tokens, cache=self.cache)[:, -1].float()

    def reorder(self, rows: Tensor) -> None:
        self.cache.reorder(rows)


class FastStep:
    """`model.decode_step` over a `StaticKVCache`, replayed as a CUDA graph after the first token.

    The first call runs eagerly (on a side stream on CUDA: it compiles the kernels and warms
    up cuBLAS); the second captures the step once, then every call replays it. Capture runs nothing, so the cache is not
    touched; every replay reads the token buffer and the device-side cache length. Where
    capture is impossible (no CUDA, a capture error), steps stay eager.
    The returned logits live in the graph's output buffer until the next call.
    """

    def __init__(self, model, cache, use_graph: bool, warn_on_fallback: bool = False) -> None:
        self.model, self.cache = model, cache
        self.device = cache.position.device
        self.use_graph = use_graph
        self.warn_on_fallback = warn_on_fallback
        self.graph = None
        self.fallback_reason: str | None = None
        self.calls = 0
        # A host check per token would stall the replayed graphs: check every 8 tokens, trim after.
        self.sync_every = 8 if self.device.type == "cuda" else 1

    def _eager(self, tokens: Tensor) -> Tensor:
        return self.model.decode_step(tokens, self.cache).float()

    def __call__(self, tokens: Tensor) -> Tensor:  # [B, 1] -> float logits [B, V]
        self.calls += 1
        if self.use_graph and self.calls == 2:  # captured lazily: a one-token generation never pays for it
            self._try_capture(tokens)
        if self.graph is not None:
            self.static_tokens.copy_(tokens)
            self.graph.replay()
            return self.static_logits
        if not (self.use_graph and self.calls == 1 and self.device.type == "cuda"):
            return self._eager(tokens)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            logits = self._eager(tokens)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return logits

    def _try_capture(self, tokens: Tensor) -> None:
        try:
            self.static_tokens = tokens.clone()
            self.graph, self.static_logits = _capture_graph(lambda: self._eager(self.static_tokens), self.device)
        except Exception as err:  # noqa: BLE001 - any capture failure means: decode eagerly
            self.graph, self.use_graph = None, False
            self.fallback_reason = f"{type(err).__name__}: {err}"
            if self.warn_on_fallback:
                warnings.warn(f"CUDA graph capture failed ({self.fallback_reason}); decoding eagerly", stacklevel=4)

    def reorder(self, rows: Tensor) -> None:
        self.cache.reorder(rows)


def _capture_graph(step: Callable[[], Tensor], device: torch.device):
    """Record `step` as a CUDA graph: (graph, its output tensor). Raises where it cannot."""
    if device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device, the model is on {device}")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


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


def _sample_or_greedy(model, step_fn, batch: int, max_new_tokens: int, eos: int, pad: int, do_sample: bool,
                      temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
                      progress: Progress | None) -> Tensor:
    device = step_fn.device
    out = torch.full((batch, 1 + max_new_tokens), pad, dtype=torch.long, device=device)
    out[:, 0] = model.config.decoder_start_token_id
    tokens = out[:, :1].clone()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # Tokens produced while some row was unfinished: the reference stops right after the last one.
    needed = torch.zeros((), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = step_fn(tokens)  # [B, V] float
        if do_sample:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
        needed += (~finished).any().long()
        finished |= next_tokens == eos
        out[:, step + 1] = next_tokens
        tokens = next_tokens[:, None]
        if progress is not None:
            progress(step + 1, max_new_tokens)
        if (step + 1) % step_fn.sync_every == 0 and bool(finished.all()):
            break
    return out[:, : 1 + int(needed)]


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


def _beam_search(model, step_fn, batch: int, num_beams: int, max_new_tokens: int, length_penalty: float,
                 early_stopping: bool | str, eos: int, pad: int, progress: Progress | None) -> Tensor:
    device = step_fn.device
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
        logits = step_fn(tokens)  # [B*K, V] float
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
        step_fn.reorder((_gather_beams(parent, survivors) + batch_offset).flatten())

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
