"""Fill the L2 cache with the next kernel's weights while the memory bus would otherwise idle (Hopper).

A decode frame is a chain of kernels; only the GEMVs keep the memory busy. Between them sit kernels bound by
latency (the norms, attention, the draw), and each GEMV has a ramp and a tail where few of its programs still
read. A GEMV launched with a prefetch target asks the L2 cache, at the end of each of its programs, to fetch that
program's share of the first bytes of the next GEMV's weights (`cp.async.bulk.prefetch.L2`: one instruction per
chunk, no registers, no waiting). The next GEMV then finds those bytes in L2. It changes no result: a prefetch
only moves data into the cache.

The amount is capped (`switches.l2_prefetch_bytes`, HMTINY_L2_PREFETCH_MB, 8 MiB by default): L2 holds 50 MB on an
H100 and the running GEMV streams its own weights through it too, so fetching much more than the idle time can use
evicts what was fetched before it is read. Measured on an H100 (bench/NOTES.md, session 18): 8 MiB made the int8
decode loop 4.7% faster and bf16 1.3%; at 16 and 32 MiB int8 gained +0.7% and -1.1%, and bf16 lost 3% and 6%.

There is no plain-torch counterpart to compare with: off CUDA, on cards before Hopper and under Triton's interpreter
nothing is prefetched, and the tests check that results are the same bits with and without it.
"""
from __future__ import annotations

import torch

from . import switches

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    # the smallest chunk one prefetch instruction asks for (bytes): fewer, larger requests for the copy engine
    MIN_CHUNK = tl.constexpr(4096)

    @triton.jit
    def l2_prefetch(base_ptr, nbytes, pid, nprog, SLOTS: tl.constexpr):
        """Program `pid` of `nprog` asks L2 to fetch its share of bytes [0, nbytes) from base_ptr, in up to SLOTS
        chunks of at least MIN_CHUNK bytes (SLOTS = one per thread: no thread repeats another's request). nbytes
        and the base address are multiples of 16, as the instruction needs."""
        share = tl.cdiv(tl.cdiv(nbytes, nprog), 16) * 16
        chunk = tl.maximum(tl.cdiv(tl.cdiv(share, SLOTS), 16) * 16, MIN_CHUNK)
        end = tl.minimum((pid + 1) * share, nbytes)
        off = pid * share + tl.arange(0, SLOTS) * chunk
        size = tl.minimum(chunk, end - off)  # <= 0: nothing left for this thread
        ptrs = base_ptr.to(tl.pointer_type(tl.int8)) + off
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)


def supported(t: torch.Tensor) -> bool:
    """The instruction exists here: a CUDA device of compute capability >= 9, compiled (not interpreted) Triton."""
    if triton is None or not t.is_cuda or switches.interpreting():
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def target(x: torch.Tensor, nxt: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """(tensor, bytes) for a kernel working on x to prefetch of `nxt`, the next GEMV's weight: its first bytes up to
    the cap, rounded down to 16; (None, 0) when nothing is to be prefetched."""
    if nxt is None or not supported(x) or not nxt.is_cuda or not nxt.is_contiguous() or nxt.data_ptr() % 16:
        return None, 0
    nbytes = min(nxt.numel() * nxt.element_size(), switches.l2_prefetch_bytes()) // 16 * 16
    return (nxt, nbytes) if nbytes > 0 else (None, 0)
