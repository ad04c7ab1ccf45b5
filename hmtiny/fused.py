"""Fused training kernels for a model's RMSNorm, MLP and attention modules (forward and backward), switched on in place.

`use_fused_kernels(model)` turns every hmtiny.model.RMSNorm into FusedRMSNorm (kernels.rmsnorm.rms_norm), every
MLP into FusedMLP (its SwiGLU product through kernels.silu_mul.silu_mul) and every Attention into FusedAttention
(its RoPE through kernels.rope.rope_apply; its causal attention without a cache through
kernels.short_attention where the sequence is short, as the depth decoder's 8-9 rows are, and through SDPA as before
elsewhere, e.g. the backbone's long sequences). The maths is the model's own: each function runs exactly the
reference ops off CUDA (and inside torch.compile), and on CUDA rounds as the reference does or within one float32
ulp (the attention's sums within a few, their order differing; see their modules). Only the modules' classes
change: parameters, buffers, state-dict keys, hooks and submodules stay as they are, so the switch composes with
LoRA (hmtiny/lora.py wraps q_proj, k_proj, w1, w3 as child modules, before or after it) and with gradient
checkpointing. The captured training step (hmtiny/captured_step.py) switches them on.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels import short_attention as sa
from kernels.rmsnorm import rms_norm
from kernels.rope import rope_apply
from kernels.silu_mul import silu_mul

from .lora import group_update
from .model import MLP, Attention, RMSNorm


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class FusedMLP(MLP):
    def forward(self, x):
        gate_up = group_update((self.w1, self.w3), x) or (self.w1(x), self.w3(x))
        return self.w2(silu_mul(*gate_up))


class FusedAttention(Attention):
    rotate = staticmethod(rope_apply)

    def project(self, x):
        return group_update((self.q_proj, self.k_proj, self.v_proj), x) or super().project(x)

    @staticmethod
    def attend(q, k, v):
        if torch.is_autocast_enabled(q.device.type):  # autocast casts SDPA's inputs to its dtype; the model's are
            dtype = torch.get_autocast_dtype(q.device.type)  # in it already, others keep SDPA and its cast
            if not q.dtype == k.dtype == v.dtype == dtype:
                return Attention.attend(q, k, v)
        return sa.ShortAttention.apply(q, k, v) if sa.usable(q, k, v) else Attention.attend(q, k, v)


SWAPS = {RMSNorm: FusedRMSNorm, MLP: FusedMLP, Attention: FusedAttention}


def use_fused_kernels(model: nn.Module, on: bool = True, only: tuple = tuple(SWAPS)) -> int:
    """Switch the model's modules of the `only` classes (plain classes: RMSNorm, MLP, Attention) to their fused
    versions (on) or back (off), in place. Returns how many modules were switched."""
    pairs = [(plain, fused) if on else (fused, plain) for plain, fused in SWAPS.items() if plain in only]
    changed = 0
    for m in model.modules():
        for old, new in pairs:
            if type(m) is old:  # exactly: other classes (the codec's norms, subclasses) are left alone
                m.__class__ = new
                changed += 1
    return changed
