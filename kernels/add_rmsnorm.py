"""Residual add of split-K partial sums + RMSNorm, in one launch: h = x + sum(partials), n = RMSNorm(h) * weight.

Between two matmuls of a decode step the residual stream is updated and normalised. The matmul before it (the
split-K GEMV of kernels/gemv.py) leaves S float32 partial sums ("K slices"); torch would spend a sum, a cast, an
add and the norm's reductions on them. This kernel does all of it with one program per row, the whole row in
registers (BLOCK_D = next power of two of D, masked), accumulating in float32.

Rounding follows the torch definition step by step, so results match `add_rmsnorm_ref` to the last bit except
where the float32 mean of squares differs in its last bits (reduction order, rsqrt approximation): then an
element of n may differ by one ulp of its dtype.
    p = partials.float().sum(0)            slices added in order s = 0..S-1, then rounded to x.dtype
    h = x + p                              in float32, rounded once to x.dtype (as torch's bf16 add)
    n = (h * rsqrt(mean(h^2) + eps)).type_as(x) * weight      the product rounded once to the promoted dtype
With partials None, h is x itself and n = hmtiny.model.RMSNorm(x).

Kernel path: CUDA, triton importable, x/partials/weight bf16, fp16 or fp32, x's last dim contiguous, weight [D]
contiguous, partials contiguous with S slices of x's rows (e.g. [S, rows, D] from gemv.partials_op for x [B, 1, D]),
D <= MAX_D. Anything else runs the reference. On CUDA it is a torch custom op, so torch.compile treats it as one
opaque call and CUDA graphs capture it. Launched with PDL (kernels/pdl.py): only weight is read before the wait.
`tests/test_add_rmsnorm.py` checks it against the reference (TRITON_INTERPRET=1 on CPU).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ahead, pdl
from .custom_op import custom_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
MAX_D = 32768  # whole row in registers: beyond this they spill (HeartMuLa's widths are 1536 and 3072)


def add_rmsnorm_ref(x: torch.Tensor, partials: Optional[torch.Tensor], weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch definition (CPU/MPS, and inside torch.compile where inductor fuses it).
    x [..., D]; partials None or S slices of x's shape ([S, *x.shape] or [S, rows, D]); weight [D]."""
    h = x if partials is None else x + partials.float().sum(0).to(x.dtype).reshape(x.shape)
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # hmtiny.model.RMSNorm, op for op
    return h, normed.type_as(x) * weight


if triton is not None:
    @triton.jit
    def residual(x, p):
        """h = x + p, rounded as the reference: the float32 slice sum p rounded to x's dtype, then torch's add
        (float32 math rounded once)."""
        return (x.to(tl.float32) + p.to(x.dtype).to(tl.float32)).to(x.dtype)

    @triton.jit
    def normed_times(h, w, D, eps):
        """RMSNorm(h) * w in float32 (w float32), rounded as the reference: type_as(h) rounds before the weight
        multiplies. Padding lanes of h must be 0: they add nothing to the sum of squares."""
        hf = h.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(hf * hf, axis=0) / D + eps)
        return (hf * rstd).to(h.dtype).to(tl.float32) * w

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, p_ptr, w_ptr, h_ptr, n_ptr, D, S, stride_x, stride_ps, stride_pr, eps,
                            BLOCK_D: tl.constexpr, HAS_PARTIALS: tl.constexpr, STORE_H: tl.constexpr,
                            PDL: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < D
        # no kernel of the step writes the weight, so it may be read while the previous kernel still runs
        w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if PDL:
            pdl.wait(PDL)
        x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0)
        h = x
        if HAS_PARTIALS:
            p = tl.zeros([BLOCK_D], dtype=tl.float32)
            for s in range(S):  # a fixed order: deterministic, and torch's own for a few slices
                p += tl.load(p_ptr + s * stride_ps + row * stride_pr + cols, mask=in_row, other=0.0).to(tl.float32)
            h = residual(x, p)
        if STORE_H:
            tl.store(h_ptr + row * D + cols, h, mask=in_row)
        tl.store(n_ptr + row * D + cols, normed_times(h, w, D, eps).to(n_ptr.dtype.element_ty), mask=in_row)


def _num_warps(block_d: int) -> int:
    return max(1, min(16, block_d // 512))  # 16 elements per thread at 3072 (8 warps) and 1536 (4 warps)


def _launch(x: torch.Tensor, partials: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
            store_h: bool = True) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(h, n) as fresh contiguous tensors of x's shape; h is None when not store_h. Works on CPU tensors under
    TRITON_INTERPRET=1 (the tests call it directly)."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    rows = x2.shape[0]
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if store_h else None
    n = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows == 0:
        return h, n
    if partials is None:
        p2, S = x2, 0  # a placeholder pointer, never read
    else:
        S = partials.shape[0]
        p2 = partials.reshape(S, rows, D)
    block_d = triton.next_power_of_2(D)
    ahead.launch(
        _add_rmsnorm_kernel, (rows,), x2, p2, weight, x2 if h is None else h, n, D, S, x2.stride(0), p2.stride(0),
        p2.stride(1), eps, BLOCK_D=block_d, HAS_PARTIALS=partials is not None, STORE_H=store_h,
        num_warps=_num_warps(block_d), zero=(h, n), **pdl.launch_kwargs(x))
    return h, n


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)  # the dtype of `normed.type_as(x) * weight`


@custom_op("hmtiny::add_rmsnorm", mutates_args=())
def add_rmsnorm_op(x: torch.Tensor, partials: Optional[torch.Tensor], weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, partials, weight, eps)  # with partials None, h is a copy: an op may not alias x


@add_rmsnorm_op.op.register_fake
def _(x, partials, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=_out_dtype(x, weight))


@custom_op("hmtiny::rmsnorm", mutates_args=())
def rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps, store_h=False)[1]


@rmsnorm_op.op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


def usable(x: torch.Tensor, partials: Optional[torch.Tensor], weight: torch.Tensor) -> bool:
    if triton is None or not x.is_cuda or x.dim() == 0 or x.dtype not in FLOATS:
        return False
    D = x.shape[-1]
    ok = (0 < D <= MAX_D and x.stride(-1) == 1 and weight.device == x.device and weight.dtype in FLOATS
          and weight.shape == (D,) and weight.is_contiguous())
    if partials is None:
        return ok
    return (ok and partials.device == x.device and partials.dtype in FLOATS and partials.is_contiguous()
            and partials.dim() >= 2 and partials.shape[-1] == D and partials.numel() == partials.shape[0] * x.numel())


def add_rmsnorm(x: torch.Tensor, partials: Optional[torch.Tensor], weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as `add_rmsnorm_ref`; one Triton launch on CUDA."""
    if not usable(x, partials, weight):
        return add_rmsnorm_ref(x, partials, weight, eps)
    if partials is None:
        return x, rmsnorm_op(x, weight, float(eps))  # h is x itself, as in the reference
    return add_rmsnorm_op(x, partials, weight, float(eps))
