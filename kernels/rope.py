"""RoPE of the training step's q and k as one Triton kernel forward and one backward.

hmtiny.model.apply_rope builds complex views in float32: the training step spends a cast, the complex multiply
and a cast back on each of q and k (and again in the backward, plus the conjugate's copy), each a full pass. Here
the forward reads x and the (cos, sin) table once and writes the rotated x in its dtype; the backward rotates the
incoming gradient by the conjugate (cos, -sin), also in one pass. Nothing of x's size is saved for the backward.

Rounding follows the reference: float32 products x0*cos, x1*sin, x1*cos, x0*sin, then the subtraction or addition,
rounded once to x.dtype; the backward the same with -sin, which is what autograd computes (grad * conj(turn)), so
it is rounded once too. The products are `mul.rn.f32` on the GPU (kernels/decode_attention.py `_mul_rn`: never
contracted into an FMA), so results equal `rope_ref` and its autograd bit for bit wherever torch's complex multiply
rounds each product (as kernels/decode_attention.py's RoPE found for the eager path).

Layout: x [B, S, H, D] with D even, any strides but the last (1): the backward's gradient is the transposed view
SDPA's [B, H, S, D] gradient leaves. The table is float32 [S, D/2, 2] or [B, S, D/2, 2] (also broadcast over size-1
B or S), its last two dims contiguous; interleaved (cos, sin) pairs line up element for element with x's
interleaved (x[2i], x[2i+1]) pairs, so both load as contiguous rows. A program takes 1024 elements: a chunk of one
token's H x D (q and k of the real model), or several whole tokens where H x D is smaller. Outputs are contiguous
[B, S, H, D] in x's dtype.

Kernel path: CUDA (or TRITON_INTERPRET=1, the tests), triton importable, x bf16/fp16/fp32 [B, S, H, D], D even,
the table as above and not requiring grad, not inside torch.compile (inductor fuses the reference). Anything else
runs the reference through autograd. No host syncs: CUDA graphs capture it. `tests/test_rope.py` holds it to the
reference (and the reference to hmtiny.model.apply_rope); `bench/bench_train_fusions.py` times it.
"""
from __future__ import annotations

import torch

from . import switches

try:
    import triton
    import triton.language as tl

    from .decode_attention import _mul_rn
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
MAX_BLOCK = 1024  # elements of one token's H x D per program (8 a thread with 4 warps)


def rope_ref(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """The plain-torch definition, hmtiny.model.apply_rope op for op (tests/test_rope.py holds them equal)."""
    xs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    if rope.dim() == 3:
        rope = rope[None]
    turn = torch.view_as_complex(rope.contiguous())[:, :, None]  # [B or 1, S, 1, D/2]
    return torch.view_as_real(xs * turn).flatten(-2).type_as(x)


if triton is not None:
    @triton.jit
    def _rope_kernel(x_ptr, t_ptr, y_ptr, T, S, HD, sx_b, sx_s, sx_h, st_b, st_s, D: tl.constexpr,
                     TOKENS: tl.constexpr, BLOCK: tl.constexpr, CONJ: tl.constexpr, EXACT: tl.constexpr):
        tok = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)  # tokens (b, s) of this program
        b, s = tok // S, tok % S
        e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # elements of a token's H x D
        h, d = e // D, e % D
        inside = (tok < T)[:, None] & (e < HD)[None, :]  # D is even: masked lanes are whole pairs
        x_row = b.to(tl.int64) * sx_b + s.to(tl.int64) * sx_s
        x = tl.load(x_ptr + x_row[:, None] + (h * sx_h + d)[None, :], mask=inside, other=0.0).to(tl.float32)
        # a table row (cos0, sin0, cos1, sin1, ...): its element d belongs to x's element d
        t_row = b.to(tl.int64) * st_b + s.to(tl.int64) * st_s
        cs = tl.load(t_ptr + t_row[:, None] + d[None, :], mask=inside, other=0.0)
        x0, x1 = tl.split(tl.reshape(x, (TOKENS, BLOCK // 2, 2)))
        cos, sin = tl.split(tl.reshape(cs, (TOKENS, BLOCK // 2, 2)))
        if CONJ:
            sin = -sin
        y0 = _mul_rn(x0, cos, EXACT) - _mul_rn(x1, sin, EXACT)
        y1 = _mul_rn(x1, cos, EXACT) + _mul_rn(x0, sin, EXACT)
        y = tl.reshape(tl.join(y0, y1), (TOKENS, BLOCK))
        tl.store(y_ptr + tok.to(tl.int64)[:, None] * HD + e[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)


def _table(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """rope as [B, S, D/2, 2] (broadcast dims of stride 0)."""
    B, S, _, D = x.shape
    return (rope if rope.dim() == 4 else rope[None]).expand(B, S, D // 2, 2)


def rope_rotate(x: torch.Tensor, rope: torch.Tensor, conj: bool = False) -> torch.Tensor:
    """The kernel alone (no autograd): x rotated by the table, or by its conjugate (the backward); arguments as
    `usable` requires."""
    B, S, H, D = x.shape
    if x.stride(-1) != 1 or abs(x.stride(2)) * H >= 2 ** 31:  # offsets within a token are int32 (`usable` checks
        x = x.contiguous()  # the forward's x; the backward's gradient, a transposed view, is checked here)
    t = _table(x, rope)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = min(MAX_BLOCK, triton.next_power_of_2(H * D))
    tokens = MAX_BLOCK // block  # small heads (tests, tiny models): several tokens a program
    grid = (triton.cdiv(B * S, tokens), triton.cdiv(H * D, block))
    _rope_kernel[grid](x, t, y, B * S, S, H * D, x.stride(0), x.stride(1), x.stride(2), t.stride(0), t.stride(1),
                       D=D, TOKENS=tokens, BLOCK=block, CONJ=conj, EXACT=not switches.interpreting(),
                       num_warps=max(1, min(4, tokens * block // 256)))
    return y


class RopeApply(torch.autograd.Function):
    """RoPE with the fused kernels: the backward rotates the gradient back; only the table is saved."""

    @staticmethod
    def forward(ctx, x, rope):
        ctx.save_for_backward(rope)
        return rope_rotate(x, rope)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (rope,) = ctx.saved_tensors
        return rope_rotate(g, rope, conj=True), None


def usable(x: torch.Tensor, rope: torch.Tensor) -> bool:
    if triton is None or not (x.is_cuda or switches.interpreting()) or torch.compiler.is_compiling():
        return False
    if x.dim() != 4 or x.dtype not in FLOATS or x.numel() == 0 or rope.dim() not in (3, 4):
        return False
    B, S, H, D = x.shape
    lead = rope.shape[:-2]  # (S,) or (B, S), each also 1 (broadcast)
    # offsets within a token are int32, across tokens int64
    return (D % 2 == 0 and rope.dtype == torch.float32 and not rope.requires_grad and rope.device == x.device
            and rope.shape[-2:] == (D // 2, 2) and rope.stride()[-2:] == (2, 1)
            and lead[-1] in (1, S) and (len(lead) == 1 or lead[0] in (1, B)) and abs(x.stride(2)) * H < 2 ** 31)


def rope_apply(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """hmtiny.model.apply_rope: the fused kernels where `usable`, else the reference."""
    return RopeApply.apply(x, rope) if usable(x, rope) else rope_ref(x, rope)
