"""RoPE + KV-cache write + attention of a few new query rows over a static cache, in ONE Triton launch.

A generation step feeds S (1..16) new rows per batch row. The torch path (FastLayer.forward) spends separate kernels
on RoPE, two index_copy cache writes and masked SDPA over the whole cache. This op is one flash-decoding launch. Its
time is nearly all latency (the backbone reads 4.8 MB at L = 584, the depth decoder almost nothing), so it keeps
the chain of dependent steps short:

* Programs: unit u = (batch row b, kv head, group of G / head_split query heads) x key chunk c. A program's rows are
  its query heads x S (e.g. 3 for the backbone; no padding to a tensor-core tile) and its keys a tile of CHUNK slots.
  The products run on the CUDA cores (broadcast and reduce) in a layout that the tile loads fix: the head dim within
  each warp's lanes and registers plus across warps, keys in lanes and registers. So q.k crosses warps only for the
  small [rows, keys] scores, and p.v does not cross warps at all (see _decode_kernel).
* Chunks are aligned to the end E = slots[0] + S of the valid keys: chunk c holds slots E - (c+1)*CHUNK .. E - c*CHUNK.
  So chunk 0 ends with the S new keys. Its program rotates them, attends to them from registers (causally: row i
  sees new keys 0..i) and is the only writer of the new cache rows; no program reads a slot written in this launch.
* Loads come in two dependent rounds, straight-line with masks (no loop bound read from memory, no branch between
  them): first slots[0], start[b], pos and the q / new k / new v rows; then the RoPE rows and the chunk's older cache
  keys start[b] <= j < slots[0]. Programs whose chunk holds no valid key load nothing and store nothing.
* One chunk (the depth decoder, L = 8): the program normalises and writes the output. Several chunks: each program
  writes its unnormalised partial (acc, max, sum), then takes a ticket from a per-unit counter (atomic, acq_rel, after
  a CTA barrier). The program that draws the last ticket merges the unit's partials in chunk order, writes the output
  and resets the counter to 0 for the next launch. Deterministic: the merge does not depend on which program came
  last. CUDA-graph safe: nothing is reset from the host.

RoPE is bit-equal to the eager reference (fp32 multiply, multiply, subtract, round to the cache dtype): the products
are `mul.rn.f32` (a multiply with an explicit rounding mode is never contracted into an FMA), so the rest of the
kernel keeps FMA contraction. Positions, slots and start are device tensors read by the kernel (no host sync:
CUDA-graph replays may advance them). Tile sizes depend only on the static shapes: config() and its TABLE.

Kernel path: CUDA, triton importable, bf16/fp16/fp32 activations and caches of the same dtype (or q/k/v as float32
K slices, summed on load), last dims of stride 1, even head_dim 16..512 (not a power of two is fine: masked),
S <= 16, pow2(G * S) * pow2(head_dim) <= 16384 (e.g. hd 128: G * S <= 128; hd 384: G * S <= 32). Anything else
runs the reference. Slots must be consecutive and start[b] <= slots[0] (else a row has no key: NaN, as in the
torch path); the engine's prefill, whose left-pad rows attend only to themselves, is therefore not this op's job.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import ahead, pdl, switches
from .counters import counters
from .custom_op import custom_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None

MAX_S = 16
MAX_TILE = 16384  # pow2(G*S) * pow2(hd): the q tile of one program
TARGET_PROGRAMS = 256  # ~2 per SM on an H100 (132 SMs) when the whole cache is valid (default rule, see config)
MERGE_REGS = 32  # fp32 partials per thread in flight in each step of the merge


class Cfg(NamedTuple):
    chunk: int  # cache slots per program (pow2, >= S): the key tile [chunk, hd] of one program
    num_warps: int
    head_split: int  # programs per (b, kv head, chunk): the G query heads are split into this many groups


# Per-shape choices, first match wins: (B, KV, G, S, hd, max L) -> Cfg. Fill from `bench/bench_decode_attention.py
# --sweep` (it prints lines for this table, with their timings against the default rule for bench/NOTES.md);
# shapes not listed use the rule in config().
TABLE: list[tuple[tuple[int, int, int, int, int, int], Cfg]] = [
    ((2, 8, 3, 1, 128, 1024), Cfg(32, 4, 3)),
    ((2, 8, 3, 1, 128, 1 << 30), Cfg(64, 4, 1)),
    ((2, 4, 2, 1, 384, 8), Cfg(8, 8, 2)),
    ((2, 4, 2, 2, 384, 8), Cfg(8, 4, 2)),
]


# Triton < 3.7 orders the non-contiguous axes of a load's layout by ascending index, later ones by descending:
# the kernel lays its tiles out accordingly (FLIP), for the same thread mapping with both (see _decode_kernel)
_FLIP = triton is not None and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)


if triton is not None:
    @triton.jit
    def _mul_rn(a, b, EXACT: tl.constexpr):
        """a * b rounded to fp32, never contracted with a following add into an FMA (EXACT: inline PTX; the
        interpreter's numpy never contracts)."""
        if EXACT:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return a * b

    @triton.jit
    def _rotate(x, cs, EXACT: tl.constexpr):
        """RoPE of x [..., D] (fp32, interleaved pairs (x[2i], x[2i+1])) by table rows cs [..., D] (cos, sin
        interleaved), as the reference writes it: even x0*cos - x1*sin, odd x1*cos + x0*sin."""
        x0, x1 = tl.split(tl.reshape(x, x.shape[:-1] + (x.shape[-1] // 2, 2)))
        cos, sin = tl.split(tl.reshape(cs, cs.shape[:-1] + (cs.shape[-1] // 2, 2)))
        r0 = _mul_rn(x0, cos, EXACT) - _mul_rn(x1, sin, EXACT)
        r1 = _mul_rn(x1, cos, EXACT) + _mul_rn(x0, sin, EXACT)
        return tl.reshape(tl.join(r0, r1), x.shape)

    @triton.jit
    def _at5(x, AX: tl.constexpr):
        """x [N] along axis AX of a 5-d tensor (size 1 elsewhere)."""
        if AX == 0:
            return x[:, None, None, None, None]
        elif AX == 1:
            return x[None, :, None, None, None]
        elif AX == 2:
            return x[None, None, :, None, None]
        elif AX == 3:
            return x[None, None, None, :, None]
        else:
            return x[None, None, None, None, :]

    @triton.jit
    def _at3(x, AX: tl.constexpr):
        """x [N] along axis AX of a 3-d tensor (size 1 elsewhere)."""
        if AX == 0:
            return x[:, None, None]
        elif AX == 1:
            return x[None, :, None]
        else:
            return x[None, None, :]

    @triton.jit
    def _load_sum(ptrs, mask, stride, SK: tl.constexpr, dtype: tl.constexpr):
        """The sum of SK slices (the q/k/v GEMV's K slices, float32; one slice: the activations themselves),
        rounded to dtype as torch's `parts.sum(0).to(dtype)`."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        for s in tl.static_range(1, SK):
            x += tl.load(ptrs + s * stride, mask=mask, other=0.0)
        return x.to(dtype)

    @triton.jit
    def _decode_kernel(qkv_ptr, k_ptr, v_ptr, rope_ptr, pos_ptr, slots_ptr, start_ptr, y_ptr, part_ptr, cnt_ptr,
                       n_part, qk_scale, stride_qk, stride_qb, stride_qs,
                       stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                       stride_rope, stride_pb, stride_ps, stride_yb, stride_ys,
                       S: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, HS: tl.constexpr, HD: tl.constexpr,
                       HD_P: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr, NCH: tl.constexpr,
                       NCH_P: tl.constexpr, COMB_C: tl.constexpr, KR: tl.constexpr, DW: tl.constexpr,
                       NK: tl.constexpr, DL: tl.constexpr, FLIP: tl.constexpr, EXACT: tl.constexpr,
                       SK: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        # Tiles and their layouts. The key tile of a program is 5-d: query rows (size 1 in the loads), key
        # repeats KR, head-dim warps DW, key lanes NK, head dim DL (key n = kr*NK + nk, dim = dw*DL + dl). Loaded
        # as such, the coalescing pass puts DL in registers (16 bytes) and lanes, NK on the lanes left, DW on the
        # warps and KR in registers, and the products with q keep that layout: the q.k sum crosses warps only
        # for the small [rows, keys] scores, p.v stays within each warp. That pass orders the non-contiguous
        # axes by index, ascending before Triton 3.7 and descending since (FLIP: the axes are laid out in
        # reverse there, for the same hardware mapping on both).
        # axes of the key tile: rows (size 1 in the loads) 3 or 0, KR, DW, NK, DL 4
        AN: tl.constexpr = 0 if FLIP else 3
        AW: tl.constexpr = 1 if FLIP else 2
        AK: tl.constexpr = 2 if FLIP else 1
        # axes of the [rows, KR, NK] scores and of the [rows, DW, DL] outputs
        SR: tl.constexpr = 2 if FLIP else 0
        SN: tl.constexpr = 0 if FLIP else 2
        TR: tl.constexpr = 1 if FLIP else 0
        TW: tl.constexpr = 0 if FLIP else 1
        GP: tl.constexpr = G // HS  # query heads per program
        u, c = pid // NCH, pid % NCH  # c = 0: the newest chunk
        bk, hg = u // HS, u % HS
        b, kvh = bk // KV, bk % KV
        r = tl.arange(0, R)  # q row r: query row i, query head kvh*G + g
        i, g = r // GP, hg * GP + r % GP
        row_ok = i < S
        d = tl.arange(0, HD_P)
        d_ok = d < HD
        mq = row_ok[:, None] & d_ok[None, :]
        # Chunk c holds keys E - (c+1)*CHUNK + n, E = slots[0] + S: chunk 0 ends with the S new keys, taken
        # from qkv (rotated here) instead of the cache.
        n5 = _at5(tl.arange(0, KR), AK) * NK + _at5(tl.arange(0, NK), AN)
        d5 = _at5(tl.arange(0, DW), AW) * DL + _at5(tl.arange(0, DL), 4)
        dm5 = d5 < HD
        t5 = n5 - (CHUNK - S)  # new key t at tile position n of chunk 0
        new5 = (t5 >= 0) & ((n5 * 0 + c) == 0)  # (scalar conditions enter masks as vectors: interpreter)
        if PDL:  # everything read below comes from earlier kernels (kernels/pdl.py)
            pdl.wait(PDL)
        # round trip 1: everything that depends on nothing
        slot0 = tl.load(slots_ptr)
        start = tl.load(start_ptr + b)
        pos_q = tl.load(pos_ptr + b * stride_pb + i * stride_ps, mask=row_ok, other=0)
        pos_t = tl.load(pos_ptr + b * stride_pb + t5 * stride_ps, mask=new5, other=0)
        act = k_ptr.dtype.element_ty  # the activations' dtype (qkv may hold float32 K slices)
        xq = _load_sum(qkv_ptr + (b * stride_qb + i * stride_qs + (kvh * G + g) * HD)[:, None] + d[None, :], mq,
                       stride_qk, SK, act)
        new_row = qkv_ptr + b * stride_qb + t5 * stride_qs + d5
        xk = _load_sum(new_row + (KV * G + kvh) * HD, new5 & dm5, stride_qk, SK, act)
        xv = _load_sum(new_row + (KV * G + KV + kvh) * HD, new5 & dm5, stride_qk, SK, act)
        n_valid = (slot0 + S - start + CHUNK - 1) // CHUNK  # chunks holding a valid key
        if c < n_valid:  # (a chunk past them loads nothing, computes nothing and stores nothing)
            # round trip 2: the RoPE rows and this chunk's older keys from the cache
            cs_q = tl.load(rope_ptr + pos_q[:, None] * stride_rope + d[None, :], mask=mq, other=0.0)
            cs_t = tl.load(rope_ptr + pos_t * stride_rope + d5, mask=new5 & dm5, other=0.0)
            j0 = slot0 + S - (c + 1) * CHUNK
            j5 = j0 + n5
            old5 = (j5 >= start) & (j5 < slot0)
            k_row = k_ptr + b * stride_kb + kvh * stride_kh + j5 * stride_kl + d5
            v_row = v_ptr + b * stride_vb + kvh * stride_vh + j5 * stride_vl + d5
            k_old = tl.load(k_row, mask=old5 & dm5, other=0.0)
            v_old = tl.load(v_row, mask=old5 & dm5, other=0.0)
            # arithmetic: RoPE, the new keys into the tile, one softmax over the tile
            q = _rotate(xq.to(tl.float32), cs_q, EXACT).to(act).to(tl.float32)  # as the ref's
            q3 = tl.reshape(q, (R, DW, DL))
            if FLIP:
                q5 = tl.permute(q3, (1, 0, 2))[None, :, None, :, :]
            else:
                q5 = q3[:, None, :, None, :]
            kn = _rotate(xk.to(tl.float32), cs_t, EXACT).to(k_ptr.dtype.element_ty)
            vn = xv.to(v_ptr.dtype.element_ty)
            k = tl.where(new5, kn, k_old).to(tl.float32)
            v = tl.where(new5, vn, v_old).to(tl.float32)
            s = tl.sum(tl.sum(q5 * k, 4), AW) * qk_scale  # [rows, KR, NK] in axes (SR, 1, SN), log2 units
            j3 = j0 + _at3(tl.arange(0, KR), 1) * NK + _at3(tl.arange(0, NK), SN)
            s = tl.where((j3 >= start) & (j3 <= slot0 + _at3(i, SR)), s, float("-inf"))
            # (registers first, then lanes: fewer shuffles)
            m_i = tl.maximum(tl.max(tl.max(s, 1), 1 if SN > 1 else SN), -1e30)  # finite: no valid key -> p = 0
            p = tl.exp2(s - _at3(m_i, SR))
            l_i = tl.sum(tl.sum(p, 1), 1 if SN > 1 else SN)
            if FLIP:
                p5 = p[:, None, :, :, None]
            else:
                p5 = p[:, :, None, :, None]
            acc = tl.sum(tl.sum(p5 * v, AK), AN if AN < AK else AN - 1)  # [rows, DW, DL] in axes (TR, TW, 2)
            mw = new5 & dm5 & ((n5 * 0 + hg) == 0)  # chunk 0 of head group 0 writes the new cache rows
            tl.store(k_row, kn, mask=mw)
            tl.store(v_row, vn, mask=mw)
            d3 = _at3(tl.arange(0, DW), TW) * DL + _at3(tl.arange(0, DL), 2)
            i3 = _at3(i, TR)
            m3 = (i3 < S) & (d3 < HD)
            y_row = (b * stride_yb + i * stride_ys + (kvh * G + g) * HD)
            if NCH == 1:  # the whole cache was this chunk: finish here
                y = acc / _at3(l_i, TR)
                tl.store(y_ptr + _at3(y_row, TR) + d3, y.to(y_ptr.dtype.element_ty), mask=m3)
            else:
                # partials: acc [units, NCH, R, HD] and (max, sum) [2, units, NCH, R]
                part = (u * NCH + c) * R + r
                tl.store(part_ptr + _at3(part, TR) * HD + d3, acc, mask=m3)
                tl.store(part_ptr + n_part * HD + part, m_i, mask=row_ok)
                tl.store(part_ptr + n_part * HD + n_part + part, l_i, mask=row_ok)
                tl.debug_barrier()  # every thread's stores before the release below (cumulative at gpu scope)
                ticket = tl.atomic_add(cnt_ptr + u, 1, sem="acq_rel", scope="gpu")
                if ticket == n_valid - 1:  # the unit's last chunk to finish: merge them all, in chunk order
                    tl.store(cnt_ptr + u, 0)  # ready for the next launch
                    # weights of all chunks from their (max, sum) [NCH_P, R]; then the partials [COMB_C, R, HD]
                    # (axes (MC, MR, 2)) a few chunks at a time, chunks in registers and rows on the warps: no
                    # cross-warp reduction. Skipped chunks: max -1e30, weight 0 (finite: no NaN in padded rows)
                    MC: tl.constexpr = 1 if FLIP else 0
                    MR: tl.constexpr = 0 if FLIP else 1
                    cc = tl.arange(0, NCH_P)[:, None]
                    pm = (u * NCH + cc) * R + r[None, :]
                    ok = (cc < n_valid) & row_ok[None, :]
                    m_c = tl.load(part_ptr + n_part * HD + pm, mask=ok, other=-1e30, cache_modifier=".cg")
                    l_c = tl.load(part_ptr + n_part * HD + n_part + pm, mask=ok, other=0.0, cache_modifier=".cg")
                    m_all = tl.max(m_c, 0)
                    den = tl.sum(tl.exp2(m_c - m_all[None, :]) * l_c, 0)
                    den = tl.where(row_ok, den, 1.0)
                    y = tl.zeros([R, HD_P], tl.float32)
                    cb = _at3(tl.arange(0, COMB_C), MC)
                    r3 = _at3(r, MR)
                    for c0 in tl.static_range(0, NCH_P, COMB_C):
                        ok3 = (c0 + cb < n_valid) & (r3 // GP < S)
                        pc = (u * NCH + c0 + cb) * R + r3
                        o = tl.load(part_ptr + pc * HD + _at3(d, 2), mask=ok3 & _at3(d_ok, 2), other=0.0,
                                    cache_modifier=".cg")
                        w = tl.exp2(tl.load(part_ptr + n_part * HD + pc, mask=ok3, other=-1e30,
                                            cache_modifier=".cg") - _at3(m_all, MR))
                        y += tl.sum(w * o, MC)
                    y = y / den[:, None]
                    tl.store(y_ptr + y_row[:, None] + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mq)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def decode_attention_ref(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads: int, n_kv: int):
    """Plain torch, the same operations as FastLayer.forward: interleaved RoPE of q and k in fp32 (rounded to the
    activation dtype), index_copy_ of k/v into the caches at `slots`, masked SDPA over the whole cache with the GQA
    layout [B, KV, G*S, hd]. Row i of batch row b attends to slots start[b] <= j <= slots[i], and always to its own
    slot: a prompt's left-pad rows (slots[i] < start[b]) see only themselves, so no softmax row is empty (the
    engine's prefill runs through here; the kernel serves decode rows, which all lie at or after start).
    qkv may also be K slices [sk, B, S, W] (see decode_attention): summed, then rounded to the caches' dtype."""
    if qkv.dim() == 4:
        qkv = qkv.sum(0).to(k_cache.dtype)
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
    mask = ((cols >= start[:, None, None]) | (cols == slots[None, :, None])) & (cols <= slots[None, :, None])
    mask = mask[:, None, None].expand(b, 1, G, s, L).reshape(b, 1, G * s, L)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
    return y.view(b, KV, G, s, hd).permute(0, 3, 1, 2, 4).reshape(b, s, H * hd)


def _floor_pow2(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def config(B: int, KV: int, L: int, hd: int, G: int = 1, S: int = 1) -> Cfg:
    """The tile choice for a shape: the TABLE entry if one matches, else a rule: one chunk (no merge) while the
    cache is short, else about TARGET_PROGRAMS programs over the whole cache (16..64 slots a chunk, fewer for wide
    heads); the query heads split into one program each while that leaves few programs."""
    for (b, kv, g, s, h, max_l), cfg in TABLE:
        if (b, kv, g, s, h) == (B, KV, G, S, hd) and L <= max_l:
            return cfg
    HD = max(16, _pow2(hd))
    most = max(_pow2(S), 8192 // HD)  # key tile of at most 16 KB (bf16) a program
    if L <= most:
        chunk = _pow2(L)
    else:
        chunk = min(most, max(16, _pow2(-(-B * KV * L // TARGET_PROGRAMS))))
    chunk = max(chunk, _pow2(S))
    nch = -(-L // chunk)
    # query heads per program: few enough that the rows (heads x S) stay <= 4 where possible (the products hold
    # rows x keys x 8 fp32 per thread), and one each when that still leaves few programs
    head_split = next((h for h in range(1, G + 1) if G % h == 0 and _pow2(G // h * S) <= 4), G)
    if B * KV * nch * head_split < 64:
        head_split = G
    return Cfg(chunk, 4 if HD <= 128 else 2, head_split)


def _launch(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv, chunk=None, num_warps=None,
            head_split=None, flip=None):
    """Run the kernel (no shape checks: see usable()). The keywords after n_kv override config() (benchmarks,
    tests)."""
    parts = qkv if qkv.dim() == 4 else qkv[None]  # [sk, B, S, W]
    SK, B, S, _ = parts.shape
    H, KV = n_heads, n_kv
    G, hd, L = H // KV, qkv.shape[-1] // (H + 2 * KV), k_cache.shape[2]
    cfg = config(B, KV, L, hd, G, S)
    chunk = max(chunk or cfg.chunk, _pow2(S))  # the new keys fit chunk 0
    num_warps = num_warps or cfg.num_warps
    head_split = head_split or cfg.head_split
    if G % head_split or chunk != _pow2(chunk):
        raise ValueError(f"head_split {head_split} must divide G = {G}, chunk {chunk} must be a power of two")
    R = _pow2(G // head_split * S)
    nch = -(-L // chunk)
    HD_P = max(16, _pow2(hd))
    # merge COMB_C chunks' partials at a time: [COMB_C, R, HD] within MERGE_REGS fp32 per thread
    comb_c = min(_pow2(nch), _floor_pow2(max(1, MERGE_REGS * 32 * num_warps // (R * HD_P))))
    # key tile [KR, DW, NK, DL] (see the kernel): 16-byte vectors along DL, warps along DW, the lanes left along NK
    vec = 16 // k_cache.element_size()
    DW = min(num_warps, max(1, HD_P // vec))
    DL = HD_P // DW
    NK = min(chunk, max(1, 32 // max(1, DL // vec)))
    KR = chunk // NK
    units = B * KV * head_split
    y = k_cache.new_empty(B, S, H * hd)
    n_part = units * nch * R
    if nch == 1:
        part = cnt = y  # unused
    else:
        part = torch.empty(n_part * (hd + 2), device=qkv.device, dtype=torch.float32)
        cnt = counters(qkv.device, units)
    grid = units * nch
    qk_scale = math.log2(math.e) / math.sqrt(hd)
    ahead.launch(
        _decode_kernel, (grid,), qkv, k_cache, v_cache, rope, pos, slots, start, y, part, cnt, n_part, qk_scale,
        *parts.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        rope.stride(0), pos.stride(0), pos.stride(1), y.stride(0), y.stride(1),
        S=S, KV=KV, G=G, HS=head_split, HD=hd, HD_P=HD_P, R=R, CHUNK=chunk, NCH=nch, NCH_P=_pow2(nch),
        COMB_C=comb_c, KR=KR, DW=DW, NK=NK, DL=DL, FLIP=_FLIP if flip is None else flip,
        EXACT=not switches.interpreting(),
        SK=SK, num_warps=num_warps, enable_fp_fusion=True, zero=(y,), **pdl.launch_kwargs(qkv))
    return y


def usable(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads: int, n_kv: int) -> bool:
    """Whether the Triton path takes these arguments (see the module docstring); else the reference runs."""
    if triton is None or n_kv <= 0 or n_heads % n_kv or qkv.dim() not in (3, 4):
        return False
    B, S, width = qkv.shape[-3:]
    hd = width // (n_heads + 2 * n_kv)
    tensors = (qkv, k_cache, v_cache, rope, pos, slots, start)
    # [B, S, W] in the caches' dtype, or K slices [sk, B, S, W] in that dtype or float32
    qkv_ok = qkv.dtype == k_cache.dtype or (qkv.dim() == 4 and qkv.dtype == torch.float32)
    return (all(t.is_cuda for t in tensors)
            and k_cache.dtype in (torch.bfloat16, torch.float16, torch.float32) and qkv_ok
            and k_cache.dtype == v_cache.dtype and rope.dtype == torch.float32
            and pos.dtype == slots.dtype == start.dtype == torch.int64
            and width == (n_heads + 2 * n_kv) * hd and hd % 2 == 0 and 16 <= hd <= 512
            and 1 <= S <= MAX_S and max(16, _pow2(n_heads // n_kv * S)) * _pow2(hd) <= MAX_TILE
            and qkv.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and k_cache.shape == v_cache.shape == (B, n_kv, k_cache.shape[2], hd)
            and rope.dim() == 3 and rope.shape[1:] == (hd // 2, 2) and rope.stride()[1:] == (2, 1)
            and pos.shape == (B, S) and slots.shape == (S,) and slots.is_contiguous() and start.shape == (B,)
            and start.is_contiguous())


# one opaque call for torch.compile (fullgraph) that CUDA graphs capture; it writes the caches in place
@custom_op("hmtiny::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rope: torch.Tensor,
                        pos: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, n_heads: int,
                        n_kv: int) -> torch.Tensor:
    return _launch(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv)


@decode_attention_op.op.register_fake
def _(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv):
    hd = qkv.shape[-1] // (n_heads + 2 * n_kv)
    return k_cache.new_empty(*qkv.shape[-3:-1], n_heads * hd)


def decode_attention(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads: int, n_kv: int) -> torch.Tensor:
    """RoPE q/k of the S new rows, write k/v to the caches at `slots`, attend; [B, S, H*hd] in the caches' dtype.

    qkv [B, S, (H + 2 KV) hd] (q, k, v heads; last-dim stride 1) in the caches' dtype, or the q/k/v GEMV's K slices
    [sk, B, S, (H + 2 KV) hd] (float32; summed here, as torch's sum(0) then rounding, so the GEMV needs no reduction
    pass and can spread over more programs), k_cache/v_cache [B, KV, L, hd] (mutated),
    rope [maxlen, hd/2, 2] fp32 (cos, sin), pos [B, S] int64, slots [S] int64 consecutive, start [B] int64:
    row i of batch row b attends to cache slots start[b] <= j <= slots[i]. The Triton kernel on CUDA where
    usable(), else decode_attention_ref."""
    args = (qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv)
    return decode_attention_op(*args) if usable(*args) else decode_attention_ref(*args)
