"""Ticket counters for kernels in which the last program of a group to finish does the group's final step
(decode_attention merges a head's key chunks, gemv adds a row block's K slices).

One zeroed int32 buffer per device serves every launch: a launch leaves each counter it used at 0 again, so no
launch needs a memset. Launches that use it must not run at the same time (one stream; with PDL they touch it
only after `gdc_wait`, i.e. once the previous kernel has finished).
"""
from __future__ import annotations

import torch

_buffers: dict = {}


def counters(device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of >= n counters for `device`. Made once, outside graph capture; under capture without
    one, a zeroed buffer of the graph's own (a memset in the graph: correct, slightly slower)."""
    buf = _buffers.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, device=device, dtype=torch.int32)
        buf = _buffers[device] = torch.zeros(max(n, 4096), device=device, dtype=torch.int32)
    return buf
