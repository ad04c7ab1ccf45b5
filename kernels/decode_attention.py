"""RoPE + KV-cache write + attention of a few new query rows over a static cache, in one or two Triton launches.

A generation step feeds S (1..16) new rows per batch row. The torch path (FastLayer.forward) spends separate kernels
on RoPE, two index_copy cache writes and masked SDPA over the whole cache. Here, flash-decoding style:

1. split kernel, grid (key chunks, B * KV): each program takes one (batch row, kv head, chunk of CHUNK cache slots)
   with all G = H / KV query heads x S rows of that kv head as the rows of one tile. It rotates q itself (cheap,
   recomputed by every program), attends over the chunk's OLDER keys (start[b] <= j < slots[0], read from the
   cache) keeping a running max/sum in fp32, and writes unnormalised partial results. Programs whose chunk lies
   wholly outside [start[b], slots[0]] do nothing. The program whose chunk holds slots[0] also rotates the S new
   keys, attends to them straight from registers (causally: row i sees new keys 0..i) and is the ONLY writer of
   the new cache rows, so no program ever reads a slot being written in the same launch.
2. combine kernel, grid (B * KV, G * S): merges the partials of the valid chunks. When the cache fits one chunk
   (the depth decoder, L = 8) the split kernel normalises and writes the output itself: one launch.

Positions, slots and start are device tensors read by the kernels (no host sync: CUDA-graph replays may advance
them); CHUNK depends only on the static shapes, see config() (backbone, B*KV = 16: 32 slots at L = 584, i.e.
19 chunks x 16 = 304 programs; 128 at L = 3000, 384 programs). RoPE is computed with FMA
contraction disabled, so the written cache rows are bit-equal to the eager reference's (fp32 multiply, subtract,
round to the cache dtype).

Kernel path: CUDA, triton importable, bf16/fp16/fp32 activations and caches of the same dtype, last dims of
stride 1, even head_dim 16..512 (not a power of two is fine: masked), S <= 16, pow2(G * S) * pow2(head_dim) <=
16384 (e.g. hd 128: G * S <= 128; hd 384: G * S <= 32). Anything else runs the reference. Slots must be
consecutive and start[b] <= slots[0] (else a row has no key: NaN, as in the torch path); the engine's prefill,
whose left-pad rows attend only to themselves, is therefore not this op's job.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None

MAX_S = 16
MAX_TILE = 16384  # pow2(G*S) * pow2(hd): the fp32 accumulator tile of one program
TARGET_PROGRAMS = 512  # a few per SM on an H100 (132 SMs) when the whole cache is valid


def decode_attention_ref(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads: int, n_kv: int):
    """Plain torch, the same operations as FastLayer.forward: interleaved RoPE of q and k in fp32 (rounded to the
    activation dtype), index_copy_ of k/v into the caches at `slots`, masked SDPA over the whole cache with the GQA
    layout [B, KV, G*S, hd]. Row i of batch row b attends to slots start[b] <= j <= slots[i]."""
    b, s, _ = qkv.shape
    H, KV = n_heads, n_kv
    hd, G, L = qkv.shape[-1] // (H + 2 * KV), H // KV, k_cache.shape[2]
    t = rope[pos]
    cos, sin = t[..., 0].unsqueeze(2), t[..., 1].unsqueeze(2)
    qk = qkv[..., : (H + KV) * hd].float().unflatten(-1, (H + KV, hd // 2, 2))
    x0, x1 = qk[..., 0], qk[..., 1]
    qk = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-3).to(qkv.dtype)
    q, k = qk.split([H * hd, KV * hd], -1)
    v = qkv[..., (H + KV) * hd:]
    k_cache.index_copy_(2, slots, k.reshape(b, s, KV, hd).transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.reshape(b, s, KV, hd).transpose(1, 2).to(v_cache.dtype))
    q = q.reshape(b, s, KV, G, hd).permute(0, 2, 3, 1, 4).reshape(b, KV, G * s, hd)
    cols = torch.arange(L, device=qkv.device)
    mask = (cols >= start[:, None, None]) & (cols <= slots[None, :, None])  # [B, S, L]
    mask = mask[:, None, None].expand(b, 1, G, s, L).reshape(b, 1, G * s, L)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
    return y.view(b, KV, G, s, hd).permute(0, 3, 1, 2, 4).reshape(b, s, H * hd)


if triton is not None:
    @triton.jit
    def _load_rotated(x_ptr, row_off, pos, rope_ptr, stride_rope, hd, ok, HD: tl.constexpr):
        """Rows x_ptr[row_off + 0..hd) rotated by RoPE at `pos`, fp32 [R, HD]: interleaved pairs (x[2i], x[2i+1])."""
        d = tl.arange(0, HD)
        m = ok[:, None] & (d < hd)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + row_off[:, None] + (d ^ 1)[None, :], mask=m, other=0.0).to(tl.float32)  # pair partner
        r = rope_ptr + pos[:, None] * stride_rope + (d // 2 * 2)[None, :]
        cos = tl.load(r, mask=m, other=0.0)
        sin = tl.load(r + 1, mask=m, other=0.0)
        # the reference's expressions, operand for operand (even: x0*cos - x1*sin, odd: x1*cos + x0*sin)
        return tl.where((d % 2 == 0)[None, :], x * cos - xp * sin, x * cos + xp * sin)

    @triton.jit
    def _attend(q, k, v, ok, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
        """One online-softmax step over a key block (scores in log2 units)."""
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _split_kernel(qkv_ptr, k_ptr, v_ptr, rope_ptr, pos_ptr, slots_ptr, start_ptr, y_ptr, o_ptr, ml_ptr,
                      S, hd, n_part, qk_scale, stride_qb, stride_qs, stride_kb, stride_kh, stride_kl,
                      stride_vb, stride_vh, stride_vl, stride_rope, stride_pb, stride_ps, stride_yb, stride_ys,
                      KV: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, NCH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NEW_N: tl.constexpr, HD: tl.constexpr,
                      PREC: tl.constexpr):
        c, bk = tl.program_id(0), tl.program_id(1)
        b, kvh = bk // KV, bk % KV
        slot0 = tl.load(slots_ptr)
        start = tl.load(start_ptr + b)
        c_last = slot0 // CHUNK
        if (c >= start // CHUNK) & (c <= c_last):  # else: no valid key here, nothing to do
            r = tl.arange(0, BLOCK_M)  # tile row r = query row i, query head kvh*G + g
            i, g = r // G, r % G
            row_ok = i < S
            d = tl.arange(0, HD)
            d_ok = d < hd
            pos_q = tl.load(pos_ptr + b * stride_pb + i * stride_ps, mask=row_ok, other=0)
            q = _load_rotated(qkv_ptr, b * stride_qb + i * stride_qs + (kvh * G + g) * hd, pos_q, rope_ptr,
                              stride_rope, hd, row_ok, HD).to(qkv_ptr.dtype.element_ty)  # rounded as the ref's q
            # finite start: a key block with no valid key then adds p = 0 instead of NaN
            m_i = tl.full([BLOCK_M], -1e30, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HD], tl.float32)

            # older keys, from the cache: every query row sees all of them
            lo = tl.maximum(c * CHUNK, start)
            hi = tl.minimum(c * CHUNK + CHUNK, slot0)
            n = tl.arange(0, BLOCK_N)
            for j0 in range(lo, hi, BLOCK_N):
                j = j0 + n
                ok = j < hi
                m2 = ok[:, None] & d_ok[None, :]
                k = tl.load(k_ptr + b * stride_kb + kvh * stride_kh + j[:, None] * stride_kl + d[None, :],
                            mask=m2, other=0.0)
                v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + j[:, None] * stride_vl + d[None, :],
                            mask=m2, other=0.0)
                m_i, l_i, acc = _attend(q, k, v, ok[None, :], m_i, l_i, acc, qk_scale, PREC)

            # the S new keys (slots[0] + t), from registers, by the one program whose chunk holds slots[0]
            if c == c_last:
                t = tl.arange(0, NEW_N)
                t_ok = t < S
                m2 = t_ok[:, None] & d_ok[None, :]
                pos_k = tl.load(pos_ptr + b * stride_pb + t * stride_ps, mask=t_ok, other=0)
                row = b * stride_qb + t * stride_qs
                kn = _load_rotated(qkv_ptr, row + (KV * G + kvh) * hd, pos_k, rope_ptr, stride_rope, hd, t_ok,
                                   HD).to(k_ptr.dtype.element_ty)
                vn = tl.load(qkv_ptr + row[:, None] + (KV * G + KV + kvh) * hd + d[None, :], mask=m2,
                             other=0.0).to(v_ptr.dtype.element_ty)
                ok = (t[None, :] <= i[:, None]) & t_ok[None, :]
                m_i, l_i, acc = _attend(q, kn, vn, ok, m_i, l_i, acc, qk_scale, PREC)
                slot = tl.load(slots_ptr + t, mask=t_ok, other=0)
                tl.store(k_ptr + b * stride_kb + kvh * stride_kh + slot[:, None] * stride_kl + d[None, :], kn,
                         mask=m2)
                tl.store(v_ptr + b * stride_vb + kvh * stride_vh + slot[:, None] * stride_vl + d[None, :], vn,
                         mask=m2)

            if NCH == 1:  # the whole cache was this chunk: finish here
                y = acc / l_i[:, None]
                tl.store(y_ptr + b * stride_yb + i[:, None] * stride_ys + ((kvh * G + g) * hd)[:, None] + d[None, :],
                         y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            else:  # partials [B*KV, G*S, NCH, hd] and (max, sum) [2, B*KV, G*S, NCH]
                part = (bk * G * S + r) * NCH + c
                tl.store(o_ptr + part[:, None] * hd + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
                tl.store(ml_ptr + part, m_i, mask=row_ok)
                tl.store(ml_ptr + n_part + part, l_i, mask=row_ok)

    @triton.jit
    def _combine_kernel(o_ptr, ml_ptr, slots_ptr, start_ptr, y_ptr, S, hd, n_part, stride_yb, stride_ys,
                        KV: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, NCH: tl.constexpr,
                        NCH_PAD: tl.constexpr, HD: tl.constexpr):
        bk, r = tl.program_id(0), tl.program_id(1)
        b, kvh = bk // KV, bk % KV
        i, g = r // G, r % G
        c = tl.arange(0, NCH_PAD)
        ok = (c >= tl.load(start_ptr + b) // CHUNK) & (c <= tl.load(slots_ptr) // CHUNK) & (c < NCH)
        part = (bk * G * S + r) * NCH + c
        m = tl.load(ml_ptr + part, mask=ok, other=float("-inf"))
        l = tl.load(ml_ptr + n_part + part, mask=ok, other=0.0)
        w = tl.exp2(m - tl.max(m, 0))  # 0 for chunks that were skipped
        d = tl.arange(0, HD)
        d_ok = d < hd
        o = tl.load(o_ptr + part[:, None] * hd + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)
        tl.store(y_ptr + b * stride_yb + i * stride_ys + (kvh * G + g) * hd + d, y.to(y_ptr.dtype.element_ty),
                 mask=d_ok)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def config(B: int, KV: int, L: int, hd: int) -> tuple[int, int, int]:
    """(CHUNK, BLOCK_N, num_warps) for a cache shape: about TARGET_PROGRAMS programs over the whole cache, at least
    16 slots a chunk, and few enough chunks that the combine tile (chunks x hd) stays <= MAX_TILE floats."""
    HD = max(16, _pow2(hd))
    chunk = max(16, _pow2(-(-B * KV * L // TARGET_PROGRAMS)), _pow2(-(-L * HD // MAX_TILE)))
    block_n = min(chunk, 64 if HD <= 128 else 32 if HD <= 256 else 16)  # key block: K and V tiles in registers
    return chunk, block_n, 4 if HD <= 128 else 8


def _launch(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv, chunk=None, block_n=None, num_warps=None):
    """Run the kernels (no shape checks: see usable()). chunk/block_n/num_warps override config() (benchmarks)."""
    B, S, _ = qkv.shape
    H, KV = n_heads, n_kv
    G, hd, L = H // KV, qkv.shape[-1] // (H + 2 * KV), k_cache.shape[2]
    c0, b0, w0 = config(B, KV, L, hd)
    chunk, block_n, num_warps = chunk or c0, block_n or b0, num_warps or w0
    nch = -(-L // chunk)
    HD = max(16, _pow2(hd))
    y = qkv.new_empty(B, S, H * hd)
    if nch == 1:
        o = ml = y  # unused
    else:
        o = torch.empty(B * KV, G * S, nch, hd, device=qkv.device, dtype=torch.float32)
        ml = torch.empty(2, B * KV, G * S, nch, device=qkv.device, dtype=torch.float32)
    prec = "ieee" if qkv.dtype == torch.float32 else "tf32"  # fp32 must not round to tf32; ignored for 16-bit
    qk_scale = math.log2(math.e) / math.sqrt(hd)
    _split_kernel[(nch, B * KV)](
        qkv, k_cache, v_cache, rope, pos, slots, start, y, o, ml,
        S, hd, ml[0].numel(), qk_scale, qkv.stride(0), qkv.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        rope.stride(0), pos.stride(0), pos.stride(1), y.stride(0), y.stride(1),
        KV=KV, G=G, CHUNK=chunk, NCH=nch, BLOCK_M=max(16, _pow2(G * S)), BLOCK_N=block_n,
        NEW_N=max(16, _pow2(S)), HD=HD, PREC=prec, num_warps=num_warps, enable_fp_fusion=False)
    if nch > 1:
        _combine_kernel[(B * KV, G * S)](o, ml, slots, start, y, S, hd, ml[0].numel(), y.stride(0), y.stride(1),
                                         KV=KV, G=G, CHUNK=chunk, NCH=nch, NCH_PAD=_pow2(nch), HD=HD, num_warps=4)
    return y


def usable(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads: int, n_kv: int) -> bool:
    """Whether the Triton path takes these arguments (see the module docstring); else the reference runs."""
    if triton is None or n_kv <= 0 or n_heads % n_kv or qkv.dim() != 3:
        return False
    B, S, width = qkv.shape
    hd = width // (n_heads + 2 * n_kv)
    tensors = (qkv, k_cache, v_cache, rope, pos, slots, start)
    return (all(t.is_cuda for t in tensors)
            and qkv.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and k_cache.dtype == v_cache.dtype == qkv.dtype and rope.dtype == torch.float32
            and pos.dtype == slots.dtype == start.dtype == torch.int64
            and width == (n_heads + 2 * n_kv) * hd and hd % 2 == 0 and 16 <= hd <= 512
            and 1 <= S <= MAX_S and max(16, _pow2(n_heads // n_kv * S)) * _pow2(hd) <= MAX_TILE
            and qkv.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and k_cache.shape == v_cache.shape == (B, n_kv, k_cache.shape[2], hd)
            and rope.dim() == 3 and rope.shape[1:] == (hd // 2, 2) and rope.stride()[1:] == (2, 1)
            and pos.shape == (B, S) and slots.shape == (S,) and slots.is_contiguous() and start.shape == (B,)
            and start.is_contiguous())


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    # one opaque call for torch.compile (fullgraph) that CUDA graphs capture; it writes the caches in place
    @torch.library.custom_op("hmtiny::decode_attention", mutates_args=("k_cache", "v_cache"))
    def decode_attention_op(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rope: torch.Tensor,
                            pos: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, n_heads: int,
                            n_kv: int) -> torch.Tensor:
        return _launch(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv)

    @decode_attention_op.register_fake
    def _(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv):
        hd = qkv.shape[-1] // (n_heads + 2 * n_kv)
        return qkv.new_empty(qkv.shape[0], qkv.shape[1], n_heads * hd)
else:  # pragma: no cover - old torch
    decode_attention_op = _launch


def decode_attention(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads: int, n_kv: int) -> torch.Tensor:
    """RoPE q/k of the S new rows, write k/v to the caches at `slots`, attend; [B, S, H*hd] in qkv's dtype.

    qkv [B, S, (H + 2 KV) hd] (q, k, v heads; last-dim stride 1), k_cache/v_cache [B, KV, L, hd] (mutated),
    rope [maxlen, hd/2, 2] fp32 (cos, sin), pos [B, S] int64, slots [S] int64 consecutive, start [B] int64:
    row i of batch row b attends to cache slots start[b] <= j <= slots[i]. The Triton kernels on CUDA where
    usable(), else decode_attention_ref."""
    args = (qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv)
    return decode_attention_op(*args) if usable(*args) else decode_attention_ref(*args)
