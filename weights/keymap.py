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

# Rows shared by t5, mt5 and umt5 (and the decoder of longt5).
COMMON: tuple[tuple[str, str], ...] = (
    ("{stack}.block.{i}.layer.0.SelfAttention.{proj}.weight", "{stack}.blocks.{i}.self_attn.{proj}.weight"),
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


def rows_for(model_type: str) -> tuple[tuple[str, str], ...]:
    """The table for a model family."""
    return COMMON + (PER_LAYER_BIAS if model_type == "umt5" else SHARED_BIAS)


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, regex in PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), regex)
    return re.compile(pattern + r"\Z")


@lru_cache(maxsize=None)
def _compiled(model_type: str, inverse: bool) -> tuple[tuple[re.Pattern[str], str], ...]:
    out = []
    for checkpoint, ours in rows_for(model_type):
        source, target = (ours, checkpoint) if inverse else (checkpoint, ours)
        out.append((_compile(source), target))
    return tuple(out)


def _translate(name: str, model_type: str, inverse: bool) -> str | None:
    for pattern, target in _compiled(model_type, inverse):
        match = pattern.match(name)
        if match:
            return target.format(**match.groupdict())
    return None


def to_t5core(checkpoint_name: str, model_type: str) -> str | None:
    """Checkpoint name -> t5core parameter name, or None when no row matches."""
    return _translate(checkpoint_name, model_type, inverse=False)


def to_checkpoint(t5core_name: str, model_type: str) -> str | None:
    """t5core parameter name -> checkpoint name (embedding: `shared.weight`), or None."""
    if t5core_name == EMBEDDING_PARAM:
        return EMBEDDING_KEYS[0]
    return _translate(t5core_name, model_type, inverse=True)
