"""The flow-matching estimator: a two-stack DiT with AdaLN-single time conditioning.

Input [B, T, in_channels] = concat(noisy latent, in-context latent, condition) -> velocity [B, T, out_channels].
proj_in -> stack 1 (width W) -> modulated LayerNorm -> connection_proj(concat(input, stack 1)) -> stack 2
(width 2W, same head count, twice the head size) -> modulated LayerNorm -> proj_out.

Precision: matmuls/convs run in the parameters' dtype (or under autocast); the residual stream, norms,
modulation and the timestep features stay float32, so bf16 weights lose little. With float32 weights every
operation matches the reference's order. Attribute names equal the checkpoint's keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # -> float32
        x = x.float()
        return self.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(length: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) [length, head_dim/2], base 10000, over the whole head."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of each head; x [B, H, T, D]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # full attention, no mask
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def mlp_hidden(dim: int) -> int:
    """Llama sizing as the reference: int(2/3 * 4*dim) rounded up to a multiple of 256."""
    return 256 * math.ceil(int(2 * 4 * dim / 3) / 256)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = mlp_hidden(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm block; AdaLN-single: shift/scale/gate for attention and MLP from table + shared time vector."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = MLP(dim)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, rope) -> torch.Tensor:
        """x float32 [B, T, D] (residual stream); mod float32 [B, 6*D]."""
        dtype = self.attn.q_proj.weight.dtype
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
            self.scale_shift_table.float()[None] + mod.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
        h = self.attn_norm(x) * (1 + scale_a) + shift_a
        x = x + gate_a * self.attn(h.to(dtype), rope).float()
        h = self.mlp_norm(x) * (1 + scale_m) + shift_m
        return x + gate_m * self.mlp(h.to(dtype)).float()


class ProjectLayer(nn.Module):
    """Conv1d over time (kernel 3, 'same' padding) scaled by 1/sqrt(kernel), then a Linear."""

    def __init__(self, channels_in: int, channels_out: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.ffn_1 = nn.Conv1d(channels_in, channels_out, kernel_size, padding=kernel_size // 2)
        self.ffn_2 = nn.Linear(channels_out, channels_out)

    def forward(self, x):  # [B, T, C]
        x = self.ffn_1(x.transpose(1, 2)).transpose(1, 2)
        return self.ffn_2(x * self.kernel_size ** -0.5)


def timestep_features(t: torch.Tensor, dim: int = 512) -> torch.Tensor:
    """Sinusoidal features of flow time t [B] (float32): [cos, sin] of (t * freqs) * 1000, in that order,
    because the arguments reach 1000 rad and float32 rounding of a different order shows at 1e-5."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, device=t.device) / half).float()
    args = t.float()[:, None] * freqs[None] * 1000
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, features: int = 512):
        super().__init__()
        self.linear_1 = nn.Linear(features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class AdaLNSingle(nn.Module):
    """Time t -> (per-block modulation [B, 6D], embedding [B, D]), shared by every block of a stack."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": TimestepEmbedding(dim)})
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb["timestep_embedder"](timestep_features(t).to(dtype))
        return self.linear(F.silu(emb)).float(), emb.float()


def modulated_layer_norm(x: torch.Tensor, table: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    shift, scale = (table.float()[None] + emb[:, None]).chunk(2, dim=1)
    return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class Estimator(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, heads: int, head_dim: int,
                 num_layers: int, num_layers_2: int):
        super().__init__()
        width, width_2 = heads * head_dim, 2 * heads * head_dim
        self.head_dims = (head_dim, 2 * head_dim)
        self.proj_in = ProjectLayer(in_channels, width)
        self.transformer_blocks = nn.ModuleList(Block(width, heads, head_dim) for _ in range(num_layers))
        self.transformer_blocks_2 = nn.ModuleList(Block(width_2, heads, 2 * head_dim) for _ in range(num_layers_2))
        self.connection_proj = ProjectLayer(in_channels + width, width_2)
        self.proj_out = ProjectLayer(width_2, out_channels)
        self.scale_shift_table = nn.Parameter(torch.empty(2, width))
        self.scale_shift_table_2 = nn.Parameter(torch.empty(2, width_2))
        self.adaln_single = AdaLNSingle(width)
        self.adaln_single_2 = AdaLNSingle(width_2)
        self._rope: dict = {}  # (length, head_dim, device) -> (cos, sin); computed, never saved

    def rope(self, length: int, head_dim: int, device):
        key = (length, head_dim, str(device))
        if key not in self._rope:
            self._rope[key] = rope_tables(length, head_dim, device)
        return self._rope[key]

    def run_stack(self, h: torch.Tensor, t: torch.Tensor, blocks, adaln, table, head_dim: int) -> torch.Tensor:
        """One DiT stack on a projected input h: time modulation, the blocks on the float32 residual stream,
        the modulated final LayerNorm."""
        mod, emb = adaln(t, h.dtype)
        rope = self.rope(h.shape[1], head_dim, h.device)
        h = h.float()
        for block in blocks:
            h = block(h, mod, rope)
        return modulated_layer_norm(h, table, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, T, in_channels], t [B] float32 flow time -> float32 velocity [B, T, out_channels]."""
        x = x.to(self.proj_in.ffn_2.weight.dtype)
        s = self.run_stack(self.proj_in(x), t, self.transformer_blocks, self.adaln_single, self.scale_shift_table,
                           self.head_dims[0])
        h = self.connection_proj(torch.cat([x, s.to(x.dtype)], dim=-1))
        h = self.run_stack(h, t, self.transformer_blocks_2, self.adaln_single_2, self.scale_shift_table_2,
                           self.head_dims[1])
        return self.proj_out(h.to(x.dtype)).float()
