"""Triton launches without the JIT's per-call Python work.

`kernel[grid](*args, **kwargs)` goes through triton's `JITFunction.run` on every call: it binds and
specialises each argument, formats the options into a cache key, builds launch metadata and
calls the (empty) launch hooks: 16-22 µs of host time for the 8-argument bias-row kernel on an
H200 host, against 6-8 µs for the compiled kernel's own launcher (tools/custom_op_cost.py,
thirteenth session); the attention kernels bind 20-50 arguments each. A training step makes
hundreds of launches.

`launch` keeps, per kernel, the compiled kernel the JIT picked, keyed by everything the JIT's
choice can depend on, and calls its launcher directly on a hit:
- every non-tensor argument by its exact value and type (so an int's specialisations, == 1 and
  divisibility by 16, and its width are implied),
- every tensor argument by dtype and 16-byte alignment (all the JIT looks at),
- the constexpr keyword arguments and launch options (num_warps, num_stages, maxnreg),
- the current device.
A miss, the interpreter, or a registered launch hook (a profiler's) takes the JIT path, so
behaviour is the JIT's; only repeated host work is skipped.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
from triton.runtime import driver

_MAX_ENTRIES = 4096  # new lengths add entries (exact int values); a full cache is dropped, not evicted


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: triton.cdiv is a constexpr function, a few µs per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton's), for host code (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on the CPU through triton's interpreter (the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _Entry:
    __slots__ = ("compiled", "tail")

    def __init__(self, compiled, tail: tuple):
        self.compiled = compiled  # triton's CompiledKernel
        self.tail = tail  # the signature's arguments after the positional ones (constexprs, defaults)


# Tools that intercept the JIT's `run` (tools/compile_check.py compiles for a GPU it does not have)
# set this: every launch then goes through the JIT.
JIT_ONLY = False
_cache: dict = {}
_signatures: dict = {}


def _tail(kernel, n_positional: int, kwargs: dict) -> tuple:
    """Values of the kernel's parameters after the first n_positional, in signature order: the
    launcher takes every argument, constexprs included, as the JIT passes them. Launch options
    (num_warps, ...) in kwargs are not parameters and are not read."""
    params = _signatures.get(kernel)
    if params is None:
        params = _signatures[kernel] = list(inspect.signature(kernel.fn).parameters.values())
    return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params[n_positional:])


def _hooks_set() -> bool:
    runtime = triton.knobs.runtime
    return any(h is not None and getattr(h, "calls", True) for h in (runtime.launch_enter_hook,
                                                                     runtime.launch_exit_hook))


def cache_key(kernel, device: int, args: tuple, kwargs: dict) -> tuple:
    """What the JIT's choice of compiled kernel can depend on (module docstring). bool is kept apart
    from int (True == 1, but the JIT types a bool i1 and specialises an int 1 to a constant)."""
    return (kernel, device, tuple(kwargs.items()),
            tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                  else (a if type(a) is int else (type(a), a)) for a in args))


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), with the compiled kernel reused when the JIT would reuse it.

    args: the runtime arguments, positional, in signature order; kwargs: constexprs and launch
    options. grid: a tuple of ints (1-3)."""
    if JIT_ONLY or interpreting():
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    key = cache_key(kernel, device, args, kwargs)
    entry = _cache.get(key)
    if entry is None or _hooks_set():
        compiled = kernel[grid](*args, **kwargs)
        if entry is None and compiled is not None:
            if len(_cache) >= _MAX_ENTRIES:
                _cache.clear()
            _cache[key] = _Entry(compiled, _tail(kernel, len(args), kwargs))
        return
    compiled = entry.compiled
    stream = driver.active.get_current_stream(device)  # what the JIT launches on
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, None, None, None, *args, *entry.tail)
