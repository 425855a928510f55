"""Bad input gets a clear error naming the problem; never a silent wrong answer or a half-built model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import random_batch

from t5core import ConfigError, InputError, T5Config
from t5core.weights import CheckpointError, load_checkpoint


@pytest.fixture
def good_checkpoint(tmp_path, checkpoint_dir):
    folder, _ = checkpoint_dir("t5-v1_1")
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    return copy


def _edit_state(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_truncated_safetensors_file_is_reported(good_checkpoint):
    path = good_checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(good_checkpoint)


def test_unknown_feed_forward_proj_is_reported(good_checkpoint):
    config = json.loads((good_checkpoint / "config.json").read_text())
    config["feed_forward_proj"] = "gated-swoosh"
    (good_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="swoosh"):
        load_checkpoint(good_checkpoint)


@pytest.mark.parametrize("value", ["gelu-gated", "gated-gelu-new", 3])
def test_malformed_feed_forward_proj_is_reported(value):
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        T5Config.from_dict({"feed_forward_proj": value})


@pytest.mark.parametrize("field,value", [("d_model", 0), ("num_heads", -1), ("vocab_size", "many"),
                                         ("dropout_rate", 1.5), ("model_type", "bert")])
def test_invalid_config_values_are_reported(field, value):
    with pytest.raises(ConfigError, match=field if field != "vocab_size" else "vocab_size"):
        T5Config.from_dict({field: value})


def test_missing_layer_is_named(good_checkpoint):
    _edit_state(good_checkpoint, lambda s: [s.pop(k) for k in list(s) if k.startswith("encoder.block.2.")])
    with pytest.raises(CheckpointError, match=r"missing keys.*encoder\.block\.2\.layer\.0\.SelfAttention"):
        load_checkpoint(good_checkpoint)


def test_unexpected_key_is_named(good_checkpoint):
    def add(state):
        state["encoder.block.7.layer.0.SelfAttention.q.weight"] = torch.randn(64, 64)

    _edit_state(good_checkpoint, add)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*encoder\.block\.7"):
        load_checkpoint(good_checkpoint)


def test_shape_mismatch_is_named(good_checkpoint):
    def shrink(state):
        state["decoder.block.1.layer.2.DenseReluDense.wo.weight"] = torch.randn(64, 50)

    _edit_state(good_checkpoint, shrink)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*DenseReluDense\.wo\.weight.*\[64, 50\].*\[64, 96\]"):
        load_checkpoint(good_checkpoint)


def test_all_problems_are_listed_at_once(good_checkpoint):
    def break_twice(state):
        state.pop("encoder.final_layer_norm.weight")
        state["decoder.final_layer_norm.weight"] = torch.randn(3)

    _edit_state(good_checkpoint, break_twice)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(good_checkpoint)
    assert "encoder.final_layer_norm.weight" in str(error.value)
    assert "decoder.final_layer_norm.weight" in str(error.value)


def test_folder_without_weights_is_reported(tmp_path, good_checkpoint):
    (good_checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(good_checkpoint)


def test_checkpoint_problems_are_found_before_any_tensor_is_read(good_checkpoint, monkeypatch):
    """Keys and shapes are validated from the headers, so no half-built model can exist."""
    from t5core.weights import load as load_module

    _edit_state(good_checkpoint, lambda s: s.pop("encoder.final_layer_norm.weight"))
    monkeypatch.setattr(load_module.CheckpointReader, "get", lambda *a: pytest.fail("read a tensor"))
    with pytest.raises(CheckpointError):
        load_checkpoint(good_checkpoint)


def test_token_ids_outside_vocabulary_are_rejected(checkpoint_dir):
    folder, _ = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder)
    ids, mask = random_batch(160, [5, 3])
    ids[1, 0] = 160
    with pytest.raises(InputError, match=r"token id 160.*vocabulary \[0, 160\)"):
        model.encode(ids, mask)
    with pytest.raises(InputError, match="token id -1"):
        model.encode(torch.tensor([[-1, 4]]))


def test_empty_input_is_rejected(checkpoint_dir):
    folder, _ = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder)
    with pytest.raises(InputError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="empty"):
        model.encode(torch.zeros(0, 4, dtype=torch.long))


def test_mask_shape_mismatch_is_rejected(checkpoint_dir):
    folder, _ = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder)
    ids, mask = random_batch(160, [5, 3])
    with pytest.raises(InputError, match="attention_mask has shape"):
        model.encode(ids, mask[:, :3])


def test_unknown_attention_mode_is_rejected(good_checkpoint):
    with pytest.raises(ConfigError, match="attention='sparse-magic'"):
        load_checkpoint(good_checkpoint, attention="sparse-magic")


@pytest.mark.parametrize("attention", ["flash", "local", "block"])
def test_left_padded_mask_is_rejected_by_length_based_modes(good_checkpoint, attention):
    """The kernels describe padding by lengths; a left-padded mask gets an error, not a wrong answer."""
    model = load_checkpoint(good_checkpoint, attention=attention)
    ids, mask = random_batch(160, [6, 3])
    left_padded = mask.flip(-1)
    with pytest.raises(InputError, match="not right-padded.*attention='basic'"):
        model.encode(ids, left_padded)
    model.encode(ids, mask)  # right padding is fine
    basic = load_checkpoint(good_checkpoint, attention="basic")
    basic.encode(ids, left_padded)  # the reference path takes any mask


def test_max_distance_below_the_exact_bucket_range_is_refused():
    # 32 buckets: the decoder's exact range is 16 distances; below it the buckets are not defined.
    with pytest.raises(ConfigError, match="at least num_buckets/2"):
        T5Config.from_dict({"vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 8, "num_layers": 1, "num_heads": 2,
                            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 12})
    from t5core.kernels.bucket import bucket_lut

    with pytest.raises(ValueError, match="exact-bucket range"):  # the kernels' own guard
        bucket_lut(False, 32, 12)
    assert bucket_lut(False, 32, 16).shape == (33,)
