"""Shared by the Triton test modules: the CPU interpreter re-run, the GPU mark and peak-memory
measure, and compiling the real kernels for an H100 without one.

The interpreter is chosen when ``triton.jit`` decorates the kernels, so ``TRITON_INTERPRET=1``
must be set before zoo.kernels is imported, which other test modules of the same pytest process
have already done. Each Triton test module therefore marks its interpreter tests
``needs_interpreter`` (they skip in an ordinary process) and launches itself again in fresh
``python -m pytest`` processes with the variable set, one per shard of its cases (the test that
``interpreter_suite`` makes), so that pytest-xdist's workers share the interpreter's work.
"""

import contextlib
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

try:
    from zoo.kernels.triton_common import interpreter_active
except ImportError:  # no triton on this platform: the modules importorskip it anyway
    INTERPRETED = False
else:
    INTERPRETED = interpreter_active()

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_interpreter_suite")
not_interpreted = pytest.mark.skipif(
    INTERPRETED, reason="this process is the interpreter run")


def gpu(test):
    """Mark a test as needing a CUDA device (``-m gpu`` selects them; they skip without one)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs a CUDA device")(test))


def dtype_in_turn(names, dtypes):
    """``(name, dtype)`` pairs for the interpreter's named cases: each pattern once, the dtypes
    taken in turn, so each dtype meets a share of the patterns. Every pattern in every dtype
    costs the interpreter three times as long (the named NA cases took 275 of its 767 CPU
    seconds), and the seeded random cases already cross the dtypes with every knob."""
    return [pytest.param(name, dtype, id=f"{name}-{dtype}")
            for name, dtype in zip(names, itertools.cycle(dtypes))]


def peak_memory(run):
    """Run ``run()`` and a backward of its output's sum on CUDA; return the output and the peak
    memory (bytes) allocated on top of what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    out.sum().backward()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def run_interpreter_suite(test_file: str, min_passed: int, shard: int = 0, shards: int = 1,
                          timeout: int = 1200) -> None:
    """Run shard ``shard`` of ``shards`` of ``test_file``'s CPU tests under the interpreter (every
    ``shards``-th test that can run there, tests/conftest.py); fail with the output's tail unless
    they pass and at least ``min_passed // shards`` of them ran, ``min_passed`` being the
    file's whole count (so the interpreter cases did run)."""
    env = dict(os.environ, TRITON_INTERPRET="1", ZOO_TEST_SHARD=f"{shard}/{shards}")
    env.pop("ZOO_ATTENTION_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-m", "not gpu", "-p",
           "no:cacheprovider", "-x", "--no-header"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"TRITON_INTERPRET=1 run failed:\n{tail}"
    passed = re.search(r"(\d+) passed", tail)
    assert passed and int(passed.group(1)) >= min_passed // shards, tail


def interpreter_suite(test_file: str, min_passed: int, shards: int):
    """The ordinary process's test that runs ``test_file``'s interpreter cases: one test per
    shard, each a ``run_interpreter_suite`` subprocess. A module binds it to a ``test_`` name."""
    @not_interpreted
    @pytest.mark.parametrize("shard", range(shards))
    def test_interpreter_suite(shard):
        run_interpreter_suite(test_file, min_passed, shard=shard, shards=shards)
    return test_interpreter_suite


@contextlib.contextmanager
def compiled_for_sm90():
    """Inside: the kernels' launches compile for an H100 (sm_90) and never run, through the host
    code the ops use (argument types, strides, launch configuration and precision as on a GPU),
    on CPU tensors and without a GPU: a stand-in driver names the target, and launches become
    Triton's warmup (compile only). The interpreter is lenient; what only the compiler rejects
    fails here. Yields the list of (kernel name, compiled kernel) it fills; each compiled kernel
    holds its cubin (ptxas, which Triton ships, assembled it)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from zoo.kernels import triton_common

    class SM90:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled, touched, launch = [], set(), JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        kernel = kernel.result() if hasattr(kernel, "result") else kernel  # async compile
        compiled.append((self.fn.__name__, kernel))
        touched.add(self)
        return kernel

    gpu_rules, active = triton_common.compiles_for_gpu, driver._active  # None until first use
    driver.set_active(SM90())
    JITFunction.run = compile_only
    triton_common.compiles_for_gpu = lambda t: True
    try:
        yield compiled
    finally:
        triton_common.compiles_for_gpu = gpu_rules
        JITFunction.run = launch
        driver._active = active  # not reset_active(): it builds the default driver, which fails without a GPU
        for fn in touched:  # their per-device caches hold the stand-in's target and sm_90 kernels
            fn.device_caches.clear()
