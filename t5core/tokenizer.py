"""T5 tokenizers: SentencePiece with `<extra_id_N>` sentinels, and ByT5 bytes.

Encoding follows SentencePiece itself (T5 was trained with it): the text is split on the
special-token strings and every piece in between is encoded by SentencePiece. The
`tokenizers`-backed reference in transformers v5 differs from SentencePiece on some
tie-breaks and combining marks; tests/test_tokenizer.py pins each known difference.
Decoding joins pieces as the reference's Metaspace decoder does (t5-facts A4).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece
import torch

__all__ = ["T5Tokenizer", "ByteTokenizer", "TokenizerError", "load_tokenizer"]

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
METASPACE = "\u2581"  # SentencePiece's visible space, "▁"
# Only canonical numbers: "<extra_id_05>" is plain text, as in the reference's added-token match.
_SENTINEL = r"<extra_id_(?P<sentinel>0|[1-9][0-9]*)>"


class TokenizerError(ValueError):
    """A tokenizer input, id or folder that cannot be handled; the message says why."""


class _BaseTokenizer:
    """Batching, padding and EOS rules shared by both tokenizers.

    Subclasses set pad_id/eos_id/unk_id/vocab_size/extra_ids/_special_pattern and implement
    `_encode_text(text) -> ids` (without EOS) and `_join(ids, skip_special_tokens) -> str`.
    """

    pad_id: int
    eos_id: int
    unk_id: int
    vocab_size: int
    extra_ids: int
    _special_pattern: re.Pattern
    # Special ids whose neighbouring whitespace is dropped (the reference's lstrip/rstrip).
    _strips_whitespace: frozenset[int] = frozenset()

    def sentinel_id(self, n: int) -> int:
        """Id of `<extra_id_n>`; sentinels count down from the top of the vocabulary."""
        if not 0 <= n < self.extra_ids:
            raise TokenizerError(
                f"sentinel <extra_id_{n}> out of range: this tokenizer has extra_ids={self.extra_ids}"
            )
        return self.vocab_size - 1 - n

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode_text(text)
        # As the original T5 tokenizer: append </s> unless the text already ends with it.
        if add_eos and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def _split_specials(self, text: str) -> list[str | int]:
        """Text pieces and special-token ids in order; empty text pieces dropped."""
        parts: list[str | int] = []
        start = 0
        for match in self._special_pattern.finditer(text):
            special = self._special_match_id(match)
            piece = text[start : match.start()]
            if special in self._strips_whitespace:
                piece = piece.rstrip()
            if parts and parts[-1] in self._strips_whitespace:
                piece = piece.lstrip()
            if piece:
                parts.append(piece)
            parts.append(special)
            start = match.end()
        piece = text[start:]
        if parts and parts[-1] in self._strips_whitespace:
            piece = piece.lstrip()
        if piece:
            parts.append(piece)
        return parts

    def _special_match_id(self, match: re.Match) -> int:
        if match.lastgroup == "sentinel":
            return self.sentinel_id(int(match.group("sentinel")))
        return {PAD: self.pad_id, EOS: self.eos_id, UNK: self.unk_id}[match.group(0)]

    def _special_pattern_for(self) -> re.Pattern:
        # With extra_ids=0 (mT5) "<extra_id_N>" is left to SentencePiece, whose model holds it.
        names = ([_SENTINEL] if self.extra_ids > 0 else []) + [re.escape(t) for t in (EOS, PAD, UNK)]
        return re.compile("|".join(names))

    def _checked_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise TokenizerError(f"decode() takes one row, got a tensor of shape {list(ids.shape)}")
            ids = ids.tolist()
        checked = [int(i) for i in ids]
        bad = [i for i in checked if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"ids {bad[:5]} outside the vocabulary [0, {self.vocab_size}); "
                "is this an embedding-padding column (e.g. 32100..32127 for T5)?"
            )
        return checked

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return self._join(self._checked_ids(ids), skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(rows, torch.Tensor) and rows.dim() != 2:
            raise TokenizerError(f"batch_decode() takes [B, L] rows, got shape {list(rows.shape)}")
        return [self.decode(row, skip_special_tokens) for row in rows]

    def __call__(
        self,
        texts: str | list[str],
        *,
        max_length: int | None = None,
        truncation: bool = False,
        add_eos: bool = True,
        return_tensors: bool = True,
    ) -> dict:
        """{"input_ids", "attention_mask"}: [B, L] right-padded with pad_id to the longest row."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length is not None and max_length < 1:
            raise TokenizerError(f"max_length must be >= 1, got {max_length}")
        rows = [self.encode(text, add_eos=add_eos) for text in texts]
        if max_length is not None:
            for index, row in enumerate(rows):
                if len(row) <= max_length:
                    continue
                if not truncation:
                    raise TokenizerError(
                        f"text {index} has {len(row)} tokens > max_length={max_length}; "
                        "pass truncation=True to cut it"
                    )
                # Keep </s> last so the encoder still sees an end-of-sequence.
                ends_with_eos = add_eos and row[-1] == self.eos_id
                rows[index] = row[: max_length - 1] + [self.eos_id] if ends_with_eos else row[:max_length]
        width = max((len(row) for row in rows), default=0)
        input_ids = [row + [self.pad_id] * (width - len(row)) for row in rows]
        attention_mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
        if return_tensors:
            return {
                "input_ids": torch.tensor(input_ids, dtype=torch.long).reshape(len(rows), width),
                "attention_mask": torch.tensor(attention_mask, dtype=torch.long).reshape(len(rows), width),
            }
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class T5Tokenizer(_BaseTokenizer):
    """SentencePiece T5 tokenizer; `<extra_id_N>` = vocab_size - 1 - N (t5-facts A4)."""

    def __init__(self, spiece_model_path: str | os.PathLike, extra_ids: int = 100) -> None:
        path = Path(spiece_model_path)
        if not path.is_file():
            raise TokenizerError(f"SentencePiece model not found: {path}")
        if extra_ids < 0:
            raise TokenizerError(f"extra_ids must be >= 0, got {extra_ids}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.piece_count = self.sp.get_piece_size()
        self.extra_ids = extra_ids
        self.vocab_size = self.piece_count + extra_ids
        self.pad_id, self.eos_id, self.unk_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()
        if min(self.pad_id, self.eos_id, self.unk_id) < 0:
            raise TokenizerError(
                f"{path} lacks pad/eos/unk ids (got {self.pad_id}, {self.eos_id}, {self.unk_id}); "
                "T5 models are trained with pad=0, eos=1, unk=2"
            )
        self._special_pattern = self._special_pattern_for()
        # Piece strings for decoding; pad/eos/unk are control/unknown pieces that the
        # reference decodes to their literal names.
        self._pieces = [self.sp.id_to_piece(i) for i in range(self.piece_count)]
        self._special_ids = {self.pad_id, self.eos_id, self.unk_id}
        self._special_ids.update(
            i for i in range(self.piece_count) if self.sp.is_control(i) or self.sp.is_unknown(i)
        )

    def sentinel_id(self, n: int) -> int:
        # mT5-style vocabularies carry sentinels as pieces of the model itself (extra_ids=0).
        if n >= self.extra_ids and n >= 0:
            piece_id = self.sp.piece_to_id(f"<extra_id_{n}>")
            if piece_id != self.unk_id:
                return piece_id
        return super().sentinel_id(n)

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split_specials(text):
            ids.extend(self.sp.encode(part) if isinstance(part, str) else [part])
        return ids

    def _token(self, token_id: int) -> str:
        if token_id < self.piece_count:
            return self._pieces[token_id]
        return f"<extra_id_{self.vocab_size - 1 - token_id}>"

    def _join(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i < self.piece_count and i not in self._special_ids]
        # The reference's Metaspace decoder: "▁" -> " ", and the first token loses its
        # leading space (the one SentencePiece prepended).
        words = [self._token(i).replace(METASPACE, " ") for i in ids]
        if words and words[0].startswith(" "):
            words[0] = words[0][1:]
        return "".join(words)


class ByteTokenizer(_BaseTokenizer):
    """ByT5: id = byte + 3 (0 pad, 1 eos, 2 unk); `<extra_id_N>` = vocab_size - 1 - N.

    Sentinels count down from the top as in the original ByT5 (seqio ByteVocabulary);
    transformers v5 counts them up from 259, a difference pinned in the tests.
    """

    BYTE_OFFSET = 3

    def __init__(self, extra_ids: int = 125) -> None:
        if extra_ids < 0:
            raise TokenizerError(f"extra_ids must be >= 0, got {extra_ids}")
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self.extra_ids = extra_ids
        self.vocab_size = 256 + self.BYTE_OFFSET + extra_ids
        self._special_pattern = self._special_pattern_for()
        # HF ByT5 strips whitespace around "<pad>", "</s>", "<unk>" but not around sentinels.
        self._strips_whitespace = frozenset({self.pad_id, self.eos_id, self.unk_id})

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split_specials(text):
            if isinstance(part, str):
                ids.extend(byte + self.BYTE_OFFSET for byte in part.encode("utf-8"))
            else:
                ids.append(part)
        return ids

    def _join(self, ids: list[int], skip_special_tokens: bool) -> str:
        names = {self.pad_id: PAD, self.eos_id: EOS, self.unk_id: UNK}
        # As the reference: one byte string (special names as their UTF-8), decoded once,
        # with broken UTF-8 dropped.
        text = bytearray()
        for token_id in ids:
            if self.BYTE_OFFSET <= token_id < 256 + self.BYTE_OFFSET:
                text.append(token_id - self.BYTE_OFFSET)
            elif not skip_special_tokens:
                name = names.get(token_id) or f"<extra_id_{self.vocab_size - 1 - token_id}>"
                text.extend(name.encode("utf-8"))
        return text.decode("utf-8", errors="ignore")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from error


def _configured_extra_ids(*configs: dict) -> int | None:
    """extra_ids from tokenizer_config.json / special_tokens_map.json, if stated."""
    for config in configs:
        if isinstance(config.get("extra_ids"), int):
            return config["extra_ids"]
    for config in configs:
        for key in ("additional_special_tokens", "extra_special_tokens"):
            tokens = config.get(key) or []
            names = {t.get("content") if isinstance(t, dict) else t for t in tokens}
            count = sum(1 for name in names if isinstance(name, str) and re.fullmatch(_SENTINEL, name))
            if count:
                return count
    return None


def load_tokenizer(
    folder: str | os.PathLike, model_type_hint: str | None = None
) -> T5Tokenizer | ByteTokenizer:
    """Tokenizer of a checkpoint folder: spiece.model -> T5Tokenizer, ByT5 config -> ByteTokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder not found: {folder}")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    special_tokens_map = _read_json(folder / "special_tokens_map.json")
    model_config = _read_json(folder / "config.json")
    model_type = (model_type_hint or model_config.get("model_type") or "").lower()
    extra_ids = _configured_extra_ids(tokenizer_config, special_tokens_map)
    tokenizer_class = tokenizer_config.get("tokenizer_class") or model_config.get("tokenizer_class") or ""

    is_byt5 = model_type == "byt5" or tokenizer_class.startswith("ByT5")
    if is_byt5 and not (folder / "spiece.model").is_file():
        return ByteTokenizer(extra_ids=125 if extra_ids is None else extra_ids)
    if (folder / "spiece.model").is_file():
        if extra_ids is None:
            # mT5/umT5 vocabularies already contain their sentinels as pieces.
            extra_ids = 0 if model_type in ("mt5", "umt5") else 100
        return T5Tokenizer(folder / "spiece.model", extra_ids=extra_ids)
    raise TokenizerError(
        f"no tokenizer in {folder}: expected spiece.model (T5/mT5/Flan), or for ByT5 a "
        "tokenizer_config.json / config.json with tokenizer_class ByT5Tokenizer "
        "(or model_type_hint='byt5'); found "
        f"{sorted(p.name for p in folder.iterdir())[:12]}"
    )
