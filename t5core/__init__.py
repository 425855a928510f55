"""t5core: the T5 encoder-decoder family in plain PyTorch, with relative-bias Triton kernels.

    model, tokenizer = t5core.load("flan-t5-base")
    batch = tokenizer(["translate English to German: Hello"])
    ids = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=32)
    print(tokenizer.batch_decode(ids))

Heavy dependencies (huggingface-hub, triton) are imported only where they are used.
"""

from .config import AttentionMode, ConfigError, T5Config
from .hub import ALIASES, HubError, load
from .model import InputError, T5, T5Encoder

__all__ = ["load", "T5", "T5Encoder", "T5Config", "AttentionMode", "ConfigError", "HubError", "InputError", "ALIASES"]
__version__ = "0.1.0"
