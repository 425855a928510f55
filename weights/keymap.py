"""The map between checkpoint parameter names and t5core's own, as data.

Each row is (checkpoint template, t5core template). Placeholders: `{stack}` encoder or
decoder, `{i}` a layer index, `{proj}` q/k/v/o, `{w}` a feed-forward weight. The forward
map and the inverse come from the same rows. The embedding and the head are resolved by
`load.py` (several checkpoint names can hold them), so they are not rows here.
"""

from __future__ import annotations

import re
from functools import lru_cache

PLACEHOLDERS = {
    "stack": r"(?P<stack>encoder|decoder)",
    "i": r"(?P<i>\d+)",
    "proj": r"(?P<proj>q|k|v|o)",
    "w": r"(?P<w>wi|wi_0|wi_1|wo)",
}

# Rows shared by every family (longt5 too: its decoder and its layer norms use T5's names).
COMMON: tuple[tuple[str, str], ...] = (
    ("{stack}.block.{i}.layer.0.layer_norm.weight", "{stack}.blocks.{i}.self_attn_norm.weight"),
    ("decoder.block.{i}.layer.1.EncDecAttention.{proj}.weight", "decoder.blocks.{i}.cross_attn.{proj}.weight"),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.blocks.{i}.cross_attn_norm.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.{w}.weight", "encoder.blocks.{i}.ffn.{w}.weight"),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.blocks.{i}.ffn_norm.weight"),
    ("decoder.block.{i}.layer.2.DenseReluDense.{w}.weight", "decoder.blocks.{i}.ffn.{w}.weight"),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.blocks.{i}.ffn_norm.weight"),
    ("{stack}.final_layer_norm.weight", "{stack}.final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)

# Dense self-attention: both stacks of t5/mt5/umt5; the decoder of longt5.
SELF_ATTENTION = (
    ("{stack}.block.{i}.layer.0.SelfAttention.{proj}.weight", "{stack}.blocks.{i}.self_attn.{proj}.weight"),
)
DECODER_SELF_ATTENTION = (
    ("decoder.block.{i}.layer.0.SelfAttention.{proj}.weight", "decoder.blocks.{i}.self_attn.{proj}.weight"),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder.relative_bias.weight"),
)

# longt5 encoders, by `encoder_attention_type`. The tables live in block 0; every TGlobal
# layer has its own global_input_layer_norm (t5-facts A2).
LONGT5_LOCAL = (
    ("encoder.block.{i}.layer.0.LocalSelfAttention.{proj}.weight", "encoder.blocks.{i}.self_attn.{proj}.weight"),
    ("encoder.block.0.layer.0.LocalSelfAttention.relative_attention_bias.weight", "encoder.relative_bias.weight"),
)
LONGT5_TRANSIENT_GLOBAL = (
    ("encoder.block.{i}.layer.0.TransientGlobalSelfAttention.{proj}.weight",
     "encoder.blocks.{i}.self_attn.{proj}.weight"),
    ("encoder.block.{i}.layer.0.TransientGlobalSelfAttention.global_input_layer_norm.weight",
     "encoder.blocks.{i}.global_norm.weight"),
    ("encoder.block.0.layer.0.TransientGlobalSelfAttention.relative_attention_bias.weight",
     "encoder.relative_bias.weight"),
    ("encoder.block.0.layer.0.TransientGlobalSelfAttention.global_relative_attention_bias.weight",
     "encoder.global_bias.weight"),
)
LONGT5_ENCODERS = {"local": LONGT5_LOCAL, "transient-global": LONGT5_TRANSIENT_GLOBAL}

# t5/mt5: one table per stack, stored in block 0.
SHARED_BIAS = (
    ("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "{stack}.relative_bias.weight"),
)
# umt5: one table per self-attention layer.
PER_LAYER_BIAS = (
    ("{stack}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight", "{stack}.blocks.{i}.relative_bias.weight"),
)

# Checkpoint names that may hold the token embedding, in the order they are trusted.
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
EMBEDDING_PARAM = "embed.weight"

# Keys the reference ignores when loading.
IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def rows_for(model_type: str, encoder_attention_type: str | None = None) -> tuple[tuple[str, str], ...]:
    """The table for a model family (longt5: and its `encoder_attention_type`, default local)."""
    if model_type == "longt5":
        return COMMON + DECODER_SELF_ATTENTION + LONGT5_ENCODERS[encoder_attention_type or "local"]
    return COMMON + SELF_ATTENTION + (PER_LAYER_BIAS if model_type == "umt5" else SHARED_BIAS)


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, regex in PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), regex)
    return re.compile(pattern + r"\Z")


@lru_cache(maxsize=None)
def _compiled(
    model_type: str, encoder_attention_type: str | None, inverse: bool
) -> tuple[tuple[re.Pattern[str], str], ...]:
    out = []
    for checkpoint, ours in rows_for(model_type, encoder_attention_type):
        source, target = (ours, checkpoint) if inverse else (checkpoint, ours)
        out.append((_compile(source), target))
    return tuple(out)


def _translate(name: str, model_type: str, encoder_attention_type: str | None, inverse: bool) -> str | None:
    for pattern, target in _compiled(model_type, encoder_attention_type, inverse):
        match = pattern.match(name)
        if match:
            return target.format(**match.groupdict())
    return None


def to_t5core(checkpoint_name: str, model_type: str, encoder_attention_type: str | None = None) -> str | None:
    """Checkpoint name -> t5core parameter name, or None when no row matches."""
    return _translate(checkpoint_name, model_type, encoder_attention_type, inverse=False)


def to_checkpoint(t5core_name: str, model_type: str, encoder_attention_type: str | None = None) -> str | None:
    """t5core parameter name -> checkpoint name (embedding: `shared.weight`), or None."""
    if t5core_name == EMBEDDING_PARAM:
        return EMBEDDING_KEYS[0]
    return _translate(t5core_name, model_type, encoder_attention_type, inverse=True)
