"""Seeded dropout: the keep mask is a hash of (seed, salt, element index), not a draw from a generator.

    keep[i] = fmix32(i * 0x9E3779B9  xor  (seed + salt * 0x85EBCA77)) >= p * 2**32     (uint32 arithmetic)
    y = x * keep / (1 - p)        dx = dy * keep / (1 - p)

The same seed gives the same mask wherever the op runs: the forward, gradient checkpointing's recomputation and
the backward all rebuild it from the seed (no mask is saved, no RNG state is saved or restored), and a CUDA graph
that reads the seed from device memory draws a fresh mask on every replay. `seed` is a one-element int32 tensor
on the input's device (the caller changes it per step); `salt` tells the layers apart (a Python int, fixed per
layer). fmix32 is MurmurHash3's finaliser: every input bit flips each output bit with probability ~1/2.

`seeded_dropout_ref` computes the identical mask with plain torch int64 ops (the CPU/MPS path); the Triton kernel
is the CUDA path and `tests/test_dropout.py` holds the two to each other (TRITON_INTERPRET=1 on CPU);
`bench/bench_dropout.py` times it against torch's own dropout on the device.
"""
from __future__ import annotations

import torch

from . import switches

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU/MPS installs without triton use the reference
    triton = None

GOLDEN, SALT_MUL, M1, M2 = 0x9E3779B9, 0x85EBCA77, 0x85EBCA6B, 0xC2B2AE35
MASK32 = 0xFFFFFFFF


def _threshold(p: float) -> int:
    return min(MASK32, int(round(p * 2 ** 32)))


# ----------------------------------------------------------------------------- reference (also the CPU/MPS path)
def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """a * c mod 2**32 for int64 a in [0, 2**32): two 16-bit halves of c keep every product below 2**48."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def keep_mask_ref(numel: int, seed: torch.Tensor, salt: int, p: float, device=None) -> torch.Tensor:
    """bool [numel]: which elements survive."""
    device = device or seed.device
    s = (seed.reshape(()).to(device, torch.int64) + ((salt * SALT_MUL) & MASK32)) & MASK32
    h = _mul32(torch.arange(numel, dtype=torch.int64, device=device), GOLDEN) ^ s
    h = _mul32(h ^ (h >> 16), M1)
    h = _mul32(h ^ (h >> 13), M2)
    h = h ^ (h >> 16)
    return h >= _threshold(p)


def seeded_dropout_ref(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    keep = keep_mask_ref(x.numel(), seed, salt, p, x.device).view(x.shape)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------- Triton kernel (CUDA)
if triton is not None:

    @triton.jit
    def _dropout_kernel(x_ptr, y_ptr, seed_ptr, n, salt_mixed, threshold, scale, BLOCK: tl.constexpr):
        # uint32 arithmetic wraps mod 2**32 as the reference's masked int64 ops do (bit-identical masks), in one
        # 32-bit multiply each: int64 products (several instructions each) made the kernel compute-bound
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        s = tl.load(seed_ptr).to(tl.uint32) + salt_mixed.to(tl.uint32)
        h = offs.to(tl.uint32) * tl.full([], 0x9E3779B9, tl.uint32) ^ s
        h = (h ^ (h >> 16)) * tl.full([], 0x85EBCA6B, tl.uint32)
        h = (h ^ (h >> 13)) * tl.full([], 0xC2B2AE35, tl.uint32)
        h = h ^ (h >> 16)
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        y = tl.where(h.to(tl.int64) >= threshold, x.to(tl.float32) * scale, 0.0)
        tl.store(y_ptr + offs, y.to(x.dtype), mask=inside)


def seeded_dropout_triton(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    BLOCK = 1024
    salt_mixed = (salt * SALT_MUL) & MASK32
    _dropout_kernel[(triton.cdiv(n, BLOCK),)](x, y, seed, n, salt_mixed, _threshold(p), 1.0 / (1.0 - p),
                                             BLOCK=BLOCK)
    return y


def seeded_dropout_apply(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """No autograd: the kernel on CUDA (or under the interpreter), the reference elsewhere."""
    if triton is not None and (x.is_cuda or switches.interpreting()) and x.numel() < 2 ** 31:
        return seeded_dropout_triton(x, seed, salt, p)
    return seeded_dropout_ref(x, seed, salt, p)


class SeededDropout(torch.autograd.Function):
    """Dropout whose backward rebuilds the mask from the seed: nothing of the size of x is saved."""

    @staticmethod
    def forward(ctx, x, seed, salt: int, p: float):
        ctx.save_for_backward(seed)
        ctx.salt, ctx.p = salt, p
        return seeded_dropout_apply(x, seed, salt, p)

    @staticmethod
    def backward(ctx, dy):
        (seed,) = ctx.saved_tensors
        return seeded_dropout_apply(dy, seed, ctx.salt, ctx.p), None, None, None


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    if p <= 0:
        return x
    return SeededDropout.apply(x, seed, salt, p)
