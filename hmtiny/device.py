"""What each device can compute: the one place that knows MPS has no float64.

Code that wants float64 for exactness (e.g. to match a reference bit for bit on CPU/CUDA) asks `float64_or_32`
instead of hard-coding float64, so the same code runs on a Mac (tests force the MPS rule on CPU).
"""
from __future__ import annotations

import torch


def supports_float64(device: torch.device | str) -> bool:
    return torch.device(device).type != "mps"


def float64_or_32(device: torch.device | str) -> torch.dtype:
    """float64 where the device has it, else float32."""
    return torch.float64 if supports_float64(device) else torch.float32
