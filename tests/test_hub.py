"""Loading by name: aliases, local folders, hub downloads of only the needed files, offline errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import t5core
from t5core import hub


def test_aliases_cover_the_public_families():
    for name in ["t5-small", "t5-base", "flan-t5-base", "flan-t5-xxl", "t5-v1_1-base", "mt5-small", "byt5-small",
                 "umt5-small", "long-t5-tglobal-base", "long-t5-local-large"]:
        assert "/" in hub.ALIASES[name]
    assert hub.ALIASES["flan-t5-base"] == "google/flan-t5-base"


def test_local_folder_is_used_as_is(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("t5-v1_1")
    assert hub.resolve(folder) == folder


def test_download_asks_only_for_needed_files(monkeypatch, tmp_path, checkpoint_dir):
    folder, _ = checkpoint_dir("t5-v1_1")
    fake_snapshot = tmp_path / "snapshot"
    shutil.copytree(folder, fake_snapshot)
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(fake_snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.resolve("flan-t5-base") == fake_snapshot
    (repo_id, patterns), = calls
    assert repo_id == "google/flan-t5-base"
    assert "model.safetensors" in patterns and "spiece.model" in patterns and "config.json" in patterns
    assert not any(p.endswith((".bin", ".h5", ".msgpack", ".ckpt")) for p in patterns)


def test_bin_only_repositories_fall_back_to_pytorch_model_bin(monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(allow_patterns)
        return str(tmp_path)  # no *.safetensors in it

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub.resolve("t5-small")
    assert len(calls) == 2 and "pytorch_model.bin" in calls[1]


def test_offline_without_cache_says_what_to_do(tmp_path):
    """A fresh process with an empty cache in offline mode: a HubError that explains the options."""
    script = "import t5core\ntry:\n    t5core.load('flan-t5-small')\nexcept t5core.HubError as e:\n    print(e)\n"
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "not in the local hub cache" in result.stdout
    assert "HF_HUB_OFFLINE=1" in result.stdout and "pass its path" in result.stdout


def test_unknown_short_name_lists_known_names():
    with pytest.raises(t5core.HubError, match="known model name.*flan-t5-base"):
        hub.resolve("flan-t5-gigantic")


def test_load_returns_model_and_tokenizer(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir("byt5")
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    (copy / "tokenizer_config.json").write_text('{"tokenizer_class": "ByT5Tokenizer"}')
    model, tokenizer = t5core.load(copy)
    assert isinstance(model, t5core.T5)
    batch = tokenizer(["hello", "hi"])
    assert model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=3).shape[0] == 2
    encoder, _ = t5core.load(copy, encoder_only=True)
    assert isinstance(encoder, t5core.T5Encoder)


def test_default_attention_is_flash_on_cuda_and_basic_elsewhere():
    from t5core.config import AttentionMode
    from t5core.weights.load import default_dense_attention

    assert default_dense_attention("cuda", 64) is AttentionMode.FLASH
    assert default_dense_attention("cuda:1", 128) is AttentionMode.FLASH
    assert default_dense_attention("cpu", 64) is AttentionMode.BASIC
    assert default_dense_attention("cuda", 48) is AttentionMode.BASIC  # the kernel needs a power-of-two head dim


def test_cpu_default_is_basic_and_an_explicit_mode_is_kept(checkpoint_dir):
    from t5core.config import AttentionMode
    from t5core.weights import load_checkpoint

    folder, _ = checkpoint_dir("t5-v1_1")
    assert load_checkpoint(folder).config.attention is AttentionMode.BASIC  # CPU default
    assert load_checkpoint(folder, attention="flash").config.attention is AttentionMode.FLASH
