"""RMSNorm for training: a Triton forward and backward kernel behind one autograd function, `rms_norm`.

The model's norm (hmtiny.model.RMSNorm) is, in torch, a cast to float32, torch.rms_norm, a cast back and the scale
multiply, each its own kernel, and autograd keeps a float32 copy of x for the backward, which is as many kernels
again. Here the forward is one launch (one program per row, the whole row in registers, float32 math) writing y
and the row's float32 rstd; the backward is one launch that recomputes n from x and rstd. Saved for the backward:
x itself (no copy), the scale and rstd (4 bytes a row).

Rounding follows the reference, `rmsnorm_ref` (hmtiny.model.RMSNorm op for op), step by step:
    forward    rstd = rsqrt(mean(x^2) + eps)                      float32
               n    = x * rstd, rounded to x.dtype                (.type_as(x))
               y    = n * scale, float32 math rounded once to the promoted dtype of x and scale
    backward   dn   = dy * scale, rounded to x.dtype              (the multiply's backward: its own dtype, then
                                                                   autograd's cast to n's dtype)
               dx   = rstd * (dn - n * mean(dn * n)), float32 with the unrounded n, rounded to x.dtype
                                                                  (torch.rms_norm's backward, then the cast's)
               dscale = sum over rows of (dy * n_rounded), the product in y's dtype then scale's, as autograd's
                        mul backward and broadcast reduction do (in torch: only full fine-tuning trains the scale)
So y and dx match the reference's to the last bit except where a float32 reduction (mean of squares, mean(dn*n),
the rsqrt) differs in its last bits from torch's: then an element may round to a neighbouring value of its dtype,
one ulp. `tests/test_rmsnorm.py` holds the kernels to the reference (TRITON_INTERPRET=1 on CPU, and on CUDA);
`bench/bench_rmsnorm.py` times them.

Kernel path: triton importable, x on CUDA (or any device under TRITON_INTERPRET=1, for the tests), x and scale
bf16/fp16/fp32, scale of shape [D], 0 < D <= MAX_D. Anything else runs the reference. Any leading dims; x whose
rows cannot be read with one row stride (or whose last dim is strided) is copied first. The launches are torch
custom ops: no host syncs, so CUDA graphs capture them, and torch.compile sees two opaque calls.
"""
from __future__ import annotations

import torch

from . import switches
from .custom_op import custom_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
MAX_D = 8192  # whole row in registers; the backward holds ~5 float32 values per element (HeartMuLa: 3072 and 1024)


def rmsnorm_ref(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain-torch definition, hmtiny.model.RMSNorm.forward op for op (CPU/MPS, and the tests' reference)."""
    normed = torch.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return normed.type_as(x) * scale


if triton is not None:
    @triton.jit
    def _forward_kernel(x_ptr, s_ptr, y_ptr, rstd_ptr, D, stride_x, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0)
        xf = x.to(tl.float32)  # padding lanes are 0: they add nothing to the sum of squares
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        tl.store(rstd_ptr + row, rstd)
        n = (xf * rstd).to(x.dtype).to(tl.float32)  # type_as(x) rounds before the scale multiplies
        s = tl.load(s_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (n * s).to(y_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _backward_kernel(dy_ptr, x_ptr, s_ptr, rstd_ptr, dx_ptr, n_ptr, D, stride_dy, stride_x,
                         BLOCK_D: tl.constexpr, STORE_DX: tl.constexpr, STORE_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0)
        rstd = tl.load(rstd_ptr + row)
        n = x.to(tl.float32) * rstd  # the forward's n before rounding: torch.rms_norm's backward uses that one
        if STORE_N:  # the rounded n the scale multiplied, for dscale
            tl.store(n_ptr + row * D + cols, n.to(x.dtype), mask=in_row)
        if STORE_DX:
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=in_row, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            # the product is exact or rounded to float32 (the promoted dtype); autograd then rounds it to n's dtype
            dn = (dy * s).to(x.dtype).to(tl.float32)
            c = tl.sum(dn * n, axis=0) / D  # padding lanes: dn = n = 0
            dx = rstd * (dn - n * c)
            tl.store(dx_ptr + row * D + cols, dx.to(x.dtype), mask=in_row)


def _num_warps(block_d: int) -> int:
    return max(1, min(16, block_d // 512))  # 16 elements per thread at 4096 (8 warps), 8 at 1024 (2 warps)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, D] with unit column stride: a view where the leading dims merge (e.g. a slice of wider rows),
    else a contiguous copy; so is a gradient expanded along D (stride 0, as after a .sum())."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _forward(x: torch.Tensor, scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, D] with unit column stride -> (y [rows, D] contiguous in the promoted dtype, rstd [rows] float32)."""
    rows, D = x.shape
    y = torch.empty((rows, D), dtype=torch.promote_types(x.dtype, scale.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block_d = triton.next_power_of_2(D)
        _forward_kernel[(rows,)](x, scale, y, rstd, D, x.stride(0), eps, BLOCK_D=block_d,
                                 num_warps=_num_warps(block_d))
    return y, rstd


def _backward(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor, need_dx: bool,
              need_n: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x [rows, D] with unit column stride -> (dx, n_rounded), each [rows, D] in x.dtype, or empty [0] when
    not asked for."""
    rows, D = x.shape
    dx = x.new_empty((rows, D) if need_dx else (0,))
    n = x.new_empty((rows, D) if need_n else (0,))
    if rows and (need_dx or need_n):
        block_d = triton.next_power_of_2(D)
        _backward_kernel[(rows,)](dy, x, scale, rstd, dx if need_dx else x, n if need_n else x, D, dy.stride(0),
                                  x.stride(0), BLOCK_D=block_d, STORE_DX=need_dx, STORE_N=need_n,
                                  num_warps=_num_warps(block_d))
    return dx, n


@custom_op("hmtiny::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd_op(x: torch.Tensor, scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, scale, eps)


@rmsnorm_fwd_op.op.register_fake
def _(x, scale, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, scale.dtype)),
            x.new_empty(x.shape[0], dtype=torch.float32))


@custom_op("hmtiny::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor, need_dx: bool,
                   need_n: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, x, scale, rstd, need_dx, need_n)


@rmsnorm_bwd_op.op.register_fake
def _(dy, x, scale, rstd, need_dx, need_n):
    return x.new_empty(x.shape if need_dx else (0,)), x.new_empty(x.shape if need_n else (0,))


class RMSNormFunction(torch.autograd.Function):
    """y = rmsnorm_ref(x, scale, eps) through the two kernels; x arrives as [rows, D] (see `rms_norm`)."""

    @staticmethod
    def forward(ctx, x, scale, eps: float):
        y, rstd = rmsnorm_fwd_op(x, scale, eps)
        ctx.save_for_backward(x, scale, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, rstd = ctx.saved_tensors
        need_dx, need_dscale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, n = rmsnorm_bwd_op(_rows(dy), x, scale, rstd, need_dx, need_dscale)
        dscale = None
        if need_dscale:  # autograd's mul backward: the product in y's dtype, cast to scale's, summed over rows
            dscale = (dy * n).to(scale.dtype).sum(0)
        return dx if need_dx else None, dscale, None


def usable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    if triton is None or x.dim() == 0 or not (x.is_cuda or switches.interpreting()):
        return False
    D = x.shape[-1]
    return (x.dtype in FLOATS and scale.dtype in FLOATS and 0 < D <= MAX_D and scale.shape == (D,)
            and scale.device == x.device)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Same values and gradients as `rmsnorm_ref(x, scale, eps)` (up to the float32 rounding noted above); the
    kernels where `usable`, the reference elsewhere."""
    if not usable(x, scale):
        return rmsnorm_ref(x, scale, eps)
    y = RMSNormFunction.apply(_rows(x), scale.contiguous(), float(eps))
    return y.view(x.shape)
