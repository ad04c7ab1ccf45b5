"""Sampling one codebook in one launch: CFG mix + bias + temperature + exact top-k + softmax + exponential race.

torch.topk sorts (gatherTopK + radixSortKVInPlace, ~44 µs a call on an H100) only to read one number: the k-th
largest value. This Triton kernel runs one program per output row with the whole row in registers and finds that
value without sorting: every float32 x maps to an int32 key that orders like x (sign bit clear: the bits; set:
the bits with the other 31 flipped; -0.0 is folded into +0.0 first, so equal floats have equal keys), and a
bisection over the key range finds the largest key T with count(key >= T) >= k. Each step is one compare and one
block-wide sum, at most 32 steps (the key range is 2^32 wide), exact, ties and -inf included; it stops early
when some T has exactly k keys at or above it (that set is then the top k itself): ~17 steps on average
for random bf16 rows at V 8256, k 50; 32 when many values equal the k-th. Then: drop keys < T,
softmax in float32, argmax(p / noise) (first index on ties, like torch.argmax).

`sample_ref` is today's torch path (hmtiny.generate: Engine._mix + sample_tokens) and the fallback off CUDA.
`sample` dispatches; on CUDA it is a torch custom op, so torch.compile treats it as one opaque call and CUDA
graphs capture it. `tests/test_topk_sample.py` checks kernel against reference (TRITON_INTERPRET=1 on CPU).

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

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference everywhere
    triton = None


def mix_ref(logits: torch.Tensor, bias: Optional[torch.Tensor], cfg_scale: float) -> torch.Tensor:
    """[B2,V] raw logits -> [B,V] float32 to sample from (hmtiny.generate's Engine._mix)."""
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
    @triton.jit
    def _topk_sample_kernel(logits_ptr, bias_ptr, noise_ptr, out_ptr, V, B, stride_l, stride_n, cfg, inv_t, k,
                            CFG: tl.constexpr, HAS_BIAS: tl.constexpr, SAMPLE: tl.constexpr,
                            FILTER: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(logits_ptr + row * stride_l + offs, mask=valid, other=0.0).to(tl.float32)
        if CFG:  # rows [0,B) cond, [B,2B) uncond
            u = tl.load(logits_ptr + (row + B) * stride_l + offs, mask=valid, other=0.0).to(tl.float32)
            x = u + (x - u) * cfg
        if HAS_BIAS:
            x = x + tl.load(bias_ptr + offs, mask=valid, other=0.0)
        x = tl.where(valid, x, float("-inf"))
        if SAMPLE:
            x = x * inv_t
            keep = valid
            if FILTER:
                x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: equal floats must get equal keys
                bits = x.to(tl.int32, bitcast=True)
                key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # key(-inf) = -2139095041, the least
                key = tl.where(valid, key, -2139095042)  # padding lanes: below every real key, never counted
                # Invariant: count(key >= lo) >= k > count(key >= hi); the answer is lo once hi == lo + 1.
                lo = tl.full((), -2139095041, tl.int64)  # all V > k real keys are >= key(-inf)
                hi = tl.max(key, 0).to(tl.int64) + 1
                while hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    c = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0)
                    ge = c >= k
                    lo = tl.where(ge, mid, lo)
                    # exactly k at or above mid: those are the top k, no need to narrow further
                    hi = tl.where(ge, tl.where(c == k, mid + 1, hi), mid)
                keep = key >= lo.to(tl.int32)
            x = tl.where(keep, x, float("-inf"))
            e = tl.exp(x - tl.max(x, 0))  # dropped entries: exp(-inf) = 0
            p = tl.math.div_rn(e, tl.sum(e, 0))
            q = tl.load(noise_ptr + row * stride_n + offs, mask=valid, other=1.0)
            x = tl.where(valid, tl.math.div_rn(p, q), -1.0)  # exponential race: argmax(p / q) ~ p
        tl.store(out_ptr + row, tl.argmax(x, 0).to(tl.int64))


def _num_warps(block: int) -> int:
    """32 values a thread for big rows (each bisection step is a compare + a block-wide sum over all of them),
    at least 4 warps for small ones. 16 warps for V 8197..8256 (block 16384): to be confirmed by the bench."""
    return max(4, min(16, block // 1024))


@functools.lru_cache(maxsize=64)
def _reciprocal32(t: float) -> float:
    """float32(1) / float32(t) rounded once to float32: what torch on CUDA multiplies by for `x / t`."""
    return (torch.ones((), dtype=torch.float32) / torch.tensor(t, dtype=torch.float32)).item()


def _launch(logits: torch.Tensor, bias: Optional[torch.Tensor], cfg_scale: float, temperature: float, topk: int,
            noise: Optional[torch.Tensor], num_warps: Optional[int] = None) -> torch.Tensor:
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
    block = triton.next_power_of_2(V)
    _topk_sample_kernel[(B,)](
        logits, logits if bias is None else bias, noise if sample else logits, out, V, B, logits.stride(0),
        noise.stride(0) if sample else 0, float(cfg_scale), inv_t, int(topk),
        CFG=cfg, HAS_BIAS=bias is not None, SAMPLE=sample, FILTER=sample and 0 < topk < V, BLOCK=block,
        num_warps=num_warps or _num_warps(block), enable_fp_fusion=False)  # no FMA: round like the reference
    return out


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("hmtiny::topk_sample", mutates_args=())
    def topk_sample_op(logits: torch.Tensor, bias: Optional[torch.Tensor], cfg_scale: float, temperature: float,
                       topk: int, noise: Optional[torch.Tensor]) -> torch.Tensor:
        return _launch(logits, bias, cfg_scale, temperature, topk, noise)

    @topk_sample_op.register_fake
    def _(logits, bias, cfg_scale, temperature, topk, noise):
        B2 = logits.shape[0]
        return logits.new_empty(B2 // 2 if cfg_scale != 1.0 else B2, dtype=torch.int64)
else:  # pragma: no cover - old torch
    topk_sample_op = _launch


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
