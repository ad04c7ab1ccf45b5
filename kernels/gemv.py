"""y = x @ W.T for a few rows of x (decode: 2 rows with CFG), streaming W once at close to memory bandwidth.

cuBLAS reaches only 1.1-1.7 TB/s on HeartMuLa's decode shapes (SPEC §10), so a frame that must read ~10.5 GB of
weights takes ~6.7 ms there. This Triton kernel splits W into row blocks (optionally also into K slices summed
afterwards in a fixed order: deterministic, no atomics) so that every SM keeps several loads in flight. Each
shape's tile sizes are picked once by timing a few candidates on the device.

Used only on CUDA for bf16/fp16 weights, at most 16 rows, shapes the tiles divide (N by the row block, K by the
K step): any other shape goes to the reference, F.linear, by design rather than through masked tiles. Rows are
masked, so any row count up to 16 runs. It is a torch custom op, so torch.compile treats it as one opaque call and
CUDA graphs capture it. `tests/test_gemv.py` checks it against `gemv_ref` (under TRITON_INTERPRET=1 on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear everywhere
    triton = None

MAX_ROWS = 16
# (rows of W per program, K per step, K slices, warps). On an H100 a sweep over bn 16-128, bk 64-512, 1-8 K slices
# and 4/8 warps picked only these neighbourhoods (split-K never won), so tuning tries just them (~5 s per process).
CANDIDATES = [(bn, bk, sk, nw) for bn in (32, 64, 128) for bk in (128, 256) for sk in (1, 2) for nw in (4, 8)]
DEFAULT = (32, 128, 1, 4)
_best: dict[tuple, tuple] = {}

if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, K_PER_SPLIT, stride_xm, stride_wn, stride_ys, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_k * K_PER_SPLIT + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
        row_ok = rm[:, None] < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K_PER_SPLIT, BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            w = tl.load(w_ptrs)
            acc += tl.dot(x, tl.trans(w))  # tensor cores on a 16-row tile: the spare rows cost nothing here
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y_ptrs = y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The plain-torch reference (and the path for every shape the kernel does not take)."""
    return F.linear(x, w)


def _stages(bn: int, bk: int) -> int:
    """Software-pipeline depth: as deep as 4 while the staged x and W tiles fit in ~200 KB of shared memory."""
    per_stage = (MAX_ROWS + bn) * bk * 2
    return max(1, min(4, 200_000 // per_stage))


def _launch(x2, w, cfg):
    bn, bk, sk, nw = cfg
    M, K = x2.shape
    N = w.shape[0]
    if sk == 1:
        y = torch.empty(1, M, N, device=x2.device, dtype=x2.dtype)
    else:
        y = torch.empty(sk, M, N, device=x2.device, dtype=torch.float32)
    _gemv_kernel[(N // bn, sk)](x2, w, y, M, K // sk, x2.stride(0), w.stride(0), y.stride(0), y.stride(1),
                                BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=_stages(bn, bk))
    return y[0] if sk == 1 else y.sum(0).to(x2.dtype)


def _fits(cfg, N, K) -> bool:
    bn, bk, sk, _ = cfg
    return N % bn == 0 and K % (bk * sk) == 0


def time_in_graph(fn, w: torch.Tensor, reps: int = 24) -> float:
    """Seconds per call of fn(w_i), measured by replaying a CUDA graph of `reps` calls over enough copies of w to
    miss the L2 cache, as in a real frame (a host-timed loop of small kernels measures launch latency instead)."""
    copies = [w] + [w.clone() for _ in range(max(0, -(-128 * 2**20 // (w.numel() * w.element_size())) - 1))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(copies[0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(copies[i % len(copies)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def _pick(x2, w):
    """Time the candidate tiles once per (N, K, dtype) and keep the fastest (outside any graph capture)."""
    key = (w.shape[0], w.shape[1], w.dtype)  # rows do not matter: every call computes a 16-row tile
    if key not in _best:
        fits = [c for c in CANDIDATES if _fits(c, w.shape[0], w.shape[1])]
        if torch.cuda.is_current_stream_capturing():  # cannot time now: a safe default (the engine warms up first)
            return DEFAULT if DEFAULT in fits else None
        times = []
        for c in fits:
            try:
                times.append((time_in_graph(lambda wi, c=c: _launch(x2, wi, c), w), c))
            except Exception:  # a tile this card cannot run (shared memory, registers): skip it
                continue
        _best[key] = min(times)[1] if times else None
    return _best[key]


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and w.is_cuda and w.dtype in (torch.bfloat16, torch.float16)
            and x.dtype == w.dtype and w.dim() == 2 and w.stride(1) == 1 and x.shape[-1] == w.shape[1]
            and x.numel() // x.shape[-1] <= MAX_ROWS
            and any(_fits(c, w.shape[0], w.shape[1]) for c in CANDIDATES))


def _gemv_impl(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    cfg = _pick(x2, w)
    y = gemv_ref(x2, w) if cfg is None else _launch(x2, w, cfg)
    return y.view(*x.shape[:-1], w.shape[0])


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("hmtiny::gemv", mutates_args=())
    def gemv_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _gemv_impl(x, w)

    @gemv_op.register_fake
    def _(x, w):
        return x.new_empty(*x.shape[:-1], w.shape[0])
else:  # pragma: no cover - old torch
    gemv_op = _gemv_impl


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) without bias; the Triton GEMV when it applies."""
    return gemv_op(x, w) if usable(x, w) else gemv_ref(x, w)
