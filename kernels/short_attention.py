"""Causal attention over a few rows with grouped-query heads (the depth decoder's), one Triton kernel forward and
one backward.

In training the depth decoder attends over S = 8 rows of each audio frame (the backbone's state and 7 codebooks'
embeddings): q [B, 8, S, 384], k and v [B, 4, S, 384], bf16, B = the frames of the batch (375 a 30 s clip).
`F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)` leaves only its math backend on CUDA
there (head_dim 384 with GQA): it casts q, k, v to float32, expands k and v to the 8 heads, scales, runs batched
float32 GEMMs, the mask add, a softmax, another GEMM and a cast back, and autograd's backward is as many kernels
again (measured: 4+ ms of a 128 ms 4-clip training step, forward and backward of the 3 layers). Here one program
per (frame, kv head) loads its K and V [S, D] and the G = H / Hkv query heads that share them [G*S, D], and does
all of it in registers: the forward writes only the output, the backward only the three input gradients. Nothing
but q, k and v is saved for the backward (the math backend saves float32 copies and the probabilities).

Numerics: the math backend's float32 computation (`short_attention_ref`, which tests/test_short_attention.py holds
to torch's math backend), step by step, c = sqrt(1/sqrt(D)) rounded to float32 as torch's scalar multiply does:
    qs = float(q) * c,  ks = float(k) * c                  float32 (torch scales both before the product)
    s = qs ks^T, -inf above the diagonal                   float32 sums of products (FMAs on the GPU)
    p = exp(s - rowmax) / rowsum(exp(s - rowmax))          expf of libdevice (torch's) on the GPU; IEEE division
    out = p v                                              float32, rounded once to q.dtype
and the backward as autograd differentiates those ops (dO in float32, exact):
    dp = dO v^T,  delta = rowsum(p * dp),  ds = p * dp - p * delta      (torch's softmax backward on CUDA)
    dv = p^T dO,  dq = (ds ks) * c,  dk = (ds^T qs) * c                 each rounded once to its input's dtype
with the G query heads of a kv head summed into dk and dv inside the program, in a fixed order (deterministic, no
atomics). delta comes from p and dp, as autograd's softmax backward takes it, not from rowsum(dO * out): out is
rounded to bf16 and dp - delta cancels, so the rounded out would carry bf16's error into ds; p and dp are in
registers anyway, and out need not be saved. What differs from torch is only the order of the float32 sums (a
tree over D chunks here, cuBLAS's order there; the G heads summed before the multiply by c instead of after), so
results agree with the math backend to a few float32 ulps, and in bf16/fp16 to one ulp in the rare element that a
last-bit difference moves across a rounding boundary. No TF32 anywhere (the math backend's GEMMs are float32
unless torch.backends.cuda.matmul.allow_tf32 is set, which hmtiny never does).

NO_DOT: every product-and-sum here reduces over the last axis of its [.., .., BLOCK] product, or over the first.
Triton's combine pass rewrites the form sum(x[:, :, None] * y[None, :, :], axis=1) into a tl.dot, and Triton 3.6
made that dot TF32: on an H100 the float32 outputs were off by ~1e-3 of their largest element and many bf16
results by an ulp. So p v and ds ks load v and k transposed, [BLOCK_D, S_pad], and sum over axis 2.
tests/test_short_attention.py compiles the kernels for a GPU target on the CPU and checks that no dot is left.

Tiling: rows are (query head g of the group, position i), padded to powers of two: R = next_pow2(G) * S_pad rows,
S_pad = next_pow2(S) >= 2 key columns. Scores need a sum over D = 384 for each of R x S_pad pairs (16 x 8 in the
model): a [R, S_pad, D] product would be 48 K float32 values, 384 registers a thread at 4 warps. So D is walked in
chunks of BLOCK_D, the chunk products accumulated elementwise into a [R, S_pad, BLOCK_D] float32 tile (FMAs, no
cross-thread traffic in the loop) and reduced over BLOCK_D once after it. BLOCK_D is sized so that tile is 32
values a thread in the forward (one accumulator: BLOCK_D = 32, 12 chunks at the model's shape, 4 warps) and 16 in
the backward (two accumulators, the scores' and dO v^T's: BLOCK_D = 16, 24 chunks); 384 is a multiple of both,
so no lane is masked off; other D (40, 8) mask the tail. The output pass (p v) and the backward's gradient pass
(p^T dO, ds ks, ds^T qs) walk D again in the same chunks, each chunk's products reduced over the S_pad or R axis
right away and stored; the backward reloads q, k and dO for that pass (L1/L2 hits: a program's q, k, v, dO are
~37 KB in bf16) rather than keep [R + S_pad, D] float32 in registers. Score tiles R x S_pad above 256 take 8
warps, and BLOCK_D shrinks to keep the per-thread counts, down to 16 (S = 9 pads to 16: R = 32, 512 pairs; the
training step's decoder runs S = 8, its 8 codebooks). `bench/bench_short_attention.py` times other
(BLOCK_D, warps) choices at the model's shape on a GPU: on an H100 at 1500 frames these halved per-thread counts
were the fastest of the sweep (forward 263 us, backward 566 us against 283 and 740 at twice the counts).

Layout: q [B, H, S, D], k and v [B, Hkv, S, D] with H % Hkv == 0 and query head h reading kv head h // (H / Hkv)
(SDPA's enable_gqa), any strides with a unit stride on D: the model's are transposed views of [B, S, H, D]
tensors and are read in place. The output and the gradients are returned as [B, H, S, D] views of [B, S, H, D]
tensors, the model's layout: its `y.transpose(1, 2).reshape(b, s, -1)` is then free, and so are the views the
gradients flow back through.

Kernel path: CUDA (or TRITON_INTERPRET=1, the tests), triton importable, q, k, v of one dtype (bf16, fp16, fp32)
and device, shapes as above with 1 <= S <= MAX_S, 1 <= D <= MAX_D, R x S_pad <= MAX_TILE, not inside
torch.compile. Anything else runs the reference through autograd. No host syncs: CUDA graphs capture the forward
and the backward. `tests/test_short_attention.py` holds the kernels to the reference; hmtiny/fused.py switches
the model's no-cache attention to them; `bench/bench_short_attention.py` times them against SDPA.
"""
from __future__ import annotations

import math

import torch

from . import switches
from .decode_attention import _pow2

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
MAX_S = 16  # rows of the sequence: the depth decoder's 8 or 9; longer sequences want a flash-attention loop
MAX_D = 512  # head_dim (the decoder's is 384)
MAX_TILE = 1024  # R x S_pad score pairs a program: next_pow2(H / Hkv) * S_pad ** 2 (the decoder's: 2 * 8 * 8)
FWD_PER_THREAD, BWD_PER_THREAD = 32, 16  # float32 values a thread of each [R, S_pad, BLOCK_D] accumulator


def short_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) as its math backend computes it
    (torch's _scaled_dot_product_attention_math, op for op), differentiated by autograd: bf16/fp16 upcast to
    float32, q and k each scaled by sqrt(1/sqrt(D)), k and v repeated to the query heads, an additive -inf causal
    mask, softmax, the product with v, one cast back."""
    dtype, S = q.dtype, q.shape[-2]
    c = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in (q, k, v))
    if group > 1:  # as torch does: only then (repeat_interleave copies, which changes BLAS's summation order)
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    keep = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    mask = torch.zeros(S, S, dtype=qf.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    attn = torch.matmul(qf * c, kf.transpose(-2, -1) * c)
    attn = torch.softmax(attn + mask, dim=-1)
    return torch.matmul(attn, vf).to(dtype)


if triton is not None:
    @triton.jit
    def _exp(x, EXACT: tl.constexpr):
        """exp in float32: libdevice's expf on the GPU (torch's softmax calls expf), numpy's under the interpreter
        (which has no libdevice)."""
        if EXACT:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _rows(pid, Hkv, G: tl.constexpr, S: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
        """This program's batch item b (int64) and kv head; its query rows (head h, position i, valid) and key
        columns (position j, valid)."""
        b = (pid // Hkv).to(tl.int64)
        kvh = pid % Hkv
        r = tl.arange(0, BLOCK_R)
        g, i = r // BLOCK_S, r % BLOCK_S
        row_ok = (g < G) & (i < S)
        h = kvh * G + g
        j = tl.arange(0, BLOCK_S)
        return b, kvh, h, i, row_ok, j, j < S

    @triton.jit
    def _probabilities(s, i, j, EXACT: tl.constexpr):
        """Causal softmax of the float32 scores [R, S_pad] (row position i, column position j): entries above the
        diagonal (and padded columns, j > i) are -inf, exp(-inf) = 0; column 0 is never masked, so no row is
        empty (padded rows have all-zero scores and are never stored)."""
        s = tl.where(j[None, :] <= i[:, None], s, float("-inf"))
        e = _exp(s - tl.max(s, axis=1)[:, None], EXACT)
        total = tl.broadcast_to(tl.sum(e, axis=1)[:, None], e.shape)
        return tl.math.div_rn(e, total)

    @triton.jit
    def _short_attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                             so_b, so_h, so_s, Hkv, c, S: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                             EXACT: tl.constexpr):
        b, kvh, h, i, row_ok, j, col_ok = _rows(tl.program_id(0), Hkv, G, S, BLOCK_S, BLOCK_R)
        q_row = q_ptr + b * sq_b + h.to(tl.int64) * sq_h + i * sq_s  # [R] pointers to d = 0
        k_row = k_ptr + b * sk_b + kvh.to(tl.int64) * sk_h + j * sk_s  # [S_pad]
        v_row = v_ptr + b * sv_b + kvh.to(tl.int64) * sv_h + j * sv_s
        o_row = o_ptr + b * so_b + h.to(tl.int64) * so_h + i * so_s

        acc = tl.zeros((BLOCK_R, BLOCK_S, BLOCK_D), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            qs = tl.load(q_row[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            ks = tl.load(k_row[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            qs = qs.to(tl.float32) * c
            ks = ks.to(tl.float32) * c
            acc += qs[:, None, :] * ks[None, :, :]
        p = _probabilities(tl.sum(acc, axis=2), i, j, EXACT)

        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            vt = tl.load(v_row[None, :] + d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # [D, S]
            o = tl.sum(p[:, None, :] * vt.to(tl.float32)[None, :, :], axis=2)  # [R, BLOCK_D]; why: NO_DOT
            tl.store(o_row[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _short_attention_bwd(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr,
                             sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
                             sdq_b, sdq_h, sdq_s, sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s, Hkv, c,
                             S: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EXACT: tl.constexpr):
        b, kvh, h, i, row_ok, j, col_ok = _rows(tl.program_id(0), Hkv, G, S, BLOCK_S, BLOCK_R)
        h64, kvh64 = h.to(tl.int64), kvh.to(tl.int64)
        q_row = q_ptr + b * sq_b + h64 * sq_h + i * sq_s
        do_row = do_ptr + b * sdo_b + h64 * sdo_h + i * sdo_s
        dq_row = dq_ptr + b * sdq_b + h64 * sdq_h + i * sdq_s
        k_row = k_ptr + b * sk_b + kvh64 * sk_h + j * sk_s
        v_row = v_ptr + b * sv_b + kvh64 * sv_h + j * sv_s
        dk_row = dk_ptr + b * sdk_b + kvh64 * sdk_h + j * sdk_s
        dv_row = dv_ptr + b * sdv_b + kvh64 * sdv_h + j * sdv_s

        # pass 1: the scores qs ks^T and dp = dO v^T, both sums over D
        acc_s = tl.zeros((BLOCK_R, BLOCK_S, BLOCK_D), tl.float32)
        acc_dp = tl.zeros((BLOCK_R, BLOCK_S, BLOCK_D), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            row_mask, col_mask = row_ok[:, None] & d_ok[None, :], col_ok[:, None] & d_ok[None, :]
            qs = tl.load(q_row[:, None] + d[None, :], mask=row_mask, other=0.0).to(tl.float32) * c
            ks = tl.load(k_row[:, None] + d[None, :], mask=col_mask, other=0.0).to(tl.float32) * c
            do = tl.load(do_row[:, None] + d[None, :], mask=row_mask, other=0.0).to(tl.float32)
            v = tl.load(v_row[:, None] + d[None, :], mask=col_mask, other=0.0).to(tl.float32)
            acc_s += qs[:, None, :] * ks[None, :, :]
            acc_dp += do[:, None, :] * v[None, :, :]
        p = _probabilities(tl.sum(acc_s, axis=2), i, j, EXACT)
        dp = tl.sum(acc_dp, axis=2)
        # softmax's backward as torch's CUDA kernel takes it: p * dp - p * rowsum(p * dp). Padded rows have dO = 0,
        # so dp = 0 and ds = 0 there: they add nothing to dk and dv.
        delta = tl.sum(p * dp, axis=1)
        ds = p * dp - p * delta[:, None]

        # pass 2: the gradients, chunk by chunk of D; dk and dv sum over all R rows (the group's heads)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            row_mask, col_mask = row_ok[:, None] & d_ok[None, :], col_ok[:, None] & d_ok[None, :]
            qs = tl.load(q_row[:, None] + d[None, :], mask=row_mask, other=0.0).to(tl.float32) * c
            kst = tl.load(k_row[None, :] + d[:, None], mask=d_ok[:, None] & col_ok[None, :],
                          other=0.0).to(tl.float32) * c  # [BLOCK_D, S_pad]
            do = tl.load(do_row[:, None] + d[None, :], mask=row_mask, other=0.0).to(tl.float32)
            dv = tl.sum(p[:, :, None] * do[:, None, :], axis=0)  # [S_pad, BLOCK_D]
            tl.store(dv_row[:, None] + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=col_mask)
            dk = tl.sum(ds[:, :, None] * qs[:, None, :], axis=0) * c
            tl.store(dk_row[:, None] + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=col_mask)
            dq = tl.sum(ds[:, None, :] * kst[None, :, :], axis=2) * c  # [R, BLOCK_D]; why: NO_DOT
            tl.store(dq_row[:, None] + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=row_mask)


def plan(group: int, S: int, D: int, backward: bool, block_d: int | None = None,
         num_warps: int | None = None) -> dict:
    """The launch's tile sizes (see the module docstring): BLOCK_S, BLOCK_R, BLOCK_D and num_warps, for G query
    heads a kv head; block_d / num_warps override the choice (benchmarks)."""
    block_s = max(2, _pow2(S))
    block_r = _pow2(group) * block_s
    tile = block_r * block_s
    if num_warps is None:
        num_warps = 4 if tile <= 256 else 8
    if block_d is None:
        per_thread = BWD_PER_THREAD if backward else FWD_PER_THREAD
        block_d = min(max(per_thread * 32 * num_warps // tile, 16), 128, _pow2(D))
    return {"BLOCK_S": block_s, "BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": num_warps}


def _layout_like_model(B: int, H: int, S: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, S, D] tensor: the transposed view of a contiguous [B, S, H, D] one."""
    return torch.empty(B, S, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _scale_root(D: int) -> float:
    """sqrt(1 / sqrt(D)) in double, as torch's math backend computes it (the kernel rounds it to float32, as torch's
    float32 multiply by a Python scalar does)."""
    return math.sqrt(1.0 / math.sqrt(D))


def short_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_d: int | None = None,
                            num_warps: int | None = None) -> torch.Tensor:
    """The forward kernel alone (no autograd); q, k, v as `usable` requires."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    out = _layout_like_model(B, H, S, D, q)
    tiles = plan(H // Hkv, S, D, False, block_d, num_warps)
    _short_attention_fwd[(B * Hkv,)](q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                     *out.stride()[:3], Hkv, _scale_root(D), S=S, D=D, G=H // Hkv,
                                     EXACT=not switches.interpreting(), **tiles)
    return out


def short_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             block_d: int | None = None, num_warps: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the output gradient do [B, H, S, D] (any strides), recomputing the probabilities."""
    if do.stride(-1) != 1:  # autograd may hand an expanded (stride 0) gradient; the model's is a transposed view
        do = do.contiguous()
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    dq, dk, dv = _layout_like_model(B, H, S, D, q), _layout_like_model(B, Hkv, S, D, k), \
        _layout_like_model(B, Hkv, S, D, v)
    tiles = plan(H // Hkv, S, D, True, block_d, num_warps)
    _short_attention_bwd[(B * Hkv,)](q, k, v, do, dq, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                     *do.stride()[:3], *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                                     Hkv, _scale_root(D), S=S, D=D, G=H // Hkv,
                                     EXACT=not switches.interpreting(), **tiles)
    return dq, dk, dv


class ShortAttention(torch.autograd.Function):
    """Causal GQA attention over short sequences with the kernels; saves q, k and v only."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return short_attention_forward(q, k, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = short_attention_backward(do, q, k, v)
        return tuple(g if need else None for g, need in zip((dq, dk, dv), ctx.needs_input_grad))


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if triton is None or not (q.is_cuda or switches.interpreting()) or torch.compiler.is_compiling():
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.dtype not in FLOATS or q.numel() == 0:
        return False
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    if not (k.dtype == v.dtype == q.dtype and k.device == v.device == q.device and Hkv > 0 and H % Hkv == 0
            and tuple(k.shape) == tuple(v.shape) == (B, Hkv, S, D)):
        return False
    tiles = plan(H // Hkv, S, D, False)
    return (S <= MAX_S and D <= MAX_D and tiles["BLOCK_R"] * tiles["BLOCK_S"] <= MAX_TILE
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True): the kernels where `usable`, else
    the reference (the math backend's ops)."""
    return ShortAttention.apply(q, k, v) if usable(q, k, v) else short_attention_ref(q, k, v)
