"""Sampling one codebook in one launch: CFG mix + bias + temperature + exact top-k + softmax + exponential race.

torch.topk sorts (gatherTopK + radixSortKVInPlace) only to read one number: the k-th
largest value. This Triton kernel runs one program per output row with the whole row in registers and finds the
top k (ties at the k-th value all kept) without sorting, on int32 keys that order like the float32 values (sign
bit clear: the bits; set: the bits with the other 31 flipped; -0.0 folded into +0.0 first, so equal floats have
equal keys). Then softmax in float32 over the kept entries and argmax(p / noise) (first index on ties, like
torch.argmax).

The search (_select_kernel): a lower bound lo on the k-th value from group maxima (the k-th largest of 128 group
maxima: k groups have an entry >= it), then the few entries >= lo (~63 of 8256 for random rows, k 50) are
compacted into a per-row scratch buffer and ranked all-pairs: an entry is kept iff fewer than k entries are
strictly above it. A fixed number of block-wide steps (~10 reductions and scans, one barrier around the scratch),
whatever the data; only when more than C (128) entries are >= lo does it bisect (rare: values crowded into few
groups, or more than C entries tying at the k-th value; then the race runs over the whole row). A bisection over
the whole key range would take tens of dependent block-wide steps.

`sample_ref` is the plain-torch reference: hmtiny.generate.sample_ids, the sampling rule, with the bias and
noise as the kernel takes them (tests/test_generate.py holds the two equal). It is the fallback off CUDA.
`sample` dispatches; on CUDA it is a torch custom op, so torch.compile treats it as one opaque call and CUDA
graphs capture it. `tests/test_topk_sample.py` checks the kernel against the reference (TRITON_INTERPRET=1 on
CPU, Triton 3.6 and later: no scalar is loaded from memory, reductions only).

Rounding: the mix is done in the reference's order (sub, mul, add; no FMA contraction) and the temperature as a
multiply by the float32 reciprocal, as torch does on CUDA for `tensor / python_float` (on CPU torch divides;
the two differ by at most one ulp). exp and the sums differ from torch's in the last bits, so ids can differ
only where two candidates are within float rounding of each other.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import ahead, pdl
from .custom_op import custom_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None


def mix_ref(logits: torch.Tensor, bias: Optional[torch.Tensor], cfg_scale: float) -> torch.Tensor:
    """[B2,V] raw logits -> [B,V] float32 to sample from: the official CFG formula, then the allowed-id bias."""
    mixed = logits.float()
    if cfg_scale != 1.0:
        cond, uncond = mixed.chunk(2)
        mixed = uncond + (cond - uncond) * cfg_scale
    return mixed if bias is None else mixed + bias


def sample_ref(logits: torch.Tensor, bias: Optional[torch.Tensor], cfg_scale: float, temperature: float,
               topk: int, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """logits [B2,V] raw head output; with cfg_scale != 1 the rows are [cond; uncond]. bias [V] float32 (0/-inf),
    noise [B,V] float32 Exp(1) draws or None. Returns int64 ids [B]."""
    mixed = mix_ref(logits, bias, cfg_scale)
    if topk == 1 or noise is None:
        return mixed.argmax(-1)
    mixed = mixed / temperature
    if 0 < topk < mixed.shape[-1]:
        kth = torch.topk(mixed, topk, dim=-1).values[..., -1:]
        mixed = mixed.masked_fill(mixed < kth, -math.inf)
    probs = torch.softmax(mixed, dim=-1)
    return (probs / noise).argmax(-1)


if triton is not None:
    KEY_NEG_INF = tl.constexpr(-2139095041)  # key of -inf: the least key of any float that is not NaN
    KEY_PAD = tl.constexpr(-2139095042)  # padding lanes and empty candidate slots: below every real key
    INT_MAX = tl.constexpr(2147483647)

    # Keys: float32 x -> int32 in the same order: the bits of x + 0.0 (IEEE round-to-nearest turns -0.0 into +0.0,
    # so equal floats get equal keys; without fast-math neither LLVM nor ptxas drops the add), the low 31 bits
    # flipped when negative. The inverse flips them back. Written inline below: each call of a @triton.jit helper
    # costs the interpreter milliseconds (the CPU test runs hundreds of programs).

    @triton.jit
    def _scores(logits_ptr, bias_ptr, row, B, stride_l, zero, offs_m, offs_t, valid_t, cfg, inv_t,
                CFG: tl.constexpr, HAS_BIAS: tl.constexpr, SAMPLE: tl.constexpr, HAS_TAIL: tl.constexpr):
        """CFG mix + bias (+ temperature when sampling) of the logits, main tile (no mask) and tail tile (lanes
        not valid_t are -inf; without a tail: the main tile again, unused)."""
        x_m = tl.load(logits_ptr + row * stride_l + offs_m).to(tl.float32)
        if CFG:  # rows [0,B) cond, [B,2B) uncond
            u = tl.load(logits_ptr + (row + B) * stride_l + offs_m).to(tl.float32)
            x_m = u + (x_m - u) * cfg
        if HAS_BIAS:
            x_m = x_m + tl.load(bias_ptr + zero + offs_m)
        if SAMPLE:
            x_m = x_m * inv_t
        x_t = x_m
        if HAS_TAIL:
            x_t = tl.load(logits_ptr + row * stride_l + offs_t, mask=valid_t, other=0.0).to(tl.float32)
            if CFG:
                u = tl.load(logits_ptr + (row + B) * stride_l + offs_t, mask=valid_t, other=0.0).to(tl.float32)
                x_t = u + (x_t - u) * cfg
            if HAS_BIAS:
                x_t = x_t + tl.load(bias_ptr + zero + offs_t, mask=valid_t, other=0.0)
            x_t = tl.where(valid_t, x_t, float("-inf"))
            if SAMPLE:
                x_t = x_t * inv_t
        return x_m, x_t

    @triton.jit
    def _first_argmax(s_m, i_m, s_t, i_t, HAS_TAIL: tl.constexpr):
        """Index of the largest score over both [*, NT] tiles, the lowest index on ties (as torch.argmax). A max
        then a min, not one tuple reduction: cheaper per element, and the interpreter runs them through numpy."""
        best = tl.max(s_m, 0)
        if HAS_TAIL:
            best = tl.maximum(best, tl.max(s_t, 0))
        best = tl.max(best, 0)
        r = tl.min(tl.where(s_m == best, i_m, INT_MAX), 0)
        if HAS_TAIL:
            r = tl.minimum(r, tl.min(tl.where(s_t == best, i_t, INT_MAX), 0))
        return tl.min(r, 0)

    @triton.jit
    def _race_tiles(x_m, keep_m, offs_m, x_t, keep_t, offs_t, m, noise_ptr, row, stride_n, HAS_TAIL: tl.constexpr):
        """Softmax (max m) over the kept entries of both tiles, then argmax(p / q): the drawn index (int32).
        Entries not kept score -1 (the reference: 0; a kept entry always scores > 0, the largest has p >= 1/V).
        Division operands of entries not kept are 1.0: a zero numerator sends div.rn.f32 to its slow path
        (a subroutine call per element), which would otherwise run for nearly every lane."""
        e_m = tl.where(keep_m, tl.exp(x_m - m), 0.0)
        s = tl.sum(e_m, 0)
        e_t = e_m
        if HAS_TAIL:
            e_t = tl.where(keep_t, tl.exp(x_t - m), 0.0)
            s += tl.sum(e_t, 0)
        s = tl.sum(s, 0)
        q = tl.load(noise_ptr + row * stride_n + offs_m, mask=keep_m, other=1.0)
        p = tl.math.div_rn(tl.where(keep_m, e_m, 1.0), s)
        score_m = tl.where(keep_m, tl.math.div_rn(p, q), -1.0)
        score_t = score_m
        if HAS_TAIL:
            q = tl.load(noise_ptr + row * stride_n + offs_t, mask=keep_t, other=1.0)
            p = tl.math.div_rn(tl.where(keep_t, e_t, 1.0), s)
            score_t = tl.where(keep_t, tl.math.div_rn(p, q), -1.0)
        return _first_argmax(score_m, offs_m, score_t, offs_t, HAS_TAIL)

    @triton.jit
    def _compact(key_m, offs_m, key_t, offs_t, lo, base, C: tl.constexpr, MAIN: tl.constexpr, TAIL: tl.constexpr,
                 HAS_TAIL: tl.constexpr):
        """Store (key, index) of the entries with key >= lo to slots [0, C) of the scratch row (keys at base,
        indices at base + C + 32); returns their count n (the slots hold them all when n <= C). Slot =
        candidates in earlier threads (one scan over threads) + earlier ones in the same thread: any order, the
        race breaks equal scores by index. The stores are not masked: entries below lo, and those past slot C,
        go to dump slots (C, 2C + 32) that are never read. (A store mask is a predicate per element live
        across the scan, which costs more than the stores.) 1-D stores: the same layout in every Triton."""
        f = (key_m >= lo).to(tl.int32)
        pre_m = tl.where(f != 0, tl.cumsum(f, 0) - f, C)  # slot among the thread's candidates, or the dump
        count = tl.sum(f, 0)  # [NT] candidates per thread
        pre_t = pre_m
        if HAS_TAIL:
            f = (key_t >= lo).to(tl.int32)
            pre_t = tl.where(f != 0, count[None, :] + tl.cumsum(f, 0) - f, C)
            count += tl.sum(f, 0)
        first = tl.cumsum(count, 0) - count  # exclusive prefix over threads
        slot = tl.reshape(tl.minimum(first[None, :] + pre_m, C), (MAIN,))
        tl.store(base + slot, tl.reshape(key_m, (MAIN,)))
        tl.store(base + (C + 32) + slot, tl.reshape(offs_m, (MAIN,)))
        if HAS_TAIL:
            slot = tl.reshape(tl.minimum(first[None, :] + pre_t, C), (TAIL,))
            tl.store(base + slot, tl.reshape(key_t, (TAIL,)))
            tl.store(base + (C + 32) + slot, tl.reshape(offs_t, (TAIL,)))
        return tl.sum(count, 0)

    @triton.jit
    def _count_ge(key_m, key_t, t, HAS_TAIL: tl.constexpr):
        c = tl.sum((key_m >= t).to(tl.int32), 0)
        if HAS_TAIL:
            c += tl.sum((key_t >= t).to(tl.int32), 0)
        return tl.sum(c, 0)

    @triton.jit(do_not_specialize=["stride_l", "stride_n", "zero"])
    def _select_kernel(logits_ptr, bias_ptr, noise_ptr, out_ptr, scratch_ptr, stats_ptr, V, B, stride_l, stride_n,
                       zero, cfg, inv_t, k,
                       CFG: tl.constexpr, HAS_BIAS: tl.constexpr, SAMPLE: tl.constexpr, FILTER: tl.constexpr,
                       R: tl.constexpr, NT: tl.constexpr, TR: tl.constexpr, G: tl.constexpr, C: tl.constexpr,
                       STATS: tl.constexpr, PDL: tl.constexpr):
        """One program per output row, NT = 32 * num_warps columns (one per thread). Main tile [R, NT]: the first
        R*NT entries (the largest power of two <= V; entry i*NT + t is register i of thread t), no mask, no
        padding; tail tile [TR, NT]: the rest, masked (TR 0: none). 8256 entries take 8192 + 256 lanes at 8 warps,
        not a 16384 block: every lane costs. A row reduction is one within each thread (registers), then one
        across threads. Loads are scalar on purpose (stride_l, zero are not specialized, so Triton cannot prove
        16-byte alignment): the candidate scatter can only be scalar, and any layout difference between the
        tile and the scatter would move the whole tile through shared memory.

        Exact top-k (ties kept) without sorting, on order-preserving int32 keys:
        1. Group maxima: thread maxima (registers), then maxima of NT // G neighbouring threads (shuffles):
           G groups (128 for V >= 4096 at >= 4 warps).
        2. lo = the k-th largest group maximum (all G x G pairs compared, one reduction): k groups have an entry
           >= lo, so count(key >= lo) >= k and the k-th largest key T is >= lo. For random rows (V 8256, k 50)
           only ~63 entries are >= lo (99th percentile ~74); with many ties at the k-th ~95.
        3. Compact the n entries >= lo (key, index) into a per-row scratch buffer (_compact).
        4. Only if n > C: bisect [lo, max] (one count per step) until at most C entries are >= lo (then 3.
           again), or until lo is T itself (more than C entries tie at T: step 5b).
        5a. One barrier, the n <= C candidates loaded as a [C] vector. Kept <=> fewer than k entries are strictly
            above (all C x C pairs, one reduction within each warp; every entry above a candidate is one).
            Softmax and the exponential race over the C slots only.
        5b. (more than C kept, or no top-k filter) softmax and race over the whole tiles.
        STATS: per row [n after step 3, bisection steps, final n, 1 = step 5a / 2 = step 5b] to stats_ptr.
        """
        row = tl.program_id(0)
        if PDL:  # everything read here comes from earlier kernels (kernels/pdl.py)
            pdl.wait(PDL)
        MAIN: tl.constexpr = R * NT
        HAS_TAIL: tl.constexpr = TR > 0
        cols = tl.arange(0, NT)[None, :]
        offs_m = tl.arange(0, R)[:, None] * NT + cols
        offs_t = MAIN + tl.arange(0, max(TR, 1))[:, None] * NT + cols
        valid_t = offs_t < V
        x_m, x_t = _scores(logits_ptr, bias_ptr, row, B, stride_l, zero, offs_m, offs_t, valid_t, cfg, inv_t,
                           CFG, HAS_BIAS, SAMPLE, HAS_TAIL)
        if SAMPLE:
            if FILTER:
                bits = (x_m + 0.0).to(tl.int32, bitcast=True)
                key_m = bits ^ ((bits >> 31) & 0x7FFFFFFF)
                gkey = tl.max(key_m, 0)  # [NT] thread maxima
                key_t = key_m
                if HAS_TAIL:
                    bits = (x_t + 0.0).to(tl.int32, bitcast=True)
                    key_t = tl.where(valid_t, bits ^ ((bits >> 31) & 0x7FFFFFFF), KEY_PAD)
                    gkey = tl.maximum(gkey, tl.max(key_t, 0))
                if NT > G:
                    gkey = tl.max(tl.reshape(gkey, (G, NT // G)), 1)  # [G] maxima of neighbouring threads
                # 2. lo = the k-th largest group maximum (none when k > G: then the least finite key); the row
                # maximum in the same reduction (joined: one pass over the warps)
                above = tl.sum((gkey[None, :] >= gkey[:, None]).to(tl.int32), 1)
                maxkey, lo32 = tl.split(tl.max(tl.join(gkey, tl.where(above >= k, gkey, KEY_NEG_INF + 1)), 0))
                base = scratch_ptr + row * (2 * C + 64)  # keys [0, C), indices [C + 32, 2C + 32)
                lo = lo32.to(tl.int64)
                hi = maxkey.to(tl.int64) + 1
                # 3. and 4. as a loop, so that the compaction is inlined once; almost always one pass, no step
                n0 = tl.full((), -1, tl.int32)  # n after the first compaction (STATS)
                n = n0
                steps = tl.full((), 0, tl.int32)
                compact = n0 < 0  # true
                while compact:
                    n = _compact(key_m, offs_m, key_t, offs_t, lo.to(tl.int32), base, C, MAIN, TR * NT, HAS_TAIL)
                    n0 = tl.where(n0 < 0, n, n0)
                    compact = n0 < 0  # false: done, unless the bisection below gets n down to C
                    if n > C:
                        # invariant: count(key >= lo) = n >= k > count(key >= hi)
                        while (n > C) & (hi - lo > 1):
                            mid = lo + (hi - lo) // 2
                            c = _count_ge(key_m, key_t, mid.to(tl.int32), HAS_TAIL)
                            ge = c >= k
                            lo = tl.where(ge, mid, lo)
                            n = tl.where(ge, c, n)
                            # exactly k at or above mid: those are the top k, lo = mid is as good as T
                            hi = tl.where(ge, tl.where(c == k, mid + 1, hi), mid)
                            steps += 1
                        compact = n <= C  # at most C now: compact at the new lo; else more than C tie at T
                m = (maxkey ^ ((maxkey >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)  # softmax max
                if n <= C:  # 5a.
                    tl.debug_barrier()  # the block's stores before its loads
                    j = tl.arange(0, C)
                    filled = j < n
                    ck = tl.load(base + j, mask=filled, other=KEY_PAD)
                    ci = tl.load(base + (C + 32) + j, mask=filled, other=0)
                    q = tl.load(noise_ptr + row * stride_n + ci, mask=filled, other=1.0)
                    # kept <=> fewer than k entries strictly above (ties at the k-th all kept). All pairs as
                    # [C, 32] blocks: one candidate per lane, so the row sums stay within a warp
                    over = tl.zeros((C, 32), tl.int32)
                    jj = tl.arange(0, 32)[None, :]
                    for c0 in tl.static_range(0, C, 32):
                        if c0 < n:  # blocks of empty slots skipped (n ~ 64 of C 128 for random rows)
                            other = tl.load(base + c0 + jj, mask=c0 + jj < n, other=KEY_PAD)
                            over += (other > ck[:, None]).to(tl.int32)
                    keep = filled & (tl.sum(over, 1) < k)
                    ck = tl.where(keep, ck, 0)  # (KEY_PAD is a signalling NaN's bits)
                    x = (ck ^ ((ck >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
                    e = tl.where(keep, tl.exp(x - m), 0.0)
                    s = tl.sum(e, 0)
                    p = tl.math.div_rn(tl.where(keep, e, 1.0), s)  # no zero numerators: see _race_tiles
                    score = tl.where(keep, tl.math.div_rn(p, tl.where(keep, q, 1.0)), -1.0)
                    # argmax, the lowest index on ties, in one reduction: kept scores are >= 0, so their bits
                    # order like the floats; the low word makes the lower index win a tie
                    packed = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (ci ^ INT_MAX).to(tl.int64)
                    res = (tl.max(packed, 0) & INT_MAX).to(tl.int32) ^ INT_MAX
                    path = 1
                else:  # 5b. more than C entries equal the k-th value; x from the keys (-0.0 folded: same exp)
                    lo32 = lo.to(tl.int32)
                    key_m = tl.where(key_m >= lo32, key_m, KEY_NEG_INF)  # (KEY_PAD is a signalling NaN's bits)
                    key_t = tl.where(key_t >= lo32, key_t, KEY_NEG_INF)
                    res = _race_tiles((key_m ^ ((key_m >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True),
                                      key_m >= lo32, offs_m,
                                      (key_t ^ ((key_t >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True),
                                      key_t >= lo32, offs_t, m, noise_ptr, row, stride_n, HAS_TAIL)
                    path = 2
                if STATS:
                    tl.store(stats_ptr + row * 4, n0)
                    tl.store(stats_ptr + row * 4 + 1, steps)
                    tl.store(stats_ptr + row * 4 + 2, n)
                    tl.store(stats_ptr + row * 4 + 3, path)
            else:
                m = tl.max(x_m, 0)
                if HAS_TAIL:
                    m = tl.maximum(m, tl.max(x_t, 0))
                res = _race_tiles(x_m, offs_m < V, offs_m, x_t, valid_t, offs_t, tl.max(m, 0), noise_ptr, row,
                                  stride_n, HAS_TAIL)
        else:  # argmax, first index on ties
            res = _first_argmax(x_m, offs_m, x_t, offs_t, HAS_TAIL)
        tl.store(out_ptr + row, res.to(tl.int64))


# Warps at V 8197..8256 (see _num_warps; bench/bench_topk_sample.py compares warp counts): 8 (fewest instructions
# issued in total, no spills: 4 warps spill, 16 and 32 repeat the small [C] / [G] vector work in more warps).
DEFAULT_WARPS = 8
GROUPS = 128  # groups (of neighbouring threads' entries) whose maxima bound the k-th value from below


def _num_warps(V: int) -> int:
    """Warps for a row of V entries. The tuned value (DEFAULT_WARPS) is for V 8197..8256 (main tile 8192);
    other sizes scale with the entries a row holds, at least 4 warps."""
    main = 1 << (V.bit_length() - 1)
    return max(4, min(32, DEFAULT_WARPS * main // 8192))


def _tiles(V: int, num_warps: int, groups: int = GROUPS) -> tuple[int, int, int, int]:
    """(R, NT, TR, G): main tile [R, NT] = the largest power of two <= V entries, NT = one column per thread
    (fewer for small V), tail tile [TR, NT] for the rest (TR 0: none), G groups for the lower bound."""
    main = 1 << (V.bit_length() - 1)
    nt = min(32 * num_warps, main)
    rest = V - main
    return main // nt, nt, (triton.next_power_of_2(-(-rest // nt)) if rest else 0), min(groups, nt)


def _capacity(topk: int) -> int:
    """Candidate slots C (power of two, >= topk or the fast path never runs): 128 for topk <= 64."""
    return 128 if topk <= 64 else min(512, triton.next_power_of_2(2 * topk))


@functools.lru_cache(maxsize=64)
def _reciprocal32(t: float) -> float:
    """float32(1) / float32(t) rounded once to float32: what torch on CUDA multiplies by for `x / t`."""
    return (torch.ones((), dtype=torch.float32) / torch.tensor(t, dtype=torch.float32)).item()


def _launch(logits: torch.Tensor, bias: Optional[torch.Tensor], cfg_scale: float, temperature: float, topk: int,
            noise: Optional[torch.Tensor], num_warps: Optional[int] = None, capacity: Optional[int] = None,
            stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    B2, V = logits.shape
    cfg = cfg_scale != 1.0
    B = B2 // 2 if cfg else B2
    sample = topk != 1 and noise is not None
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    if sample and noise.stride(1) != 1:
        noise = noise.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    inv_t = _reciprocal32(float(temperature))  # torch on CUDA: x / t is x * float32(1 / t); same bits here
    flt = sample and 0 < topk < V
    args = (logits, logits if bias is None else bias, noise if sample else logits, out)
    scalars = (V, B, logits.stride(0), noise.stride(0) if sample else 0, float(cfg_scale), inv_t, int(topk))
    warps = num_warps or _num_warps(V)
    r, nt, tr, g = _tiles(V, warps)
    c = capacity or _capacity(topk)
    scratch = torch.empty((B, 2 * c + 64) if flt else (1,), dtype=torch.int32, device=logits.device)
    if stats is not None:
        assert stats.shape == (B, 4) and stats.dtype == torch.int32 and stats.is_contiguous()
    ahead.launch(_select_kernel, (B,), *args, scratch, scratch if stats is None else stats, *scalars[:4], 0,
                 *scalars[4:], CFG=cfg, HAS_BIAS=bias is not None, SAMPLE=sample, FILTER=flt, R=r, NT=nt, TR=tr,
                 G=g, C=c, STATS=stats is not None and flt,
                 num_warps=warps, enable_fp_fusion=False,  # no FMA: round like the reference
                 zero=(out,), **pdl.launch_kwargs(logits))
    return out


@custom_op("hmtiny::topk_sample", mutates_args=())
def topk_sample_op(logits: torch.Tensor, bias: Optional[torch.Tensor], cfg_scale: float, temperature: float,
                   topk: int, noise: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch(logits, bias, cfg_scale, temperature, topk, noise)


@topk_sample_op.op.register_fake
def _(logits, bias, cfg_scale, temperature, topk, noise):
    B2 = logits.shape[0]
    return logits.new_empty(B2 // 2 if cfg_scale != 1.0 else B2, dtype=torch.int64)


def usable(logits: torch.Tensor) -> bool:
    return triton is not None and logits.is_cuda and logits.dim() == 2


def sample(logits: torch.Tensor, bias: Optional[torch.Tensor], cfg_scale: float, temperature: float, topk: int,
           noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Same arguments and result as `sample_ref`; one Triton launch on CUDA."""
    if cfg_scale != 1.0 and logits.shape[0] % 2:
        raise ValueError(f"CFG needs [cond; uncond] rows, got {logits.shape[0]}")
    if not usable(logits):
        return sample_ref(logits, bias, cfg_scale, temperature, topk, noise)
    return topk_sample_op(logits, bias, float(cfg_scale), float(temperature), int(topk), noise)
