"""What each device can compute: the one place that knows MPS has no float64.

Code that wants float64 for exactness (e.g. to match a reference bit for bit on CPU/CUDA) asks `supports_float64`
instead of hard-coding float64, so the same code runs on a Mac (tests force the MPS rule on CPU).
"""
from __future__ import annotations

import torch


def supports_float64(device: torch.device | str) -> bool:
    return torch.device(device).type != "mps"
