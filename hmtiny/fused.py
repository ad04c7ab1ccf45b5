"""Opt-in fused elementwise kernels for a model's MLP and attention (training: forward and backward).

`use_fused_elementwise(model)` switches every hmtiny.model.MLP to FusedMLP, whose SwiGLU product is
kernels.silu_mul.silu_mul, and every Attention to FusedAttention, whose RoPE is kernels.rope.rope_apply. The maths
is the model's own: both functions run exactly the reference ops off CUDA (and inside torch.compile), and on CUDA
round as the reference does (see their modules). The switch changes the modules' classes in place: parameters,
buffers, state-dict keys and submodules stay as they are, so it composes with LoRA (hmtiny/lora.py wraps q_proj,
k_proj, w1, w3 as child modules, before or after the switch) and with gradient checkpointing.
"""
from __future__ import annotations

import torch.nn as nn

from kernels.rope import rope_apply
from kernels.silu_mul import silu_mul

from .model import MLP, Attention


class FusedMLP(MLP):
    def forward(self, x):
        return self.w2(silu_mul(self.w1(x), self.w3(x)))


class FusedAttention(Attention):
    rotate = staticmethod(rope_apply)


SWAPS = {MLP: FusedMLP, Attention: FusedAttention}


def use_fused_elementwise(model: nn.Module, on: bool = True) -> int:
    """Switch the model's MLP and Attention modules to the fused kernels (on) or back (off), in place. Returns how
    many modules were switched."""
    pairs = SWAPS.items() if on else [(fused, plain) for plain, fused in SWAPS.items()]
    changed = 0
    for m in model.modules():
        for old, new in pairs:
            if type(m) is old:
                m.__class__ = new
                changed += 1
    return changed
