"""Euler integration of the flow from noise (t=0) to latent (t=1) with classifier-free guidance.

Follows the reference step by step, in float32: t and dt accumulate as float32 tensors, the in-context
frames are re-noised to the current time before every step, and the unconditional and conditional
velocities come from ONE estimator call on a batch of 2 (unconditional first, condition zeroed).
No host synchronisation inside the loop.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def solve_euler(estimator, noise: torch.Tensor, incontext: torch.Tensor, n_incontext: int, cond: torch.Tensor,
                steps: int, guidance: float) -> torch.Tensor:
    """noise, incontext [1, L, C] float32 (incontext is zero past its first n_incontext frames);
    cond [1, L, dim]. Returns the latent [1, L, C] with the in-context frames restored."""
    t_span = torch.linspace(0, 1, steps + 1, device=noise.device)
    t, dt = t_span[0], t_span[1] - t_span[0]
    x = noise.clone()
    ic = slice(0, n_incontext)
    cfg = guidance > 1.0
    # The estimator input is concat(x, incontext, cond) on channels; only x changes between steps.
    c = noise.shape[-1]
    if cfg:
        static = torch.cat([torch.cat([incontext, incontext], 0),
                            torch.cat([torch.zeros_like(cond), cond], 0)], 2)
    else:
        static = torch.cat([incontext, cond], 2)
    inp = torch.cat([torch.empty_like(noise).expand(static.shape[0], -1, -1), static], 2)
    for step in range(1, steps + 1):
        if n_incontext:
            x[:, ic] = (1 - (1 - 1e-6) * t) * noise[:, ic] + t * incontext[:, ic]
        inp[:, :, :c] = x  # broadcast over the CFG pair
        v = estimator(inp, t.reshape(1).expand(inp.shape[0]))
        if cfg:
            v_uncond, v_cond = v.chunk(2, 0)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + dt * v
        t = t + dt
        if step < steps:
            dt = t_span[step + 1] - t
    x[:, ic] = incontext[:, ic]
    return x
