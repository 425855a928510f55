"""The package must never import transformers (it is a test oracle only)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_running_t5core_never_imports_transformers(checkpoint_dir):
    folder, _ = checkpoint_dir("t5-v1_1")
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("t5core imported transformers")
        sys.meta_path.insert(0, Block())
        import torch, t5core, t5core.weights, t5core.tokenizer, t5core.cli, t5core.generation
        from t5core.weights import load_checkpoint, save_checkpoint
        model = load_checkpoint({str(folder)!r})
        ids = torch.tensor([[5, 6, 7, 1]])
        model.generate(ids, max_new_tokens=3)
        model.generate(ids, max_new_tokens=3, num_beams=2)
        assert not any(m.split(".")[0] == "transformers" for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
