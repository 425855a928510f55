"""What the interpreter test files share: the guard that they really interpret, the error measure,
and a spy on the dq kernel launches.

tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA before triton is first
imported (the interpreter is chosen when a kernel is decorated). On a CUDA machine the
compiled kernels are covered by the GPU files; run an interpreter file alone with
TRITON_INTERPRET=1 to interpret there.
"""
from __future__ import annotations

import os

import pytest
import torch


def require_interpreter(kernel, gpu_file: str) -> None:
    """Skip the calling test module unless `kernel` runs in Triton's interpreter."""
    if type(kernel).__name__.startswith("Interpreted"):
        return
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        reason = f"CUDA present: {gpu_file} covers the compiled kernels; run this file alone with TRITON_INTERPRET=1"
    else:
        reason = "triton kernels were compiled before TRITON_INTERPRET=1 was set; run tests/kernels on its own"
    pytest.skip(reason, allow_module_level=True)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||x - ref|| / ||ref||, in float64."""
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def spy_dtable_flags(monkeypatch, flash_module) -> list:
    """The DTABLE flag (the table gradient's per-bucket dS sums on or off) of every dq launch."""
    flags, launch = [], flash_module._launch

    def spy(kind, *args, **kwargs):
        if kind == "dq":
            flags.append(kwargs["DTABLE"])
        return launch(kind, *args, **kwargs)
    monkeypatch.setattr(flash_module, "_launch", spy)
    return flags
