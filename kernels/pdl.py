"""Programmatic dependent launch (PDL, Hopper and later): a kernel may start while the one before it in the stream
is still running, so its launch, its start-up and its loads of constant data (weights) overlap the previous
kernel's tail instead of following it. A decode frame is hundreds of short kernels, so those gaps add up.

Contract for a kernel launched with `launch_kwargs(...)` (it receives PDL = 1 or 2):
- before `tl.extra.cuda.gdc_wait()` it may only read data that no kernel of the step writes (weights, tables);
  it must not write anything;
- it calls `wait(PDL)` (below): `gdc_wait()`, which returns once the previous kernel has finished and its writes are
  visible, and `gdc_launch_dependents()`, which lets the next kernel begin its own prologue. By default the release
  comes after the wait, so at most two kernels are in flight: a kernel's pre-wait reads can only overlap the one
  kernel before it. `HMTINY_PDL_EARLY=1` releases before the wait (an A/B switch; on an H100 it made the decode
  frame ~1.5% slower, bf16 and int8, bench/NOTES.md session 20, so it stays off): the next kernel may then start its
  prologue while the one before this is still running. That is still safe: a kernel is launched only once every
  program of the one before it has started, so waiting programs never hold the places that earlier kernels' programs
  need, and each kernel's post-wait part still runs after the previous kernel has finished, hence after every
  earlier one (a kernel finishes only after its own wait).
Kernels launched without it (torch's, inductor's) simply wait for everything before them, as usual, and release
the next kernel only when they finish; a PDL kernel after one of them loses nothing. So weights changed between
steps (the engine's refresh copies, torch kernels) are safe to read early: no kernel after a copy begins before
the copy has finished. `HMTINY_PDL=0` turns PDL off (for A/B timing).
"""
from __future__ import annotations

import torch

from . import switches

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    _SUPPORTED = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
except Exception:  # no Triton, or a Triton without the option
    _SUPPORTED = False


def enabled(t: torch.Tensor) -> bool:
    """PDL for kernels working on t: a CUDA device of compute capability >= 9 and a Triton that can launch it."""
    if not (_SUPPORTED and t.is_cuda) or not switches.pdl_allowed() or switches.interpreting():
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def launch_kwargs(t: torch.Tensor) -> dict:
    """Extra launch arguments for a kernel with a `PDL: tl.constexpr` parameter: 0 (no PDL), 1 (release the next
    kernel after the wait) or 2 (before it, HMTINY_PDL_EARLY=1)."""
    if not enabled(t):
        return {"PDL": 0}
    return {"PDL": 2 if switches.pdl_early() else 1, "launch_pdl": True}


if triton is not None:
    @triton.jit
    def wait(PDL: tl.constexpr):
        """A PDL kernel's wait for the kernel before it, and its release of the kernel after it (see the module
        doc); call it under `if PDL:`."""
        if PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()
