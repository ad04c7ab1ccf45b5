"""SwiGLU's product silu(a) * b (a = w1 x, b = w3 x) as one Triton kernel forward and one backward.

In the training step torch spends two kernels on `F.silu(a) * b` forward and three on its backward (mul, mul,
silu_backward), each a full pass over [rows, 8192] bf16 tensors, and autograd keeps silu(a) alive for the backward
besides a and b. Here the forward is one pass writing the product, the backward one pass reading g, a and b and
writing da and db, recomputing silu(a); only a and b are saved.

Rounding follows the torch definition step by step (float32 math, rounded where torch rounds), so the results
equal `silu_mul_ref` and autograd's gradients of it bit for bit wherever the float32 exp agrees with torch's. On
CUDA the kernel calls libdevice's expf (the CUDA math library's, which torch's own kernels should also get) and
divides with IEEE rounding:
    s = a / (1 + exp(-a))                  rounded to a.dtype (F.silu)
    out = s * b                            rounded to a.dtype (the bf16 multiply)
    db = g * s                             rounded (autograd of the multiply)
    gs = g * b                             rounded
    da = gs * sig * (1 + a * (1 - sig))    sig = 1 / (1 + exp(-a)), rounded (torch's silu_backward)
Where exp differs in its last float32 bit (under Triton's interpreter exp is numpy's, not torch's CPU exp), or da's
`1 + a * (1 - sig)` is contracted into an FMA where torch's compiled kernel does not (or the reverse), an element
rounds to the neighbouring value of its dtype, rarely; tests/test_silu_mul.py counts them. For float32 inputs
every rounding step is the identity, so the last-bit differences show directly.

Kernel path: CUDA (or TRITON_INTERPRET=1, the tests), triton importable, a and b of one shape and dtype (bf16,
fp16, fp32), both contiguous, not empty, not inside torch.compile (inductor fuses the reference itself). Anything
else runs the reference through autograd. No host syncs: CUDA graphs capture the forward and the backward.
`tests/test_silu_mul.py` holds the kernels to the reference; `bench/bench_train_fusions.py` times them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import switches

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
BLOCK, NUM_WARPS = 1024, 4  # 8 elements a thread: one 16-byte load of each bf16 input


def silu_mul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The plain-torch definition (hmtiny.model.MLP's product), differentiated by autograd."""
    return F.silu(a) * b


if triton is not None:
    @triton.jit
    def _exp_neg(a, EXACT: tl.constexpr):
        """exp(-a) in float32: libdevice's expf on the GPU (torch's), numpy's under the interpreter (which has no
        libdevice)."""
        if EXACT:
            return libdevice.exp(-a)
        else:
            return tl.exp(-a)

    @triton.jit
    def _silu_mul_fwd(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr, EXACT: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        a = tl.load(a_ptr + offs, mask=inside, other=0.0)
        b = tl.load(b_ptr + offs, mask=inside, other=0.0)
        af = a.to(tl.float32)
        s = tl.math.div_rn(af, 1.0 + _exp_neg(af, EXACT)).to(a.dtype)  # F.silu rounds to the input dtype
        tl.store(out_ptr + offs, (s.to(tl.float32) * b.to(tl.float32)).to(a.dtype), mask=inside)

    @triton.jit
    def _silu_mul_bwd(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr, EXACT: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=inside, other=0.0)
        b = tl.load(b_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dt = a.dtype
        af = a.to(tl.float32)
        e1 = 1.0 + _exp_neg(af, EXACT)
        s = tl.math.div_rn(af, e1).to(dt).to(tl.float32)  # the forward's silu(a), as autograd saved it
        sig = tl.math.div_rn(1.0, e1)
        gs = (g * b).to(dt).to(tl.float32)  # autograd's grad of silu(a): g * b in the tensors' dtype
        tl.store(db_ptr + offs, (g * s).to(dt), mask=inside)
        tl.store(da_ptr + offs, (gs * sig * (1.0 + af * (1.0 - sig))).to(dt), mask=inside)


def _exact() -> bool:
    return not switches.interpreting()


def silu_mul_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The forward kernel alone (no autograd); a, b as `usable` requires."""
    out = torch.empty_like(a)
    n = a.numel()
    _silu_mul_fwd[(triton.cdiv(n, BLOCK),)](a, b, out, n, BLOCK=BLOCK, EXACT=_exact(), num_warps=NUM_WARPS)
    return out


def silu_mul_backward(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) from the output gradient g, in one pass."""
    g = g.contiguous()  # autograd usually hands a contiguous one (w2's input gradient); a no-op then
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    _silu_mul_bwd[(triton.cdiv(n, BLOCK),)](g, a, b, da, db, n, BLOCK=BLOCK, EXACT=_exact(), num_warps=NUM_WARPS)
    return da, db


class SiluMul(torch.autograd.Function):
    """silu(a) * b with the fused kernels; saves a and b only."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return silu_mul_forward(a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        da, db = silu_mul_backward(g.to(a.dtype), a, b)
        return da if ctx.needs_input_grad[0] else None, db if ctx.needs_input_grad[1] else None


def usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (triton is not None and (a.is_cuda or switches.interpreting()) and not torch.compiler.is_compiling()
            and a.dtype in FLOATS and b.dtype == a.dtype and a.shape == b.shape and a.device == b.device
            and a.numel() > 0 and a.is_contiguous() and b.is_contiguous())


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.silu(a) * b: the fused kernels where `usable`, else the reference."""
    return SiluMul.apply(a, b) if usable(a, b) else silu_mul_ref(a, b)
