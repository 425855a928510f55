"""Typed model configuration, read from a checkpoint's `config.json`.

One dataclass holds every number the model needs. `T5Config.from_dict` reads the
Hugging Face config format for the model types t5, mt5, umt5 and longt5 (ByT5 is t5
with a byte vocabulary) and validates it, so a bad value fails here with a message
that names the field instead of deep inside a matmul.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A checkpoint config is missing a field or has a value t5core cannot run."""


class AttentionMode(str, enum.Enum):
    """How attention is computed. All modes compute the same function (tested)."""

    BASIC = "basic"  # torch reference: materialises the [B, H, Lq, Lk] bias
    FLASH = "flash"  # Triton relative-bias kernel on CUDA; chunked torch on CPU (linear memory)
    # Sparse modes (encoder self-attention only; t5core/sparse.py, docs/sparse.md). Each is its
    # own function, not an approximation of the dense one.
    LOCAL = "local"  # LongT5 local: |q - k| <= local_radius
    BLOCK = "block"  # blocks of block_size plus num_global leading tokens that see and are seen by all
    TRANSIENT_GLOBAL = "transient-global"  # LongT5 TGlobal: local + one side token per global_block_size

    @property
    def is_sparse(self) -> bool:
        return self in SPARSE_MODES


SPARSE_MODES = frozenset({AttentionMode.LOCAL, AttentionMode.BLOCK, AttentionMode.TRANSIENT_GLOBAL})
# LongT5's `encoder_attention_type` values, which are also t5core modes.
LONGT5_ENCODER_ATTENTION = ("local", "transient-global")


# Activations the reference accepts in `feed_forward_proj` ("ACT" or "gated-ACT").
# "gated-gelu" is special-cased by the reference to the tanh GELU ("gelu_new").
ACTIVATIONS = (
    "relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "gelu_accurate",
    "quick_gelu", "silu", "swish", "tanh", "sigmoid", "mish", "relu2", "relu6", "leaky_relu",
    "linear", "gelu_10", "hardswish",
)

MODEL_TYPES = ("t5", "mt5", "umt5", "longt5")


@dataclass(frozen=True)
class T5Config:
    """The numbers of a T5-family model. Field names follow the checkpoint config where short."""

    model_type: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    num_buckets: int = 32  # relative_attention_num_buckets
    max_distance: int = 128  # relative_attention_max_distance
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    activation: str = "relu"  # dense_act_fn after the reference's "gated-gelu" -> "gelu_new" rule
    gated_ffn: bool = False
    # The reference's rule: scale decoder outputs by d_model**-0.5 before the head unless the
    # raw config says `tie_word_embeddings: false` (t5 v1.0 ties and scales; v1.1/flan do not).
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    per_layer_bias: bool = False  # umt5: every self-attention layer has its own bias table
    # Encoder self-attention mode. The decoder (self and cross) always runs a dense mode:
    # see `decoder_attention`.
    attention: AttentionMode = AttentionMode.BASIC
    # Sparse-mode parameters (docs/sparse.md). LongT5 checkpoints carry the first two.
    local_radius: int = 127  # local and transient-global: keys with |q - k| <= local_radius
    global_block_size: int = 16  # transient-global: tokens summed into one side token
    block_size: int = 512  # block: T5's pretraining length, so each block sees a familiar context
    num_global: int = 16  # block: leading tokens (e.g. a task prefix) that attend and are attended everywhere
    # longt5 only: the checkpoint's `encoder_attention_type` ("local" / "transient-global"),
    # which names its encoder keys (LocalSelfAttention / TransientGlobalSelfAttention).
    checkpoint_encoder_attention: str | None = None
    # The raw config dict as read, kept so `save` writes back what was loaded.
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections: heads * d_kv (may differ from d_model)."""
        return self.num_heads * self.d_kv

    @property
    def decoder_attention(self) -> AttentionMode:
        """The mode of decoder self- and cross-attention: the chosen one if dense, else `flash`.

        Sparse encoders are for long inputs, so the decoder's cross-attention over them must
        stay linear in memory: `flash` (the kernel on CUDA, the chunked torch path on CPU).
        """
        return AttentionMode.FLASH if self.attention.is_sparse else self.attention

    @property
    def encoder_attention_type(self) -> str | None:
        """longt5: the `encoder_attention_type` this model is saved as (its mode, if a LongT5 one)."""
        if self.model_type != "longt5":
            return None
        if self.attention.value in LONGT5_ENCODER_ATTENTION:
            return self.attention.value
        return self.checkpoint_encoder_attention

    @property
    def feed_forward_proj(self) -> str:
        act = "gelu" if (self.gated_ffn and self.activation == "gelu_new") else self.activation
        return f"gated-{act}" if self.gated_ffn else act

    def replace(self, **changes: Any) -> "T5Config":
        """A copy with some fields changed, validated again."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        attention: str | AttentionMode | None = None,
        *,
        local_radius: int | None = None,
        global_block_size: int | None = None,
        block_size: int | None = None,
        num_global: int | None = None,
    ) -> "T5Config":
        """Build a config from a checkpoint `config.json` dict; raise ConfigError on bad values.

        attention: None picks the checkpoint's own mode (LongT5: its encoder_attention_type;
        otherwise basic). The sparse parameters override the checkpoint's values when given.
        """
        model_type = raw.get("model_type", "t5")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a T5-family model; t5core supports {', '.join(MODEL_TYPES)}"
            )
        checkpoint_encoder_attention = None
        if model_type == "longt5":
            checkpoint_encoder_attention = raw.get("encoder_attention_type", "local")  # the reference's default
            if checkpoint_encoder_attention not in LONGT5_ENCODER_ATTENTION:
                raise ConfigError(
                    f"config.json: encoder_attention_type {checkpoint_encoder_attention!r} is not a LongT5 "
                    f"attention; expected one of {', '.join(LONGT5_ENCODER_ATTENTION)}"
                )
        if attention is None:
            attention = checkpoint_encoder_attention or AttentionMode.BASIC
        activation, gated = parse_feed_forward_proj(raw.get("feed_forward_proj", "relu"))
        num_layers = _int(raw, "num_layers", 6)
        num_decoder_layers = raw.get("num_decoder_layers")
        decoder_start = raw.get("decoder_start_token_id")
        pad = raw.get("pad_token_id", 0)
        eos = raw.get("eos_token_id", 1)
        if isinstance(eos, list):
            if not eos:
                raise ConfigError("config.json: eos_token_id is an empty list")
            eos = eos[0]
        try:
            mode = AttentionMode(attention)
        except ValueError:
            raise ConfigError(
                f"attention={attention!r} is not a known mode; choose one of "
                + ", ".join(m.value for m in AttentionMode)
            ) from None
        config = cls(
            model_type=model_type,
            vocab_size=_int(raw, "vocab_size", 32128),
            d_model=_int(raw, "d_model", 512),
            d_kv=_int(raw, "d_kv", 64),
            d_ff=_int(raw, "d_ff", 2048),
            num_layers=num_layers,
            num_decoder_layers=num_layers if num_decoder_layers is None else _int(raw, "num_decoder_layers", 0),
            num_heads=_int(raw, "num_heads", 8),
            num_buckets=_int(raw, "relative_attention_num_buckets", 32),
            max_distance=_int(raw, "relative_attention_max_distance", 128),
            dropout_rate=float(raw.get("dropout_rate", 0.1)),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-6)),
            activation=activation,
            gated_ffn=gated,
            scale_decoder_outputs=scale_decoder_outputs(raw),
            pad_token_id=0 if pad is None else int(pad),
            eos_token_id=1 if eos is None else int(eos),
            decoder_start_token_id=(0 if pad is None else int(pad)) if decoder_start is None else int(decoder_start),
            per_layer_bias=model_type == "umt5",
            attention=mode,
            local_radius=_int(raw, "local_radius", 127) if local_radius is None else local_radius,
            global_block_size=_int(raw, "global_block_size", 16) if global_block_size is None else global_block_size,
            block_size=512 if block_size is None else block_size,
            num_global=16 if num_global is None else num_global,
            checkpoint_encoder_attention=checkpoint_encoder_attention,
            raw=dict(raw),
        )
        config.validate()
        return config

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        attention: str | AttentionMode | None = None,
        *,
        local_radius: int | None = None,
        global_block_size: int | None = None,
        block_size: int | None = None,
        num_global: int | None = None,
    ) -> "T5Config":
        """Read `config.json` (or a folder holding one); the other arguments as in `from_dict`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}; a T5 checkpoint folder needs one") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(
            raw,
            attention=attention,
            local_radius=local_radius,
            global_block_size=global_block_size,
            block_size=block_size,
            num_global=num_global,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config in the checkpoint format (the raw dict, updated with our values)."""
        out = dict(self.raw)
        out.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            dropout_rate=self.dropout_rate,
            layer_norm_epsilon=self.layer_norm_epsilon,
            feed_forward_proj=self.feed_forward_proj,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            decoder_start_token_id=self.decoder_start_token_id,
            is_encoder_decoder=True,
        )
        # Both spellings of the head-scaling rule, so v4 and v5 readers agree (see scale_decoder_outputs).
        out["scale_decoder_outputs"] = self.scale_decoder_outputs
        out["tie_word_embeddings"] = self.scale_decoder_outputs
        if self.model_type == "longt5":
            out.update(
                encoder_attention_type=self.encoder_attention_type,
                local_radius=self.local_radius,
                global_block_size=self.global_block_size,
            )
        if "architectures" not in out:
            out["architectures"] = {
                "umt5": ["UMT5ForConditionalGeneration"],
                "mt5": ["MT5ForConditionalGeneration"],
                "longt5": ["LongT5ForConditionalGeneration"],
            }.get(
                self.model_type, ["T5ForConditionalGeneration"]
            )
        return out

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        positive = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_buckets", "max_distance")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_decoder_layers < 0:
            raise ConfigError(f"num_decoder_layers must be >= 0, got {self.num_decoder_layers}")
        if self.num_buckets < 4:
            raise ConfigError(f"relative_attention_num_buckets must be >= 4, got {self.num_buckets}")
        if self.max_distance < self.num_buckets // 2:
            # Below the decoder's exact-bucket range (num_buckets / 2) the reference's log term is
            # negative and its buckets go negative (indexing the table from the end); the kernels'
            # constant-beyond-max_distance buckets would then differ from it.
            raise ConfigError(
                f"relative_attention_max_distance ({self.max_distance}) must be at least num_buckets/2 "
                f"({self.num_buckets // 2}) for the log-spaced buckets to be defined"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        self._validate_sparse()

    def _validate_sparse(self) -> None:
        if not isinstance(self.attention, AttentionMode):
            raise ConfigError(f"attention must be an AttentionMode, got {self.attention!r}")
        for name in ("local_radius", "global_block_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.num_global, bool) or not isinstance(self.num_global, int) or self.num_global < 0:
            raise ConfigError(f"num_global must be an integer >= 0, got {self.num_global!r}")
        if self.attention is AttentionMode.TRANSIENT_GLOBAL and self.per_layer_bias:
            raise ConfigError(
                "attention='transient-global' needs one relative-bias table per stack (t5, mt5, longt5); "
                "umt5 has one per layer. Use 'local' or 'block' with umt5"
            )


def scale_decoder_outputs(raw: dict[str, Any]) -> bool:
    """Whether the decoder output is scaled by d_model**-0.5 before the head.

    transformers v5 writes the decision as `scale_decoder_outputs` (and then always writes
    `tie_word_embeddings: true`); older configs encode it as "tie_word_embeddings is not false".
    """
    if "scale_decoder_outputs" in raw:
        return bool(raw["scale_decoder_outputs"])
    if raw.get("model_type") == "mt5" and str(raw.get("transformers_version", "")).startswith("5."):
        # v5's MT5 never scales, and it serialises a forced `tie_word_embeddings: true`, which
        # therefore says nothing (every released mT5 says false: no scaling either way).
        return False
    return raw.get("tie_word_embeddings", None) is not False


def parse_feed_forward_proj(value: Any) -> tuple[str, bool]:
    """`"gated-gelu"` -> ("gelu_new", True); `"relu"` -> ("relu", False); the reference's rules."""
    if not isinstance(value, str):
        raise ConfigError(f"feed_forward_proj must be a string like 'relu' or 'gated-gelu', got {value!r}")
    parts = value.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(
            f"feed_forward_proj {value!r} is not of the form 'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')"
        )
    gated = parts[0] == "gated" and len(parts) == 2
    activation = "gelu_new" if value == "gated-gelu" else parts[-1]
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"feed_forward_proj {value!r}: unknown activation {parts[-1]!r}; known: {', '.join(ACTIVATIONS)}"
        )
    return activation, gated


def _int(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json field {key} must be an integer, got {value!r}")
    return value
