"""The `t5core` command line: each subcommand on a local checkpoint folder, help, and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from t5core.cli import main


@pytest.fixture
def byt5_folder(tmp_path, checkpoint_dir):
    folder, _ = checkpoint_dir("byt5")
    copy = tmp_path / "byt5"
    shutil.copytree(folder, copy)
    (copy / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))
    return copy


def test_generate_prints_one_line_per_prompt(byt5_folder, capsys):
    assert main(["generate", str(byt5_folder), "hello", "a longer prompt", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert len(out.out.rstrip("\n").split("\n")) == 2
    assert "generating [" in out.err  # progress indication


def test_generate_with_beams_and_sampling_options(byt5_folder, capsys):
    assert main(["generate", str(byt5_folder), "hi", "--num-beams", "2", "--max-new-tokens", "4"]) == 0
    assert main(["generate", str(byt5_folder), "hi", "--sample", "--top-k", "5", "--seed", "1",
                 "--max-new-tokens", "4"]) == 0


def test_encode_prints_shape_and_saves(byt5_folder, tmp_path, capsys):
    from safetensors.torch import load_file

    target = tmp_path / "hidden.safetensors"
    assert main(["encode", str(byt5_folder), "abc", "abcdef", "--save", str(target)]) == 0
    out = capsys.readouterr().out
    assert "hidden states: [2, 7, 64]" in out  # 6 bytes + </s>
    assert load_file(str(target))["hidden"].shape == (2, 7, 64)


def test_info_describes_without_loading(byt5_folder, capsys):
    assert main(["info", str(byt5_folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers (encoder/decoder)"] == "3/1"
    assert info["weight files"] == ["model.safetensors"]


def test_convert_round_trips(byt5_folder, tmp_path, capsys):
    target = tmp_path / "converted"
    assert main(["convert", str(byt5_folder), str(target), "--dtype", "bfloat16"]) == 0
    assert main(["info", str(target)]) == 0
    assert (target / "tokenizer_config.json").is_file()


def test_unknown_model_name_is_a_clear_error(capsys):
    assert main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "neither a folder nor a known model name" in err and "flan-t5-base" in err


@pytest.mark.parametrize("command", ["generate", "encode", "info", "convert", "demo"])
def test_every_subcommand_has_help(command):
    result = subprocess.run([sys.executable, "-m", "t5core.cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: t5core" in result.stdout
