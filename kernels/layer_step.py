"""One decode layer step (hmtiny.engine.FastLayer, one new row per song) as ONE persistent launch: an experiment,
off unless HMTINY_LAYER_KERNEL=1.

The engine runs a layer step as seven kernels chained with PDL (norm, q/k/v GEMV, attention, o GEMV, norm,
gate/up GEMV, down GEMV); on an H100 one costs ~60 us against 33 us of int8 weight bytes, every boundary a few us
(bench/NOTES.md, session 18). Here one program per SM runs all of it, the phases separated by grid-wide barriers
(`_grid_barrier`), each program asking L2 for its share of the next phase's first weights before it waits:

  A  rows: h = x + sum(pending), n = RMSNorm(h) * g1          (programs 0..M-1, add_rmsnorm's arithmetic)
  B  q/k/v GEMV of n, float32 K-chunk partials                 (items: BN rows x one K chunk)
  C  attention over the cache in chunks of CHUNK slots          (items: song x kv head x chunk; the chunk holding the
     new slot writes the new k/v to the cache and uses them from registers); partial (max, sum, acc) per q head
  D  merge of the chunks, y = attention output                 (items: song x q head)
  E  o GEMV of y, partials
  F  rows: h2 = h + sum(o partials), n2 = RMSNorm(h2) * g2
  G  gate/up GEMV of n2, whole K, silu(gate) * up              (items: BN rows of each)
  H  down GEMV, partials: the next layer's `pending`

The GEMV phases run on the CUDA cores (1-4 rows: a tensor-core dot pads them to 16) and, with no other program on
its SM to hide its loads behind, each program loads its next weight tile (BN x KC, 16 KB for int8) before it works
on the current one; weights come in as int32 views (`words`) so the loads are 16 bytes wide.

Same contract as FastLayer.forward for a decode step: returns (h2, down partials [chunks, B, 1, D]). Its reference
is FastLayer's own path: `tests/test_persistent_layer.py` compares them under Triton's interpreter with one program
(every barrier passes at once), bf16 and int8 weights, head dims that are and are not a power of two, and compiles
the kernel for sm_90 at the 3B model's sizes (no local memory). NOT YET RUN ON A GPU: bench/persistent_layer.py
times it against the engine's layer step, bench/bench_persistent.py what a barrier costs.
"""
from __future__ import annotations

import math

import torch

from . import prefetch, switches
from .decode_attention import _pow2

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from .add_rmsnorm import normed_times, residual  # the norm's rounding, as kernels.add_rmsnorm's
    from .decode_attention import _mul_rn  # RoPE's products rounded apart, as kernels.decode_attention's
    from .gemv import _swiglu  # SwiGLU's rounding, as kernels.gemv's epilogue

    SPIN_LIMIT = tl.constexpr(1 << 22)  # polls of a barrier's count before it gives up (seconds on a GPU)

    @triton.jit
    def _grid_barrier(bar_ptr, nprog):
        """All nprog programs wait here for each other. bar = [arrived, generation, waits given up], int32, zeroed
        once when made: the last program to arrive sets `arrived` back to 0 and advances `generation`, which the
        others wait to see change, so the same words serve every barrier of every launch (no reset between
        launches, CUDA-graph friendly). A wait that polls SPIN_LIMIT times gives up and counts itself in bar[2]:
        programs that are not all resident at once would otherwise hang the card."""
        tl.debug_barrier()  # the whole program's stores before its arrival
        gen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")  # cannot advance before we arrive
        arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == nprog - 1:
            tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_add(bar_ptr + 1, 1, sem="release", scope="gpu")
        else:
            seen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
            spins = 0
            while (seen == gen) & (spins < SPIN_LIMIT):
                seen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
                spins += 1
            if seen == gen:
                tl.atomic_add(bar_ptr + 2, 1)
        tl.debug_barrier()

    @triton.jit
    def _norm_rows(x_ptr, p_ptr, SP: tl.constexpr, g_ptr, h_ptr, n_ptr, M, eps, pid, nprog,
                   D: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows of h = x + sum of SP float32 slices (rounded as add_rmsnorm), n = RMSNorm(h) * g."""
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        g = tl.load(g_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        for row in range(pid, M, nprog):
            x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0)
            h = x
            if SP > 0:
                p = tl.zeros([BLOCK_D], dtype=tl.float32)
                for s in range(SP):
                    p += tl.load(p_ptr + (s * M + row) * D + cols, mask=ok, other=0.0).to(tl.float32)
                h = residual(x, p)
            tl.store(h_ptr + row * D + cols, h, mask=ok)
            tl.store(n_ptr + row * D + cols, normed_times(h, g, D, eps).to(x.dtype), mask=ok)

    @triton.jit
    def _tile(w_ptr, row0, col0, ok, K: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr, WKIND: tl.constexpr):
        """The weight tile w[row0 : row0+BN, col0 : col0+KC] (rows K elements apart), zeros where not ok (past the
        last item), as 32-bit words [BN, KC / PER] (w_ptr: the weight viewed as int32, WKIND: what its elements
        are, see _row_dot). Triton would give each int8 element a register of its own: four times the registers,
        with two tiles live (see _gemv_partials)."""
        PER: tl.constexpr = 4 if WKIND == 0 else 2
        rn = row0 + tl.arange(0, BN)
        rk = col0 // PER + tl.arange(0, KC // PER)
        return tl.load(w_ptr + rn[:, None] * (K // PER) + rk[None, :], mask=(rn[:, None] >= 0) & ok, other=0)

    @triton.jit
    def _row_dot(w, WKIND: tl.constexpr, x_ptr, m, stride_x, col0, KC: tl.constexpr):
        """A _tile's words w times activation row m's columns col0 .. col0+KC: [BN] float32, on the CUDA cores (a
        handful of rows: a tensor-core dot would pad them to 16). WKIND: 0 int8 (4 a word), 1 bf16, 2 fp16 (2 a
        word); element j of a word pairs with column PER i + j (little-endian)."""
        PER: tl.constexpr = 4 if WKIND == 0 else 2
        cols = x_ptr + m * stride_x + col0 + PER * tl.arange(0, KC // PER)
        acc = tl.zeros(w.shape, tl.float32)
        for j in tl.static_range(PER):
            if WKIND == 0:  # sign-extend byte j
                v = ((w << (24 - 8 * j)) >> 24).to(tl.float32)
            else:  # half j, its bits
                half = ((w >> (16 * j)) & 0xFFFF).to(tl.int16)
                v = half.to(tl.bfloat16 if WKIND == 1 else tl.float16, bitcast=True).to(tl.float32)
            acc += v * tl.load(cols + j).to(tl.float32)[None, :]
        return tl.sum(acc, 1)

    @triton.jit
    def _gemv_partials(x_ptr, stride_x, w_ptr, s_ptr, out_ptr, M: tl.constexpr, pid, nprog, N: tl.constexpr,
                       K: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr, SCALED: tl.constexpr,
                       WKIND: tl.constexpr):
        """out[kc, m, n] = sum over K chunk kc of x[m, k] w[n, k] (* s[n]): items (BN rows, one K chunk), program
        pid taking items pid, pid + nprog, ... (x's rows stride_x apart). One program per SM has no other programs
        to hide its loads behind, so it loads its next item's tile before it works on this one (two tiles in
        registers: ~2 x BN x KC bytes in flight per SM)."""
        n_kc: tl.constexpr = K // KC
        n_items: tl.constexpr = (N // BN) * n_kc
        w = _tile(w_ptr, (pid // n_kc) * BN, (pid % n_kc) * KC, pid < n_items, K, BN, KC, WKIND)
        for item in range(pid, n_items, nprog):
            nxt = item + nprog
            w_next = _tile(w_ptr, (nxt // n_kc) * BN, (nxt % n_kc) * KC, nxt < n_items, K, BN, KC, WKIND)
            rn = (item // n_kc) * BN + tl.arange(0, BN)
            kc = item % n_kc
            if SCALED:
                scale = tl.load(s_ptr + rn)  # once an item, for all its rows
            for m in tl.static_range(M):
                r = _row_dot(w, WKIND, x_ptr, m, stride_x, kc * KC, KC)
                if SCALED:
                    r *= scale
                tl.store(out_ptr + (kc * M + m) * N + rn, r)
            w = w_next

    @triton.jit
    def _swiglu_rows(x_ptr, w_ptr, s_ptr, out_ptr, M: tl.constexpr, pid, nprog, F: tl.constexpr, K: tl.constexpr,
                     BN: tl.constexpr, KC: tl.constexpr, SCALED: tl.constexpr, WKIND: tl.constexpr):
        """out[m, n] = silu(x w_gate[n]) * (x w_up[n]) over the whole K, rounded as kernels.gemv's GLU epilogue
        (w = [gate; up], F rows each): items of BN rows of both, each in K chunks of KC, the next chunk's tiles
        loaded before this one's are used (as _gemv_partials)."""
        n_kc: tl.constexpr = K // KC
        MP: tl.constexpr = 1 if M == 1 else (2 if M == 2 else (4 if M <= 4 else (8 if M <= 8 else 16)))
        rows = tl.arange(0, MP)
        n_mine = tl.cdiv(F // BN - pid, nprog)  # this program's items: pid, pid + nprog, ...
        wg = _tile(w_ptr, pid * BN, 0, n_mine > 0, K, BN, KC, WKIND)
        wu = _tile(w_ptr, F + pid * BN, 0, n_mine > 0, K, BN, KC, WKIND)
        acc_g = tl.zeros([MP, BN], tl.float32)
        acc_u = tl.zeros([MP, BN], tl.float32)
        for t in range(0, n_mine * n_kc):
            item = pid + (t // n_kc) * nprog
            kc = t % n_kc
            nxt = t + 1
            row_n = (pid + (nxt // n_kc) * nprog) * BN
            more = nxt < n_mine * n_kc
            wg_next = _tile(w_ptr, row_n, (nxt % n_kc) * KC, more, K, BN, KC, WKIND)
            wu_next = _tile(w_ptr, F + row_n, (nxt % n_kc) * KC, more, K, BN, KC, WKIND)
            for m in tl.static_range(M):
                rg = _row_dot(wg, WKIND, x_ptr, m, K, kc * KC, KC)
                ru = _row_dot(wu, WKIND, x_ptr, m, K, kc * KC, KC)
                acc_g = tl.where(rows[:, None] == m, acc_g + rg[None, :], acc_g)
                acc_u = tl.where(rows[:, None] == m, acc_u + ru[None, :], acc_u)
            if kc == n_kc - 1:
                rn = item * BN + tl.arange(0, BN)
                if SCALED:
                    acc_g *= tl.load(s_ptr + rn)[None, :]
                    acc_u *= tl.load(s_ptr + F + rn)[None, :]
                ty = out_ptr.dtype.element_ty
                tl.store(out_ptr + rows[:, None] * F + rn[None, :], _swiglu(acc_g.to(ty), acc_u.to(ty)),
                         mask=rows[:, None] < M)
                acc_g = tl.zeros([MP, BN], tl.float32)
                acc_u = tl.zeros([MP, BN], tl.float32)
            wg = wg_next
            wu = wu_next

    @triton.jit
    def _attend_chunks(qkv_ptr, k_ptr, v_ptr, rope_ptr, pos_ptr, slots_ptr, start_ptr, pm_ptr, pl_ptr, pa_ptr,
                       M, L, qk_scale, pid, nprog, NKC: tl.constexpr, H: tl.constexpr, KV: tl.constexpr,
                       HD: tl.constexpr, HD_P: tl.constexpr, CHUNK: tl.constexpr, NCH: tl.constexpr,
                       G_P: tl.constexpr, EXACT: tl.constexpr):
        """Items (song b, kv head, chunk c of CHUNK slots): q/k/v summed from the NKC K chunks (rounded to the
        cache dtype), RoPE at pos[b], the new k/v written at slot (by the chunk holding it), then the chunk's
        partial softmax of its G query heads over slots start[b] <= j <= slot: (max, sum, acc) per head. Head dims
        that are not a power of two (the depth decoder's 384) are padded to HD_P and masked."""
        G: tl.constexpr = H // KV
        W: tl.constexpr = (H + 2 * KV) * HD
        HALF: tl.constexpr = HD // 2
        ty = k_ptr.dtype.element_ty
        d2 = tl.arange(0, HD_P // 2)
        dd = tl.arange(0, HD_P)
        h_ok = d2 < HALF
        d_ok = dd < HD
        gq = tl.arange(0, G_P)
        jn = tl.arange(0, CHUNK)
        slot = tl.load(slots_ptr)
        for item in range(pid, M * KV * NCH, nprog):
            b = item // (KV * NCH)
            kvh = (item // NCH) % KV
            c = item % NCH
            start = tl.load(start_ptr + b)
            pos = tl.load(pos_ptr + b)
            cos = tl.load(rope_ptr + (pos * HALF + d2) * 2, mask=h_ok, other=0.0)
            sin = tl.load(rope_ptr + (pos * HALF + d2) * 2 + 1, mask=h_ok, other=0.0)
            # the new k and v of this kv head: K chunks summed (fixed order), rounded, k rotated
            kbase = b * W + (H + kvh) * HD
            vbase = b * W + (H + KV + kvh) * HD
            k0 = tl.zeros([HD_P // 2], tl.float32)
            k1 = tl.zeros([HD_P // 2], tl.float32)
            vn = tl.zeros([HD_P], tl.float32)
            for s in range(NKC):
                k0 += tl.load(qkv_ptr + s * M * W + kbase + 2 * d2, mask=h_ok, other=0.0)
                k1 += tl.load(qkv_ptr + s * M * W + kbase + 2 * d2 + 1, mask=h_ok, other=0.0)
                vn += tl.load(qkv_ptr + s * M * W + vbase + dd, mask=d_ok, other=0.0)
            k0 = k0.to(ty).to(tl.float32)
            k1 = k1.to(ty).to(tl.float32)
            kr0 = (_mul_rn(k0, cos, EXACT) - _mul_rn(k1, sin, EXACT)).to(ty)  # no FMA: the reference rounds each
            kr1 = (_mul_rn(k1, cos, EXACT) + _mul_rn(k0, sin, EXACT)).to(ty)
            vn = vn.to(ty)
            cache_row = (b * KV + kvh) * L
            j = c * CHUNK + jn
            if (slot >= c * CHUNK) & (slot < c * CHUNK + CHUNK):
                tl.store(k_ptr + (cache_row + slot) * HD + 2 * d2, kr0, mask=h_ok)
                tl.store(k_ptr + (cache_row + slot) * HD + 2 * d2 + 1, kr1, mask=h_ok)
                tl.store(v_ptr + (cache_row + slot) * HD + dd, vn, mask=d_ok)
            valid = (j >= start) & (j <= slot) & (j < L)
            older = valid & (j != slot)
            kmask = older[:, None] & h_ok[None, :]
            kc0 = tl.load(k_ptr + (cache_row + j[:, None]) * HD + 2 * d2[None, :], mask=kmask, other=0.0)
            kc1 = tl.load(k_ptr + (cache_row + j[:, None]) * HD + 2 * d2[None, :] + 1, mask=kmask, other=0.0)
            vc = tl.load(v_ptr + (cache_row + j[:, None]) * HD + dd[None, :], mask=older[:, None] & d_ok[None, :],
                         other=0.0)
            is_new = (j == slot)[:, None]
            kc0 = tl.where(is_new, kr0[None, :], kc0)
            kc1 = tl.where(is_new, kr1[None, :], kc1)
            vc = tl.where(is_new, vn[None, :], vc)
            # the G query heads of this kv head (rows of a G_P tile), summed, rounded, rotated
            q_off = b * W + (kvh * G + gq[:, None]) * HD
            q_ok = gq[:, None] < G
            q0 = tl.zeros([G_P, HD_P // 2], tl.float32)
            q1 = tl.zeros([G_P, HD_P // 2], tl.float32)
            for s in range(NKC):
                q0 += tl.load(qkv_ptr + s * M * W + q_off + 2 * d2[None, :], mask=q_ok & h_ok[None, :], other=0.0)
                q1 += tl.load(qkv_ptr + s * M * W + q_off + 2 * d2[None, :] + 1, mask=q_ok & h_ok[None, :],
                              other=0.0)
            q0 = q0.to(ty).to(tl.float32)
            q1 = q1.to(ty).to(tl.float32)
            qr0 = (_mul_rn(q0, cos[None, :], EXACT) - _mul_rn(q1, sin[None, :], EXACT)).to(ty).to(tl.float32)
            qr1 = (_mul_rn(q1, cos[None, :], EXACT) + _mul_rn(q0, sin[None, :], EXACT)).to(ty).to(tl.float32)
            # scores [G_P, CHUNK] on the CUDA cores (few rows): q . k over the two halves
            sc = tl.sum(qr0[:, None, :] * kc0.to(tl.float32)[None, :, :], 2)
            sc += tl.sum(qr1[:, None, :] * kc1.to(tl.float32)[None, :, :], 2)
            sc = tl.where(valid[None, :], sc * qk_scale, -1e30)
            m = tl.max(sc, 1)
            p = tl.where(valid[None, :], tl.exp2(sc - m[:, None]), 0.0)
            lsum = tl.sum(p, 1)
            acc = tl.sum(p[:, :, None] * vc.to(tl.float32)[None, :, :], 1)  # [G_P, HD]
            part = ((b * H + kvh * G + gq) * NCH + c)
            tl.store(pm_ptr + part, m, mask=gq < G)
            tl.store(pl_ptr + part, lsum, mask=gq < G)
            tl.store(pa_ptr + part[:, None] * HD + dd[None, :], acc, mask=q_ok & d_ok[None, :])

    @triton.jit
    def _merge_chunks(pm_ptr, pl_ptr, pa_ptr, y_ptr, M, pid, nprog, H: tl.constexpr, HD: tl.constexpr,
                      HD_P: tl.constexpr, NCH: tl.constexpr, NCH_P: tl.constexpr):
        """Items (song b, q head h): the chunks' partials combined, y[b, h] = sum w_c acc_c / sum w_c l_c."""
        cc = tl.arange(0, NCH_P)
        dd = tl.arange(0, HD_P)
        d_ok = dd < HD
        for item in range(pid, M * H, nprog):
            base = item * NCH
            ok = cc < NCH
            m = tl.load(pm_ptr + base + cc, mask=ok, other=-1e30)
            lsum = tl.load(pl_ptr + base + cc, mask=ok, other=0.0)
            mx = tl.max(m, 0)
            w = tl.where(ok, tl.exp2(m - mx), 0.0)
            acc = tl.load(pa_ptr + (base + cc[:, None]) * HD + dd[None, :], mask=ok[:, None] & d_ok[None, :],
                          other=0.0)
            y = tl.sum(w[:, None] * acc, 0) / tl.sum(w * lsum, 0)
            tl.store(y_ptr + item * HD + dd, y.to(y_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _layer_kernel(x_ptr, pend_ptr, g1_ptr, g2_ptr, eps,
                      wqkv, sqkv, wo, so, w13, s13, w2, s2,
                      k_ptr, v_ptr, rope_ptr, pos_ptr, slots_ptr, start_ptr,
                      h1_ptr, n1_ptr, qkvp_ptr, pm_ptr, pl_ptr, pa_ptr, y_ptr, op_ptr, h2_ptr, n2_ptr, g_ptr,
                      out_ptr, bar_ptr, M: tl.constexpr, L, qk_scale,
                      D: tl.constexpr, H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr, HD_P: tl.constexpr,
                      F: tl.constexpr,
                      SP: tl.constexpr, BLOCK_D: tl.constexpr, G_P: tl.constexpr, CHUNK: tl.constexpr,
                      NCH: tl.constexpr, NCH_P: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr,
                      SCALED: tl.constexpr, WKIND: tl.constexpr, PF_BYTES: tl.constexpr,
                      PF_SLOTS: tl.constexpr, EXACT: tl.constexpr):
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        NQKV: tl.constexpr = (H + 2 * KV) * HD
        _norm_rows(x_ptr, pend_ptr, SP, g1_ptr, h1_ptr, n1_ptr, M, eps, pid, nprog, D, BLOCK_D)
        if PF_BYTES > 0:
            prefetch.l2_prefetch(wqkv, PF_BYTES, pid, nprog, PF_SLOTS)
        _grid_barrier(bar_ptr, nprog)
        _gemv_partials(n1_ptr, D, wqkv, sqkv, qkvp_ptr, M, pid, nprog, NQKV, D, BN, KC, SCALED, WKIND)
        if PF_BYTES > 0:
            prefetch.l2_prefetch(wo, PF_BYTES, pid, nprog, PF_SLOTS)
        _grid_barrier(bar_ptr, nprog)
        _attend_chunks(qkvp_ptr, k_ptr, v_ptr, rope_ptr, pos_ptr, slots_ptr, start_ptr, pm_ptr, pl_ptr, pa_ptr,
                       M, L, qk_scale, pid, nprog, D // KC, H, KV, HD, HD_P, CHUNK, NCH, G_P, EXACT)
        _grid_barrier(bar_ptr, nprog)
        _merge_chunks(pm_ptr, pl_ptr, pa_ptr, y_ptr, M, pid, nprog, H, HD, HD_P, NCH, NCH_P)
        _grid_barrier(bar_ptr, nprog)
        _gemv_partials(y_ptr, H * HD, wo, so, op_ptr, M, pid, nprog, D, H * HD, BN, KC, SCALED, WKIND)
        if PF_BYTES > 0:
            prefetch.l2_prefetch(w13, PF_BYTES, pid, nprog, PF_SLOTS)
        _grid_barrier(bar_ptr, nprog)
        _norm_rows(h1_ptr, op_ptr, (H * HD) // KC, g2_ptr, h2_ptr, n2_ptr, M, eps, pid, nprog, D, BLOCK_D)
        _grid_barrier(bar_ptr, nprog)
        _swiglu_rows(n2_ptr, w13, s13, g_ptr, M, pid, nprog, F, D, BN, KC, SCALED, WKIND)
        if PF_BYTES > 0:
            prefetch.l2_prefetch(w2, PF_BYTES, pid, nprog, PF_SLOTS)
        _grid_barrier(bar_ptr, nprog)
        _gemv_partials(g_ptr, F, w2, s2, out_ptr, M, pid, nprog, D, F, BN, KC, SCALED, WKIND)


def layer_step(layer, x, pending, rope, pos, slots, start, programs: int, bar: torch.Tensor, bn=16, kc=None,
               chunk=32, pf_bytes=0, num_warps=8):
    """FastLayer `layer`'s decode step for x [B, 1, D] (pending: [sp, B, 1, D] slices or None), one launch. Returns (h2
    [B, 1, D], down partials [F/kc chunks, B, 1, D]) like FastLayer.forward. bar: the grid barrier's three int32
    words, zeroed once when made (`_grid_barrier`; bar[2] counts waits given up). Compiled for
    sm_90 the defaults use no local memory (tests/test_persistent_layer.py); 8 warps leave room for one program
    per SM. kc (the GEMVs' K chunk, a weight tile being bn x kc) defaults to the largest `_kc` that fits. The
    song count B is compiled in (the GEMVs unroll over its rows)."""
    b = layer.block
    B, S, D = x.shape
    assert S == 1 and B <= 16, "one new row per song, at most 16 songs (usable() takes 4)"
    (wqkv, sqkv), (wo, so), (w13, s13), (w2, s2) = (f.gemv_weight() for f in (layer.qkv, layer.wo, layer.w13,
                                                                               layer.w2))
    scaled = sqkv is not None
    H, KV = layer.n_heads, layer.n_kv
    HD = wqkv.shape[0] // (H + 2 * KV)
    F = w13.shape[0] // 2
    cache = layer.cache
    L = cache.k.shape[2]
    kc = kc or _kc(D, H * HD, F)
    for n, k in ((wqkv.shape[0], D), (D, H * HD), (D, F)):
        assert n % bn == 0 and k % kc == 0, (n, k, bn, kc)
    assert F % bn == 0 and kc & (kc - 1) == 0
    dev, dt = x.device, x.dtype
    chunk = min(chunk, _pow2(L))  # the depth decoder's cache is 8 slots
    nch = -(-L // chunk)
    empty = lambda *shape, dtype=dt: torch.empty(*shape, device=dev, dtype=dtype)
    h1, n1, h2, n2 = empty(B, D), empty(B, D), empty(B, 1, D), empty(B, D)
    qkvp = empty(D // kc, B, wqkv.shape[0], dtype=torch.float32)
    pm, pl = empty(B * H * nch, dtype=torch.float32), empty(B * H * nch, dtype=torch.float32)
    pa = empty(B * H * nch, HD, dtype=torch.float32)
    y = empty(B, H * HD)
    op = empty((H * HD) // kc, B, D, dtype=torch.float32)
    g = empty(B, F)
    out = empty(F // kc, B, 1, D, dtype=torch.float32)
    pend = pending.reshape(-1, B, D).contiguous() if pending is not None else x
    _layer_kernel[(programs,)](
        x.reshape(B, D).contiguous(), pend, b.sa_norm.scale, b.mlp_norm.scale, b.sa_norm.eps,
        *[t for w, sc in ((wqkv, sqkv), (wo, so), (w13, s13), (w2, s2)) for t in (words(w), sc if scaled else w)],
        cache.k, cache.v, rope.contiguous(), pos.reshape(B).contiguous(), slots.contiguous(), start.contiguous(),
        h1, n1, qkvp, pm, pl, pa, y, op, h2, n2, g, out, bar, B, L, math.log2(math.e) / math.sqrt(HD),
        D=D, H=H, KV=KV, HD=HD, HD_P=max(32, _pow2(HD)), F=F, SP=0 if pending is None else pend.shape[0],
        BLOCK_D=_pow2(D), G_P=_pow2(H // KV), CHUNK=chunk, NCH=nch, NCH_P=_pow2(nch), BN=bn, KC=kc,
        SCALED=scaled, WKIND=WKINDS[wqkv.dtype], PF_BYTES=pf_bytes, PF_SLOTS=32 * num_warps if pf_bytes else 1,
        EXACT=not switches.interpreting(), num_warps=num_warps)
    return h2, out


WKINDS = {torch.int8: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's WKIND of a weight dtype


def words(w: torch.Tensor) -> torch.Tensor:
    """A weight as the int32 words the GEMV phases load (`_tile`): Triton knows an int32 argument is 16-byte
    aligned and loads it 16 bytes at a time, which it does not for a pointer cast inside the kernel."""
    return w.view(torch.int32)


def _kc(*widths: int) -> int | None:
    """The K chunk of every GEMV phase: the largest power of two from 1024 down to 32 that divides each K."""
    return next((kc for kc in (1024, 512, 256, 128, 64, 32) if all(w % kc == 0 for w in widths)), None)


def enabled() -> bool:
    return switches.layer_kernel()


def usable(layer, x: torch.Tensor, pending) -> bool:
    """The kernel can run this decode step: Triton on CUDA (or its interpreter), one new row per song, at most 4
    rows (its GEMVs work on the CUDA cores, row by row: more rows are the tensor-core GEMVs' work), the engine's
    fused q/k/v and gate/up with plain bf16/fp16 or per-row int8 weights of one dtype, widths the tiles divide."""
    if triton is None or x.dim() != 3 or x.shape[1] != 1 or x.shape[0] > 4 or layer.cache is None or layer.bar is None:
        return False
    if not (x.is_cuda or switches.interpreting()) or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    ws = [f.gemv_weight() for f in (layer.qkv, layer.wo, layer.w13, layer.w2)]
    if any(w is None for w in ws) or len({w[1] is None for w in ws}) != 1 or len({w[0].dtype for w in ws}) != 1:
        return False
    if ws[0][0].dtype not in WKINDS or not all(w[0].is_contiguous() for w in ws):
        return False
    (wqkv, _), (wo, _), (w13, _), (w2, _) = ws
    D = x.shape[-1]
    H, KV = layer.n_heads, layer.n_kv
    if wqkv.shape[0] % (H + 2 * KV) or w13.shape[0] % 2:
        return False
    hd = wqkv.shape[0] // (H + 2 * KV)
    F = w13.shape[0] // 2
    return (hd % 2 == 0 and layer.cache.k.dtype == x.dtype and wo.shape == (D, H * hd) and w2.shape == (D, F)
            and all(n % 16 == 0 for n in (wqkv.shape[0], D, F)) and _kc(D, H * hd, F) is not None
            and (pending is None or pending.dtype in (torch.float32, x.dtype)))


def run(layer, x, pending, rope, pos, slots, start):
    """FastLayer.forward's decode step through the kernel (see `usable`): one program per SM (one under the
    interpreter), the layer's barrier words `layer.bar` (made with its cache), the L2 prefetch as the GEMVs'."""
    programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    pf = switches.l2_prefetch_bytes() // 16 * 16 if prefetch.supported(x) else 0
    return layer_step(layer, x, pending, rope, pos, slots, start, programs, layer.bar, pf_bytes=pf)
