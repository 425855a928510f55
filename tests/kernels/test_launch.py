"""kernels/launch.py on the CPU: the cache key separates everything the JIT specialises on, and
the launcher gets the constexprs in signature order. (The launches themselves: test_launch_gpu.py.)"""
import torch
import triton
import triton.language as tl

from t5core.kernels import launch as launch_mod


@triton.jit
def _kernel(X, n, A: tl.constexpr, B: tl.constexpr = 3):
    pass


def key(*args, **kwargs):
    return launch_mod.cache_key(_kernel, 0, args, kwargs)


def test_equal_launches_share_a_key():
    x = torch.zeros(64)
    assert key(x, 5, A=1) == key(torch.zeros(64), 5, A=1)


def test_every_specialisation_gets_its_own_key():
    x = torch.zeros(64)
    base = key(x, 2, A=1)
    assert key(x, 1, A=1) != base  # an int 1 is a compile-time constant to the JIT
    assert key(x, 32, A=1) != base  # divisible by 16
    assert key(x, True, A=1) != key(x, 1, A=1)  # a bool is i1, not the int 1 (True == 1 in Python)
    assert key(x, 2.0, A=1) != base  # a float is fp32
    assert key(x, 2, A=2) != base  # constexprs
    assert key(x, 2, A=1, num_warps=8) != key(x, 2, A=1, num_warps=4)  # launch options
    assert key(x[1:], 2, A=1) != base  # a pointer not 16-byte aligned
    assert key(x.to(torch.float16), 2, A=1) != base  # dtype
    assert launch_mod.cache_key(_kernel, 1, (x, 2), {"A": 1}) != base  # device


def test_the_launcher_gets_constexprs_and_defaults_in_signature_order():
    assert launch_mod._tail(_kernel, 2, {"A": 5}) == (5, 3)
    assert launch_mod._tail(_kernel, 2, {"B": 7, "A": 5}) == (5, 7)
    assert launch_mod._tail(_kernel, 2, {"A": 5, "num_warps": 4, "maxnreg": 128}) == (5, 3)  # options: not params
