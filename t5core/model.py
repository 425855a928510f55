"""The T5 encoder-decoder (`T5`) and encoder-only (`T5Encoder`) models.

Parameter names are t5core's own (short and readable); `t5core.weights.keymap` maps them
to and from the checkpoint names. A block is pre-norm:

    x = x + drop(self_attn(norm(x)))          # relative bias, causal in the decoder
    x = x + drop(cross_attn(norm(x), enc))    # decoder only; no bias
    x = x + drop(ffn(norm(x)))

fp16: the reference clamps the residual stream after every sublayer and keeps `ffn.wo`
in fp32 (`_keep_in_fp32_modules`); t5core does both, so fp16 outputs match it and do not
overflow to inf. bf16 needs neither (same exponent range as fp32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import BiasArg, attend, prepare_bias
from .cache import KVCache, StaticKVCache
from .config import AttentionMode, T5Config
from .encoder_graph import EncoderGraphs, weights_key
from .layers import FeedForward, RelativeBias, RMSNorm
from .sparse import SparseLayout, global_aggregates, make_layout


class InputError(ValueError):
    """Model inputs that cannot be run (empty, ids outside the vocabulary, shape mismatch)."""


class Attention(nn.Module):
    """Multi-head attention projections around `attend`. q, k, v: d_model -> heads*d_kv."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.o = nn.Linear(config.inner_dim, config.d_model, bias=False)
        self.dropout_rate = config.dropout_rate

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.d_kv).transpose(1, 2)  # [B, L, H*D] -> [B, H, L, D]

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of `x` [B, L, d_model] -> two [B, H, L, D]."""
        return self.split_heads(self.k(x)), self.split_heads(self.v(x))

    def forward(
        self,
        x: Tensor,  # [B, Lq, d_model]
        keys: Tensor,  # [B, H, Lk, D]
        values: Tensor,  # [B, H, Lk, D]
        *,
        mode: AttentionMode,
        bias: BiasArg,
        key_mask: Tensor | None,
        causal: bool = False,
        q_offset: int = 0,
        layout: SparseLayout | None = None,
        side_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        q = self.split_heads(self.q(x))
        out = attend(
            q,
            keys,
            values,
            mode=mode,
            bias=bias,
            key_mask=key_mask,
            causal=causal,
            q_offset=q_offset,
            dropout_p=self.dropout_rate if self.training else 0.0,
            layout=layout,
            side_kv=side_kv,
        )
        return self.o(_merge_heads(out))


def _merge_heads(x: Tensor) -> Tensor:
    batch, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(batch, length, -1)  # [B, H, L, D] -> [B, L, H*D]


def _clamp_fp16(x: Tensor) -> Tensor:
    """The reference's fp16 guard: keep the residual stream finite (no host sync)."""
    if x.dtype != torch.float16:
        return x
    fmax = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), fmax - 1000, fmax)
    return torch.clamp(x, min=-limit, max=limit)


class Block(nn.Module):
    """One encoder or decoder layer."""

    def __init__(self, config: T5Config, is_decoder: bool, own_bias: bool) -> None:
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.self_attn = Attention(config)
        # UMT5: every layer owns its table; T5/mT5: only the stack does (see Stack).
        self.relative_bias = (
            RelativeBias(config.num_buckets, config.max_distance, config.num_heads, bidirectional=not is_decoder)
            if own_bias
            else None
        )
        if is_decoder:
            self.cross_attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
            self.cross_attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        if not is_decoder and config.attention is AttentionMode.TRANSIENT_GLOBAL:
            # LongT5 TGlobal: each layer normalises its own side-token inputs (t5-facts A3).
            self.global_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class Stack(nn.Module):
    """A stack of blocks with its relative bias and final norm: the encoder or the decoder."""

    def __init__(self, config: T5Config, is_decoder: bool) -> None:
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        num_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.blocks = nn.ModuleList(
            Block(config, is_decoder, own_bias=config.per_layer_bias) for _ in range(num_layers)
        )
        self.relative_bias = (
            None
            if config.per_layer_bias
            else RelativeBias(config.num_buckets, config.max_distance, config.num_heads, bidirectional=not is_decoder)
        )
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.mode = config.decoder_attention if is_decoder else config.attention
        if self.mode is AttentionMode.TRANSIENT_GLOBAL:  # side-token bias: g - block id, its own table
            self.global_bias = RelativeBias(
                config.num_buckets, config.max_distance, config.num_heads, bidirectional=True
            )

    def call_mode(self, attention: str | AttentionMode | None) -> AttentionMode:
        """The self-attention mode of one call: the stack's own (None) or `attention`.

        Every mode computes from the same weights except `transient-global`, which needs the
        layers' global norms and the global bias table: those exist only in a model loaded with
        attention='transient-global' (which initialises them for a checkpoint without them).
        """
        if attention is None:
            return self.mode
        try:
            mode = AttentionMode(attention)
        except ValueError:
            raise InputError(
                f"attention={attention!r} is not a mode; choose one of "
                f"{', '.join(repr(m.value) for m in AttentionMode)}, or None for the model's own "
                f"({self.mode.value!r})"
            ) from None
        if mode is AttentionMode.TRANSIENT_GLOBAL and self.mode is not AttentionMode.TRANSIENT_GLOBAL:
            raise InputError(
                "attention='transient-global' needs the global norms and global bias table, which this model "
                f"was loaded without (its mode is {self.mode.value!r}): load it with attention='transient-global' "
                "(a checkpoint without those weights gets them initialised, with a warning)"
            )
        return mode

    def forward(
        self,
        x: Tensor,  # [B, L, d_model] embedded tokens
        mask: Tensor | None = None,  # [B, L] bool: self-attention key mask
        encoder_hidden: Tensor | None = None,  # [B, Lenc, d_model], decoder without a cache
        encoder_mask: Tensor | None = None,  # [B, Lenc] bool
        cache: KVCache | None = None,
        *,
        mode: AttentionMode | None = None,  # this call's self-attention mode (`call_mode`); None: the stack's
    ) -> Tensor:
        mode = self.mode if mode is None else mode
        x = self.dropout(x)
        q_len = x.shape[1]
        q_offset = cache.length if cache is not None else 0
        k_len = q_offset + q_len
        if cache is not None:
            cache.check_room(q_len)
        shared_bias = prepare_bias(mode, self.relative_bias, q_len, k_len, q_offset)
        layout = None
        if mode.is_sparse:
            config = self.config if mode is self.config.attention else dataclasses.replace(self.config, attention=mode)
            layout = make_layout(config, mask, x.shape[0], q_len, getattr(self, "global_bias", None))
        for i, block in enumerate(self.blocks):
            bias = shared_bias if block.relative_bias is None else prepare_bias(
                mode, block.relative_bias, q_len, k_len, q_offset
            )
            h = block.self_attn_norm(x)
            keys, values = block.self_attn.project_kv(h)
            if cache is not None:
                keys, values = cache.append_self(i, keys, values)
            side_kv = None
            if mode is AttentionMode.TRANSIENT_GLOBAL:  # side tokens from this layer's normed input
                side_kv = block.self_attn.project_kv(block.global_norm(global_aggregates(h, layout)))
            x = x + block.dropout(
                block.self_attn(
                    h, keys, values, mode=mode, bias=bias, key_mask=mask, causal=self.is_decoder, q_offset=q_offset,
                    layout=layout, side_kv=side_kv,
                )
            )
            x = _clamp_fp16(x)
            if self.is_decoder:
                h = block.cross_attn_norm(x)
                if cache is not None:
                    cross_keys, cross_values = cache.cross_k[i], cache.cross_v[i]
                    encoder_mask = cache.encoder_mask
                else:
                    cross_keys, cross_values = block.cross_attn.project_kv(encoder_hidden)
                x = x + block.dropout(
                    block.cross_attn(h, cross_keys, cross_values, mode=mode, bias=None, key_mask=encoder_mask)
                )
                x = _clamp_fp16(x)
            x = x + block.dropout(block.ffn(block.ffn_norm(x)))
            x = _clamp_fp16(x)
        if cache is not None:
            cache.length += q_len
        return self.dropout(self.final_norm(x))


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # [B, Ldec, vocab]
    encoder_hidden: Tensor  # [B, Lenc, d_model]
    loss: Tensor | None = None


class T5(nn.Module):
    """Encoder-decoder T5 with a language-model head."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.encoder_graphs = EncoderGraphs()  # captured encoder forwards (inference on CUDA)

    def tie_head(self) -> None:
        """Use the embedding as the output head (checkpoints without `lm_head.weight`)."""
        self.lm_head.weight = self.embed.weight

    @property
    def head_is_tied(self) -> bool:
        return self.lm_head.weight is self.embed.weight

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
               attention: str | AttentionMode | None = None, cuda_graph: bool | None = None) -> Tensor:
        """input_ids [B, L] -> encoder output [B, L, d_model]. attention: the encoder's mode for
        this call (None: the model's own, `config.attention`), with the model's sparse parameters.
        cuda_graph: replay the forward from a CUDA graph (t5core/encoder_graph.py; None: for
        inference on CUDA up to GRAPH_MAX_TOKENS tokens, True: any size, False: never)."""
        check_ids(input_ids, self.config.vocab_size, "input_ids")
        mode = self.encoder.call_mode(attention)
        mask = _as_mask(attention_mask, input_ids, "attention_mask", mode)
        return _run_encoder(self, input_ids, mask, mode, cuda_graph)

    def decode(
        self,
        decoder_input_ids: Tensor,  # [B, Ldec]
        encoder_hidden: Tensor | None = None,  # [B, Lenc, d_model]; not needed with a cache
        encoder_mask: Tensor | None = None,  # [B, Lenc]
        cache: KVCache | None = None,
    ) -> Tensor:
        """Decoder tokens -> logits [B, Ldec, vocab]. With a cache, only the new tokens are passed.

        Ids are range-checked only without a cache: the check costs a host sync, and with a
        cache the ids come from the generation loop (argmax/sampling over the logits).
        """
        if cache is None:
            check_ids(decoder_input_ids, self.config.vocab_size, "decoder_input_ids")
            if encoder_hidden is None:
                raise InputError("decode needs encoder_hidden (or a KVCache made by new_cache)")
            _check_right_padded(encoder_mask, self.config.decoder_attention, "encoder_mask")
        return self._decode(decoder_input_ids, encoder_hidden, encoder_mask, cache)

    def _decode(self, decoder_input_ids: Tensor, encoder_hidden: Tensor | None, encoder_mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        """`decode` after its input checks."""
        mask = None if encoder_mask is None else encoder_mask.bool()
        x = self.decoder(self.embed(decoder_input_ids), None, encoder_hidden, mask, cache)
        if self.config.scale_decoder_outputs:
            x = x * (self.config.d_model**-0.5)  # T5 v1.0 rule for the tied head
        return self.lm_head(x.to(self.lm_head.weight.dtype))

    def new_cache(self, encoder_hidden: Tensor, encoder_mask: Tensor | None, max_length: int) -> KVCache:
        """A static KV cache for `max_length` decoder tokens; cross-attention K/V computed once here."""
        # Contiguous once here, so the per-step attention reads them without a copy.
        cross = [tuple(t.contiguous() for t in block.cross_attn.project_kv(encoder_hidden))
                 for block in self.decoder.blocks]
        mask = None if encoder_mask is None else encoder_mask.bool()
        return KVCache.allocate(self.config, encoder_hidden, cross, mask, max_length)

    def new_static_cache(
        self, encoder_hidden: Tensor, encoder_mask: Tensor | None, max_length: int, rows_per_input: int = 1,
        kernel: str = "torch",
    ) -> StaticKVCache:
        """The shape-static cache of `decode_step` (see cache.StaticKVCache); cross K/V projected once.

        encoder_hidden [B, Lenc, d_model] holds one row per input; `rows_per_input` decoder rows
        (beams) share each. encoder_mask must be right-padded (ones then zeros).
        """
        cross = [block.cross_attn.project_kv(encoder_hidden) for block in self.decoder.blocks]
        tables = [(block.relative_bias or self.decoder.relative_bias).weight for block in self.decoder.blocks]
        cache = StaticKVCache(self.config, cross, encoder_mask, tables, max_length, rows_per_input, kernel)
        # One projection instead of three per layer and step: [3 * inner, d_model], made per
        # generation (so it always matches the current weights) and dropped with the cache.
        cache.self_qkv = [torch.cat([a.q.weight, a.k.weight, a.v.weight]).detach()
                          for a in (block.self_attn for block in self.decoder.blocks)]
        return cache

    def decode_step(self, tokens: Tensor, cache: StaticKVCache) -> Tensor:
        """One decoder token per row, tokens [B, 1] -> logits [B, vocab]; shape-static (CUDA graphs).

        The same function as `decode(tokens, cache=KVCache)` (inference only: no dropout), but
        the cache length is a device tensor: no host sync, no shape that changes per step.
        """
        if len(cache.self_qkv) != len(self.decoder.blocks):
            raise ValueError("decode_step needs a cache made by this model's new_static_cache")
        key_lengths = cache.begin_step()
        x = self.embed(tokens)
        for i, block in enumerate(self.decoder.blocks):
            h = block.self_attn_norm(x)
            attn = block.self_attn
            q, keys, values = (attn.split_heads(t) for t in F.linear(h, cache.self_qkv[i]).chunk(3, dim=-1))
            cache.write_self(i, keys, values)
            out = cache.attend_self(i, q, key_lengths)
            x = _clamp_fp16(x + attn.o(_merge_heads(out)))
            h = block.cross_attn_norm(x)
            attn = block.cross_attn
            out = cache.attend_cross(i, attn.split_heads(attn.q(h)))
            x = _clamp_fp16(x + attn.o(_merge_heads(out)))
            x = _clamp_fp16(x + block.ffn(block.ffn_norm(x)))
        cache.end_step()
        x = self.decoder.final_norm(x)
        if self.config.scale_decoder_outputs:
            x = x * (self.config.d_model**-0.5)  # T5 v1.0 rule for the tied head
        return self.lm_head(x.to(self.lm_head.weight.dtype))[:, -1]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        attention: str | AttentionMode | None = None,
    ) -> Seq2SeqOutput:
        """Teacher-forced forward. `labels` (-100 = ignore) give the loss and, shifted right, the decoder input.
        attention: the encoder's mode for this call, as in `encode`."""
        if decoder_input_ids is None:
            if labels is None:
                raise InputError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        # Every check that reads values back to the host runs before the first kernel, so none
        # of them waits for the encoder.
        check_ids(decoder_input_ids, self.config.vocab_size, "decoder_input_ids")
        mode = self.encoder.call_mode(attention)
        if self.config.decoder_attention is not mode:
            _check_right_padded(attention_mask, self.config.decoder_attention, "attention_mask")
        encoder_hidden = self.encode(input_ids, attention_mask, attention=mode)
        logits = self._decode(decoder_input_ids, encoder_hidden, attention_mask, None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqOutput(logits=logits, encoder_hidden=encoder_hidden, loss=loss)

    def shift_right(self, labels: Tensor) -> Tensor:
        """[start] + labels[:-1], with -100 replaced by pad (the reference's `_shift_right`)."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options) -> Tensor:
        """Generate token ids; see `t5core.generation.generate` for the options."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **options)


class T5Encoder(nn.Module):
    """The encoder alone (embeddings, classification, retrieval)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)
        self.encoder_graphs = EncoderGraphs()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                attention: str | AttentionMode | None = None, cuda_graph: bool | None = None) -> Tensor:
        """input_ids [B, L] -> hidden states [B, L, d_model]. attention, cuda_graph: as in `T5.encode`."""
        check_ids(input_ids, self.config.vocab_size, "input_ids")
        mode = self.encoder.call_mode(attention)
        mask = _as_mask(attention_mask, input_ids, "attention_mask", mode)
        return _run_encoder(self, input_ids, mask, mode, cuda_graph)

    encode = forward


def _run_encoder(model: T5 | T5Encoder, ids: Tensor, mask: Tensor | None, mode: AttentionMode,
                 cuda_graph: bool | None) -> Tensor:
    """The encoder stack over checked ids: replayed from a CUDA graph where one serves, else eager."""
    def run(ids: Tensor, mask: Tensor | None) -> Tensor:
        return model.encoder(model.embed(ids), mask, mode=mode)

    graphs = model.encoder_graphs
    if not graphs.usable(ids, model, cuda_graph):
        return run(ids, mask)
    return graphs.encode(run, ids, mask, (mode, model.embed.weight.dtype, ids.device), weights_key(model))


def check_ids(ids: Tensor, vocab_size: int, name: str) -> None:
    """Reject empty inputs and ids outside [0, vocab_size) with a message instead of an index error."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"{name} must be an integer tensor of token ids, got {ids.dtype}")
    if ids.dim() != 2:
        raise InputError(f"{name} must have shape [batch, length], got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(ids.shape)}); give at least one token per row")
    low, high = int(ids.min()), int(ids.max())  # one host sync; an out-of-range id would read garbage on CUDA
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(
            f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}); "
            "was the text tokenized with this model's tokenizer?"
        )


def _as_mask(mask: Tensor | None, ids: Tensor, name: str, mode: AttentionMode) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != ids.shape:
        raise InputError(f"{name} has shape {tuple(mask.shape)} but the ids have shape {tuple(ids.shape)}")
    _check_right_padded(mask, mode, name)
    return mask.bool()


# Modes whose kernels describe padding by per-row lengths (right padding only).
_LENGTH_MODES = (AttentionMode.FLASH, AttentionMode.LOCAL, AttentionMode.BLOCK)


def _check_right_padded(mask: Tensor | None, mode: AttentionMode, name: str) -> None:
    """Reject masks with holes or left padding in the length-based modes (one host sync).

    Checked on every device, so a model behaves the same on the CPU and the GPU; without it
    the kernels' device-side check would end the CUDA context instead of raising.
    """
    if mask is None or mode not in _LENGTH_MODES:
        return
    mask = mask.bool()
    lengths = mask.sum(-1, keepdim=True)
    if not bool((mask == (torch.arange(mask.shape[-1], device=mask.device) < lengths)).all()):
        raise InputError(
            f"{name} is not right-padded (ones then zeros in every row), which attention='{mode.value}' needs: "
            "pad on the right (t5core's tokenizer does), or load the model with attention='basic'"
        )


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters to `dtype`, keeping `ffn.wo` in fp32 under fp16 as the reference does."""
    model.to(dtype)
    if dtype == torch.float16:
        for module in model.modules():
            if isinstance(module, FeedForward):
                module.wo.float()
    return model
