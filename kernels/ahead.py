"""Compile a step's Triton kernels side by side, before its first real run.

A fresh machine's first generation compiles each of its Triton kernels (about a dozen, ~0.6 s each) one after
another, as the step's first run reaches them: most of that first run's warm-up. Inside `compiling(device)`, a
launch through `launch` does not run: the kernel's compilation (Triton's `warmup`, which specialises on the same
arguments as the launch) is queued on a thread pool and the launch's output tensors are zeroed, so the step's
later operations read defined values (zero ids, zero activations: valid indices, finite numbers). Leaving the
block waits for every queued compilation; the real runs that follow find the kernels compiled (Triton's
in-process and disk caches). Part of a compilation runs outside Python's lock (ptxas is a subprocess, much of
the rest is C++), so the compilations overlap.

Only what `launch` sees is compiled ahead; any other launch in the block runs as usual. A compilation that fails
here is dropped: the real launch compiles again and reports the error where it happens.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None
_device = 0
_queued: dict = {}  # what a kernel specialises on -> its queued compilation


def active() -> bool:
    return _pool is not None


def _specialisation(kernel, args, kwargs) -> tuple:
    """What Triton compiles a launch for, near enough to queue each kernel once (a layer's 28 calls are one):
    positional arguments as Triton specialises them (tensors by dtype and 16-byte alignment, integers by == 1,
    divisibility by 16 and 32-bit range), keyword arguments (constexprs, options) by value."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return a.dtype, a.data_ptr() % 16 == 0
        if isinstance(a, bool) or a is None:
            return a
        if isinstance(a, int):
            return a == 1, a % 16 == 0, -2**31 <= a < 2**31
        if isinstance(a, float):
            return float
        return a
    return kernel, tuple(one(a) for a in args), tuple(sorted(kwargs.items()))


def launch(kernel, grid, *args, zero=(), **kwargs):
    """kernel[grid](*args, **kwargs); inside `compiling()`: its compilation queued instead, and the tensors in
    `zero` (what the kernel would have written) zeroed."""
    if _pool is None or not hasattr(kernel, "warmup"):  # (Triton's interpreter has no warmup)
        return kernel[grid](*args, **kwargs)
    key = _specialisation(kernel, args, kwargs)
    if key not in _queued:
        caches = getattr(kernel, "device_caches", None)
        if caches is not None:
            caches[_device]  # Triton creates a device's cache on first use: here, not in two threads at once
        _queued[key] = _pool.submit(kernel.warmup, *args, grid=grid, **kwargs)
    for t in zero:
        if t is not None:
            t.zero_()
    return None


@contextlib.contextmanager
def compiling(device: torch.device, workers: int | None = None):
    """Run the block's `launch` calls as queued compilations (see the module doc); wait for them at the end."""
    global _pool, _device
    if _pool is not None:  # nested: the outer block collects
        yield
        return
    cuda = device.type == "cuda"
    _device = device.index if device.index is not None else torch.cuda.current_device() if cuda else 0
    workers = workers or min(16, os.cpu_count() or 1)
    # Triton compiles for the current device: the workers' is the block's
    _pool = ThreadPoolExecutor(workers, thread_name_prefix="hmtiny-compile",
                               initializer=torch.cuda.set_device if cuda else None, initargs=(_device,) if cuda else ())
    try:
        yield
    finally:
        pool, _pool = _pool, None
        for f in _queued.values():
            f.exception()  # wait; a failure is met again by the real launch
        _queued.clear()
        pool.shutdown()
