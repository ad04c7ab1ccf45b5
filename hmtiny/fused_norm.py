"""Opt-in: the model's RMSNorms through kernels/rmsnorm.py's fused forward and backward (training on CUDA).

`use_fused_norms(model)` turns every hmtiny.model.RMSNorm of a model into a FusedRMSNorm: the same module with
its class swapped, so parameters, state dict keys, hooks and devices stay as they are; only forward changes. The
maths is RMSNorm's (kernels/rmsnorm.py says where its float32 rounding may differ by one ulp); off CUDA the fused
function runs the same torch ops as RMSNorm, so results there are identical.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.rmsnorm import rms_norm

from .model import RMSNorm


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


def use_fused_norms(model: nn.Module, enabled: bool = True) -> int:
    """Switch model's RMSNorms to the fused function (or back, enabled=False); returns how many were switched."""
    old, new = (RMSNorm, FusedRMSNorm) if enabled else (FusedRMSNorm, RMSNorm)
    count = 0
    for module in model.modules():
        if type(module) is old:  # exactly: other norm classes (the codec's) are left alone
            module.__class__ = new
            count += 1
    return count
