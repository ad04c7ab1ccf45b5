"""Programmatic dependent launch (PDL, Hopper and later): a kernel may start while the one before it in the stream
is still running, so its launch, its start-up and its loads of constant data (weights) overlap the previous
kernel's tail instead of following it. A decode frame is hundreds of short kernels, so those gaps add up.

Contract for a kernel launched with `launch_kwargs(...)` (it receives PDL=True):
- before `tl.extra.cuda.gdc_wait()` it may only read data that no kernel of the step writes (weights, tables);
  it must not write anything;
- after the wait (which returns once the previous kernel has finished and its writes are visible) it calls
  `gdc_launch_dependents()`, so the next kernel may begin its own prologue. Calling it after the wait, not before,
  keeps at most two kernels in flight: a kernel's pre-wait reads can only overlap the one kernel before it.
Kernels launched without it (torch's, inductor's) simply wait for everything before them, as usual; a PDL kernel
after one of them loses nothing. Weights changed between steps (the engine's refresh copies) are safe to read
early as long as the copy is not the very kernel before the reader: when a kernel begins, the one two places
before it has finished (it waited for it before releasing its dependents). `HMTINY_PDL=0` turns it off (for A/B timing).
"""
from __future__ import annotations

import torch

from . import switches

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
    """Extra launch arguments for a kernel with a `PDL: tl.constexpr` parameter."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {"PDL": False}
