"""t5core.kernels: Triton kernels for T5 attention with the relative position bias computed in-kernel.

`relative_position_bucket` (torch, identical to transformers' T5) needs no Triton; the attention
functions need Triton and a CUDA device (or TRITON_INTERPRET=1 for CPU tests).
"""
from .bucket import relative_position_bucket

try:
    from .ops import flash_attention, flash_attention_varlen, sparse_attention, transient_global_attention
except ImportError as err:  # triton missing: keep the torch bucket function importable
    _import_error = err

    def flash_attention(*args, **kwargs):
        raise ImportError(f"t5core.kernels.flash_attention needs triton: {_import_error}")

    def flash_attention_varlen(*args, **kwargs):
        raise ImportError(f"t5core.kernels.flash_attention_varlen needs triton: {_import_error}")

    def sparse_attention(*args, **kwargs):
        raise ImportError(f"t5core.kernels.sparse_attention needs triton: {_import_error}")

    def transient_global_attention(*args, **kwargs):
        raise ImportError(f"t5core.kernels.transient_global_attention needs triton: {_import_error}")

__all__ = ["flash_attention", "flash_attention_varlen", "relative_position_bucket", "sparse_attention",
           "transient_global_attention"]
