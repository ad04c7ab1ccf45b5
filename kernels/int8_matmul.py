"""W8A16 matmuls: int8 weights with one fp32 scale per output channel, bf16/fp16 activations.

    forward   y  = x  @ (Wq * s[:, None]).T      x [M, K], Wq [N, K] int8, s [N]   -> y  [M, N]
    backward  dx = dy @ (Wq * s[:, None])        dy [M, N]                          -> dx [M, K]

Both are one Triton GEMM, C[M, P] = A[M, R] @ B[R, P], where B is the int8 weight read through strides (Wq.T for
the forward, Wq itself for the backward) and converted to bf16 in registers, so the weight crosses memory once, as
int8. The scale sits on the output column in the forward (applied once, in the epilogue) and on the reduction row
in the backward (applied to each weight tile before the dot).

Regimes, chosen by the number of rows M: decode (M <= 16: memory-bound, narrow weight tiles streamed with deep
pipelining so that many programs read the weight at once; optionally split along R with fp32 atomics; for M <= 2
also a CUDA-core GEMV, and "tiles", kernels/gemv.py's split GEMV, both forward only; the forward times these once
per shape inside a CUDA graph and keeps the fastest), train
(tensor-core tiles) and, for large M, dequant: one memory-bound pass writes the bf16 weight, cuBLAS multiplies
(the transient copy is one layer's weight). Every launcher has a plain-torch reference beside it (`*_ref`), which
is also the CPU/MPS path.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU/MPS installs without triton use the *_ref functions
    triton = None

from . import gemv  # "tiles": the generation engine's few-row GEMV, which also takes int8 weights + row scales
from . import pdl, switches

INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_P=16, BLOCK_R=32)  # the interpreter cannot autotune (no CUDA timers)
DECODE_MAX_M = 16


# ----------------------------------------------------------------------------- references (also the CPU path)
def dequantize_ref(wq: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Dense weight Wq * s. scale [N] (per channel) or [N, K // G] (groups of G along K)."""
    n, k = wq.shape
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale.to(compute).reshape(n, -1)
    w = wq.to(compute).view(n, s.shape[1], k // s.shape[1]) * s[:, :, None]
    return w.view(n, k).to(dtype)


def int8_matmul_ref(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (Wq * s).T in x's dtype. Dequantises first: an int8 product in fp16 before scaling could overflow."""
    return torch.nn.functional.linear(x, dequantize_ref(wq, scale, x.dtype))


def int8_matmul_dx_ref(dy: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dx = dy @ (Wq * s) in dy's dtype."""
    return dy @ dequantize_ref(wq, scale, dy.dtype)


# ----------------------------------------------------------------------------- the Triton kernel
if triton is not None:

    @triton.jit
    def _w8_gemm_kernel(
        a_ptr, b_ptr, s_ptr, c_ptr,
        M, P, R, m_bucket,  # m_bucket: only an autotuning key (configs are tuned per power-of-two M, not per M)
        stride_am, stride_ar, stride_br, stride_bp, stride_cm, stride_cp,
        SCALE_ON_R: tl.constexpr,  # False: s[p] scales output columns (forward); True: s[r] scales B's rows (backward)
        B_AS_LHS: tl.constexpr,  # compute C.T = B.T @ A.T: the weight becomes the dot's first operand
        UPCAST: tl.constexpr,  # fp32 dot: Triton's interpreter gets bf16 dots wrong, so tests run it in fp32
        EVEN_R: tl.constexpr,  # R is a multiple of BLOCK_R: no masks in the main loop
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_r = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_p = tl.cdiv(P, BLOCK_P)
        # grouped order: GROUP_M row tiles walk the same weight column tiles while those sit in L2
        width = GROUP_M * num_p
        first_m = (pid // width) * GROUP_M
        group_rows = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_rows
        pid_p = (pid % width) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        # rows/columns past the edge re-read valid ones instead of being masked (loads stay wide); never stored
        safe_m = offs_m % M
        safe_p = offs_p % P
        a_ptrs = a_ptr + safe_m[:, None] * stride_am + offs_r[None, :] * stride_ar
        b_ptrs = b_ptr + offs_r[:, None] * stride_br + safe_p[None, :] * stride_bp
        s_ptrs = s_ptr + offs_r

        if B_AS_LHS:
            acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        step = BLOCK_R * SPLIT_R
        for r0 in range(pid_r * BLOCK_R, R, step):
            in_r = (r0 + tl.arange(0, BLOCK_R)) < R
            if EVEN_R:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=in_r[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=in_r[:, None], other=0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if SCALE_ON_R:
                if EVEN_R:
                    s = tl.load(s_ptrs)
                else:
                    s = tl.load(s_ptrs, mask=in_r, other=0.0)
                b = (b.to(tl.float32) * s.to(tl.float32)[:, None]).to(a.dtype)
            else:
                b = b.to(a.dtype)  # int8 -> bf16 is exact (|q| <= 127)
            if B_AS_LHS:
                acc = tl.dot(tl.trans(b), tl.trans(a), acc)
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += step * stride_ar
            b_ptrs += step * stride_br
            s_ptrs += step

        if B_AS_LHS:
            acc = tl.trans(acc)
        if not SCALE_ON_R:
            s_out = tl.load(s_ptr + safe_p).to(tl.float32)
            acc = acc * s_out[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_p[None, :] * stride_cp
        c_mask = (offs_m[:, None] < M) & (offs_p[None, :] < P)
        if SPLIT_R == 1:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
        else:  # several programs share this tile: add fp32 partial sums into a zeroed buffer
            tl.atomic_add(c_ptrs, acc, mask=c_mask)

    _even_r = {"EVEN_R": lambda a: a["R"] % a["BLOCK_R"] == 0}
    _kernel = triton.heuristics(_even_r)(_w8_gemm_kernel)

    def _cfg(bm, bp, br, warps, stages, lhs=False, split=1, group=8):
        return triton.Config(dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, GROUP_M=group, SPLIT_R=split, B_AS_LHS=lhs),
                             num_warps=warps, num_stages=stages)

    # decode: 16-row tiles (the smallest tensor-core M); narrow weight tiles -> many programs stream the weight
    DECODE_CONFIGS = [  # the first of each list is the one used without autotuning: the most often chosen on H100
        _cfg(16, 32, 256, 4, 4), _cfg(16, 16, 256, 2, 4), _cfg(16, 16, 512, 4, 3), _cfg(16, 16, 512, 4, 4),
        _cfg(16, 16, 256, 1, 4), _cfg(16, 16, 512, 2, 3), _cfg(16, 32, 128, 2, 6),
        _cfg(16, 32, 512, 4, 3), _cfg(16, 64, 256, 4, 3), _cfg(16, 64, 128, 4, 4), _cfg(16, 16, 1024, 4, 2),
        _cfg(16, 64, 256, 4, 3, lhs=True), _cfg(16, 128, 128, 4, 4, lhs=True), _cfg(16, 64, 128, 4, 5, lhs=True),
    ]
    # decode, split along R: fp32 atomics into a zeroed buffer (more programs when P is small)
    DECODE_SPLIT_CONFIGS = [
        _cfg(16, 16, 256, 2, 4, split=2), _cfg(16, 16, 256, 2, 4, split=4), _cfg(16, 32, 256, 4, 4, split=4),
        _cfg(16, 32, 512, 4, 3, split=2), _cfg(16, 64, 256, 4, 3, split=4), _cfg(16, 64, 256, 4, 3, split=8),
        _cfg(16, 64, 256, 4, 3, lhs=True, split=4), _cfg(16, 128, 128, 4, 4, lhs=True, split=4),
    ]
    # train/prefill: tensor-core tiles; both operand orders (weight as the dot's LHS can stay in registers)
    TRAIN_CONFIGS = [
        _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4),
        _cfg(128, 64, 64, 4, 4), _cfg(64, 256, 64, 8, 3), _cfg(128, 128, 128, 8, 3),
        _cfg(128, 128, 64, 4, 4, lhs=True), _cfg(128, 128, 64, 8, 4, lhs=True), _cfg(64, 256, 64, 8, 3, lhs=True),
        _cfg(128, 256, 64, 8, 3, lhs=True), _cfg(64, 128, 64, 4, 4, lhs=True),
    ]
    @triton.jit
    def _w8_gemv_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_ym, stride_yn,
        PAIR: tl.constexpr,  # this program computes rows 2*pid_m and 2*pid_m + 1 (else only the first)
        EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[m, n] = s[n] * sum_k x[m, k] Wq[n, k] for one or two rows m: CUDA-core FMAs (M is 1 or 2, no tensor
        cores needed), each program streaming a [BLOCK_N, K] slab of a contiguous Wq in wide loads."""
        m0 = tl.program_id(1) * 2
        m1 = tl.minimum(m0 + 1, M - 1)  # an odd last row is computed twice, stored once
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + (rn % N)[:, None] * K + rk[None, :]
        x0_ptrs = x_ptr + m0 * stride_xm + rk * stride_xk
        x1_ptrs = x_ptr + m1 * stride_xm + rk * stride_xk
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            in_k = (k0 + rk) < K
            if EVEN_K:
                w = tl.load(w_ptrs).to(tl.float32)
                x0 = tl.load(x0_ptrs).to(tl.float32)
            else:
                w = tl.load(w_ptrs, mask=in_k[None, :], other=0).to(tl.float32)
                x0 = tl.load(x0_ptrs, mask=in_k, other=0.0).to(tl.float32)
            acc0 += w * x0[None, :]
            if PAIR:
                if EVEN_K:
                    x1 = tl.load(x1_ptrs).to(tl.float32)
                else:
                    x1 = tl.load(x1_ptrs, mask=in_k, other=0.0).to(tl.float32)
                acc1 += w * x1[None, :]
            w_ptrs += BLOCK_K
            x0_ptrs += BLOCK_K * stride_xk
            x1_ptrs += BLOCK_K * stride_xk
        s = tl.load(s_ptr + rn % N).to(tl.float32)
        in_n = rn < N
        tl.store(y_ptr + m0 * stride_ym + rn * stride_yn, (tl.sum(acc0, axis=1) * s).to(y_ptr.dtype.element_ty),
                 mask=in_n)
        if PAIR:
            tl.store(y_ptr + m1 * stride_ym + rn * stride_yn, (tl.sum(acc1, axis=1) * s).to(y_ptr.dtype.element_ty),
                     mask=in_n & ((rn * 0 + m0 + 1) < M))

    _gemv_kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_w8_gemv_kernel)

    def _gcfg(bn, bk, warps, stages=1):
        return triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)

    GEMV_CONFIGS = [_gcfg(8, 1024, 4), _gcfg(8, 1024, 8), _gcfg(4, 1024, 4), _gcfg(16, 512, 4), _gcfg(16, 1024, 8),
                    _gcfg(4, 2048, 8), _gcfg(8, 2048, 8), _gcfg(2, 2048, 4), _gcfg(8, 512, 4, 3), _gcfg(4, 1024, 4, 3)]
    _KEY = ["m_bucket", "P", "R", "stride_ar", "stride_br"]
    _CONFIGS = {"decode": DECODE_CONFIGS, "decode_split": DECODE_SPLIT_CONFIGS, "train": TRAIN_CONFIGS}

    def _quick_bench(fn, quantiles):  # shorter than Triton's default (25 + 100 ms per config): tuning stays seconds
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    def _autotune(configs, key, reset_to_zero=None):
        """triton.autotune with short timings, its picks kept on disk (Triton's cache, per kernel source, configs,
        key and GPU architecture) so that a later process skips the timing; older Tritons lack either argument."""
        for extra in (dict(do_bench=_quick_bench, cache_results=True), dict(do_bench=_quick_bench)):
            try:
                return triton.autotune(configs, key=key, reset_to_zero=reset_to_zero, **extra)
            except TypeError:
                continue
        return triton.autotune(configs, key=key, reset_to_zero=reset_to_zero)

    def _tuners(enabled: bool) -> dict:
        """Each regime's autotuned kernel ("gemv" too) over its config list, or over its first config only."""
        pick = (lambda c: c) if enabled else (lambda c: c[:1])
        tuned = {name: _autotune(pick(cfgs), _KEY, ["c_ptr"] if "split" in name else None)(_kernel)
                 for name, cfgs in _CONFIGS.items()}
        tuned["gemv"] = _autotune(pick(GEMV_CONFIGS), ["N", "K", "PAIR"])(_gemv_kernel)
        return tuned

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """w = q * s[:, None] for a contiguous int8 q [N, K], written in w's dtype."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        q = tl.load(q_ptr + rn[:, None] * K + rk[None, :], mask=mask, other=0)
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s[:, None]
        tl.store(w_ptr + rn[:, None] * K + rk[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# Above the decode sizes, dequantise the weight with one memory-bound pass and let cuBLAS do the product: Triton's
# fused kernel (the int8 -> bf16 conversion sits inside the tensor-core loop) runs below cuBLAS at training sizes
# (a captured 1-clip LoRA step: 84.9 ms this way, 91.0 ms with the fused kernel up to M = 1023; bench/NOTES.md).
# The fused "train" kernel stays for explicit use and the benchmarks.
DEQUANT_MIN_M = DECODE_MAX_M + 1
GEMV_MAX_M = 2


class LaunchCache:
    """What this module remembers in a process, in one object (`CACHE`; `set_autotune` starts it afresh):
    - tuned: each regime's autotuned kernel, built on first use (HMTINY_INT8_AUTOTUNE is read then);
    - compiled: each compiled kernel by everything Triton specialises on, launched directly: Triton's own launch
      path (argument binding, specialisation key, autotuner lookup) costs much host time per call
      (HMTINY_INT8_FAST_LAUNCH=0: always Triton's path; `direct` turns False for good if a Triton's launcher
      refuses a direct launch);
    - decode_choice: decode (M <= 16) has up to four kernels and the fastest depends on the shape: timed once per
      shape.
    The tuning results are also kept on disk between processes (the winning config per tuner key, the decode choice
    per shape), in kernels.gemv's tile cache file, under names that start with the card and the Triton version (a
    pick is only valid for both): read at each miss (`_stored`), written after each new tuning."""

    def __init__(self, autotune: bool | None = None):
        self.autotune = autotune
        self._tuned = None
        self.compiled: dict = {}
        self.decode_choice: dict = {}
        self.direct = True

    def autotuning(self) -> bool:
        if self.autotune is None:
            self.autotune = switches.int8_autotune()
        return self.autotune

    def tuned(self, regime: str):
        if self._tuned is None:
            self._tuned = _tuners(self.autotuning())
        return self._tuned[regime]


CACHE = LaunchCache()


def set_autotune(enabled: bool | None):
    """Autotune over each regime's config list (True), or use its first config only (False: fast tests); None:
    as HMTINY_INT8_AUTOTUNE says. Forgets every remembered kernel and choice."""
    global CACHE
    CACHE = LaunchCache(enabled)


def _stored(name: str):
    """The pick kept on disk under `name` (gemv.pick_tables: this machine's cache file first, then the picks shipped
    with the repository for known cards); None when neither has it."""
    return next((table[name] for table in gemv.pick_tables() if name in table), None)


def _pick_name(device, *key) -> str:
    """A cache entry's name: the card and the Triton version first (a tuning result is only valid for both)."""
    return "|".join(map(str, (gemv.card_name(device), f"triton {triton.__version__}", "int8", *key)))


def _config_dict(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _config_kwargs(c) -> dict:
    """A config's launch arguments, as the autotuner passes them (so the same compiled kernel is used)."""
    return c.all_kwargs() if hasattr(c, "all_kwargs") else _config_dict(c)


def _stored_or_tuned(tuner, name: str, launch, tune):
    """(kernel, grid, constexprs) of a launch: launch(config) with the config kept on disk under `name` (no tuning,
    nothing else compiled), else tune(), the autotuner's launch, whose pick is then kept. An entry that is not one
    of the tuner's configs (another config list) is ignored. A single-config tuner does no tuning: not kept."""
    configs = tuner.configs
    if len(configs) == 1:
        return tune()
    name = f"{name}|{gemv.digest([_config_dict(c) for c in configs])}"
    stored = _stored(name)
    for c in configs:
        if _config_dict(c) == stored:
            return launch(c)
    result = tune()
    gemv.remember(name, _config_dict(tuner.best_config))
    return result


def _cached_launch(key, args, slow):
    """Launch `args` with the kernel remembered under `key`; on a miss run slow() -> (kernel, grid, constexprs),
    Triton's normal launch (it compiles and autotunes), and remember what it launched."""
    cache = CACHE
    fast = cache.direct and switches.int8_fast_launch()
    hit = cache.compiled.get(key) if fast else None
    if hit is not None:
        kernel, grid, consts = hit
        try:
            kernel[grid](*args, *consts)
            return
        except TypeError:  # a Triton whose launcher takes other arguments: use its normal path from now on
            cache.direct = fast = False
    kernel, grid, consts = slow()
    if fast and hasattr(kernel, "function"):
        cache.compiled[key] = (kernel, grid, consts)


def _align_key(*tensors):
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


# (rows, columns, warps) of a dequantise program
DEQUANT_TILE = (16, 512, 4)


def dequantize(wq: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Dense weight Wq * s in `dtype`, one pass over the int8 weight (Triton on CUDA, torch elsewhere); written
    into `out` (contiguous, [N, K] in `dtype`) when given."""
    interpreting = switches.interpreting()
    if triton is None or not (wq.is_cuda or interpreting) or scale.numel() != wq.shape[0] or not wq.is_contiguous():
        w = dequantize_ref(wq, scale, dtype)
        return w if out is None else out.copy_(w)
    n, k = wq.shape
    w = torch.empty((n, k), device=wq.device, dtype=dtype) if out is None else out
    args = (wq, scale, w, n, k)
    bn, bk, warps = (16, 32, 4) if interpreting else switches.dequant_tile() or DEQUANT_TILE
    consts = (bn, bk)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk), 1)

    def slow():
        return _dequant_kernel[grid](*args, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps), grid, consts

    _cached_launch(("dequant", wq.device, scale.dtype, dtype, n, k, bn, bk, warps, *_align_key(wq, scale, w)), args,
                   slow)
    return w


def _regime(m: int) -> str:
    return "decode" if m <= DECODE_MAX_M else "train" if m < DEQUANT_MIN_M else "dequant"


def _gemv_launch(x2, wq, scale, out, config):
    m, k = x2.shape
    n = wq.shape[0]
    y = out.view(m, n) if out is not None else torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0 or n == 0:
        return y
    pair = m > 1
    args = (x2, wq, scale, y, m, n, k, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1))
    if config is not None or switches.interpreting():
        cfg = dict(config or {"BLOCK_N": 4, "BLOCK_K": 32})
        extra = {key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg}
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, 2))
        _gemv_kernel[grid](*args, PAIR=pair, **cfg, **extra)
        return y

    def slow():
        tuner = CACHE.tuned("gemv")

        def grid_consts(cfg):
            grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, 2), 1)
            return grid, (pair, k % cfg["BLOCK_K"] == 0, cfg["BLOCK_N"], cfg["BLOCK_K"])

        def launch(c):
            grid, consts = grid_consts(c.kwargs)
            return _gemv_kernel[grid](*args, PAIR=pair, **_config_kwargs(c)), grid, consts

        def tune():
            grid_fn = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, 2))
            kernel = tuner[grid_fn](*args, PAIR=pair)
            return (kernel, *grid_consts(tuner.best_config.kwargs))

        # as the autotuner's key (N, K, PAIR and the tensors' dtypes), plus alignment
        name = _pick_name(x2.device, "gemv", x2.dtype, scale.dtype, y.dtype, *align, n, k, pair)
        return _stored_or_tuned(tuner, name, launch, tune)

    align = _align_key(x2, wq, scale, y)
    key = ("gemv", x2.device, x2.dtype, scale.dtype, *align, *args[4:])
    _cached_launch(key, args, slow)
    return y


def _tiles_launch(x2, wq, scale, out):
    """kernels/gemv.py's GEMV, K kept whole (its tiles are timed once per shape by gemv.plan)."""
    cfg = gemv.plan(x2, wq, split=False, scale=scale)
    if cfg is None:
        raise ValueError(f"regime 'tiles' (kernels.gemv) does not take this call: it needs CUDA tensors, at most "
                         f"{gemv.MAX_ROWS} rows, a float32 scale per output row, a weight with unit column stride "
                         f"and N, K that its tiles divide (got x {tuple(x2.shape)} on {x2.device}, weight "
                         f"{tuple(wq.shape)} stride {wq.stride()}, scale {scale.dtype} on {scale.device})")
    y = gemv.linear_tiled(x2, wq, cfg, scale)
    return y if out is None else out.view(y.shape).copy_(y)


def _decode_candidates(x2, wq, scale) -> list[str]:
    m = x2.shape[0]
    return (["decode", "decode_split"] + (["gemv"] if m <= GEMV_MAX_M and wq.is_contiguous() else [])
            + (["tiles"] if m <= gemv.MAX_ROWS and gemv.usable(x2, wq, scale) else []))


def _time_regime(x2, wq, scale, regime: str) -> float:
    """Seconds per call in a CUDA graph of many calls over weight copies that miss L2, as in a captured decode
    frame (a host-timed loop of 5-20 µs kernels measures launch latency, not the kernels)."""
    int8_matmul(x2, wq, scale, regime=regime)  # compile, autotune, plan tiles: none of it can run inside a capture
    return gemv.time_in_graph(lambda w: int8_matmul(x2, w, scale, regime=regime), wq)


def _decode_regime(x2, wq, scale) -> str:
    """The fastest decode kernel for this shape, timed on first use (call it before capturing a CUDA graph)."""
    m, (n, k) = x2.shape[0], wq.shape
    # everything the candidates depend on, in cheap metadata (gemv.usable per call would cost host time)
    key = (x2.device, x2.dtype, triton.next_power_of_2(m), n, k, wq.stride(), scale.device, scale.dtype,
           scale.stride())
    choice = CACHE.decode_choice.get(key)
    if choice is None:
        candidates = _decode_candidates(x2, wq, scale)
        # on disk with what else changes the timings: the regimes' config lists and the gemv A/B switches
        name = _pick_name(x2.device, "decode choice", x2.dtype, *key[2:6], scale.dtype, scale.stride(), candidates,
                          CACHE.autotuning(), pdl.enabled(x2), switches.gemv_max_split())
        choice = _stored(name)
        if choice in candidates:
            CACHE.decode_choice[key] = choice
            return choice
        if x2.is_cuda and torch.cuda.is_current_stream_capturing():  # cannot time now: a default, not remembered
            return "decode"
        times = {}
        for regime in candidates:
            try:
                times[regime] = _time_regime(x2, wq, scale, regime)
            except Exception:  # a kernel this card or shape cannot run: the others still can
                continue
        if not times:
            raise RuntimeError(f"no int8 decode kernel ran for x {tuple(x2.shape)}, weight {tuple(wq.shape)}")
        choice = CACHE.decode_choice[key] = min(times, key=times.get)
        gemv.remember(name, choice)
    return choice


def _launch(a2, b, b_strides, scale, p, scale_on_r: bool, regime: str, config: dict | None, out):
    """C[M, P] = A[M, R] @ B[R, P]; B is int8 read through `b_strides` = (stride along R, stride along P)."""
    m, r = a2.shape
    interpreting = switches.interpreting()
    if config is None and interpreting:
        config = INTERPRET_CONFIG
    split = (config or {}).get("SPLIT_R", 1) > 1 or (config is None and regime == "decode_split")
    if split:
        c = torch.zeros((m, p), device=a2.device, dtype=torch.float32)
    else:
        c = out.view(m, p) if out is not None else torch.empty((m, p), device=a2.device, dtype=a2.dtype)
    if m == 0 or p == 0:
        return c.to(a2.dtype)
    args = (a2, b, scale, c, m, p, r, triton.next_power_of_2(m),
            a2.stride(0), a2.stride(1), b_strides[0], b_strides[1], c.stride(0), c.stride(1))
    if config is not None:  # explicit tiles (tests, interpreter): no autotuning
        cfg = {"GROUP_M": 8, "SPLIT_R": 1, "B_AS_LHS": False, **config}
        extra = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]), cfg["SPLIT_R"])
        _kernel[grid](*args, SCALE_ON_R=scale_on_r, UPCAST=interpreting, **cfg, **extra)
    else:
        def slow():
            tuner = CACHE.tuned(regime)

            def grid_consts(cfg):
                grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]), cfg["SPLIT_R"], 1)
                consts = (scale_on_r, cfg["B_AS_LHS"], False, r % cfg["BLOCK_R"] == 0, cfg["BLOCK_M"],
                          cfg["BLOCK_P"], cfg["BLOCK_R"], cfg["GROUP_M"], cfg["SPLIT_R"])  # constexprs, signature order
                return grid, consts

            def launch(c):
                grid, consts = grid_consts(c.kwargs)
                return _kernel[grid](*args, SCALE_ON_R=scale_on_r, UPCAST=False, **_config_kwargs(c)), grid, consts

            def tune():
                grid_fn = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]),
                                        meta["SPLIT_R"])
                kernel = tuner[grid_fn](*args, SCALE_ON_R=scale_on_r, UPCAST=False)
                return (kernel, *grid_consts(tuner.best_config.kwargs))

            # as the autotuner's key (_KEY and the tensors' dtypes), plus the direction and alignment
            name = _pick_name(a2.device, regime, scale_on_r, a2.dtype, scale.dtype, c.dtype, *align, args[7], p, r,
                              a2.stride(1), b_strides[0])
            return _stored_or_tuned(tuner, name, launch, tune)

        align = _align_key(a2, b, scale, c)
        key = (regime, scale_on_r, a2.device, a2.dtype, scale.dtype, c.dtype, *align, *args[4:])
        _cached_launch(key, args, slow)
    if split:
        return out.view(m, p).copy_(c) if out is not None else c.to(a2.dtype)
    return c


def _check(a: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor):
    if triton is None:
        raise RuntimeError("triton is not installed: use the *_ref functions")
    if a.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"W8A16 kernels take bf16/fp16 activations, got {a.dtype}")
    if wq.dtype != torch.int8 or scale.numel() != wq.shape[0]:
        raise TypeError("expected an int8 weight [N, K] and one scale per output channel [N]")


def int8_matmul(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, regime: str | None = None,
                config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (Wq * s).T. x [..., K] bf16/fp16, Wq [N, K] int8, s [N] -> y [..., N] in x's dtype.
    regime: "gemv" (M <= 2), "tiles" (kernels/gemv.py, M <= 16, CUDA, shapes its tiles divide; ValueError
    otherwise), "decode" / "decode_split" / "train" (tensor-core kernel, by config list) or "dequant" (dequantise,
    then cuBLAS); by default chosen from the number of rows (for M <= 16: the fastest of the decode kernels, timed
    on first use of a shape). config: fixed tiles, no autotuning. out: a tensor to write into."""
    _check(x, wq, scale)
    n, k = wq.shape
    x2 = x.reshape(-1, k)
    if regime is None:
        regime = _regime(x2.shape[0])
        if regime == "decode" and config is None and x2.is_cuda and not switches.interpreting() and x2.shape[0] > 0:
            regime = _decode_regime(x2, wq, scale.reshape(-1))
    if regime == "dequant" and config is None:
        y = torch.matmul(x2, dequantize(wq, scale, x.dtype).T, out=None if out is None else out.view(-1, n))
    elif regime == "gemv":
        if x2.shape[0] > GEMV_MAX_M or not wq.is_contiguous():
            raise ValueError(f"the gemv kernel takes at most {GEMV_MAX_M} rows and a contiguous weight")
        y = _gemv_launch(x2, wq, scale.reshape(-1), out, config)
    elif regime == "tiles":
        if config is not None:
            raise ValueError("regime 'tiles' picks its own tiles (kernels.gemv.plan): pass no config")
        y = _tiles_launch(x2, wq, scale.reshape(-1), out)
    else:
        y = _launch(x2, wq, (wq.stride(1), wq.stride(0)), scale.reshape(-1), n, False, regime, config, out)
    return y.view(*x.shape[:-1], n)


def int8_matmul_dx(dy: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, regime: str | None = None,
                   config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """dx = dy @ (Wq * s). dy [..., N] bf16/fp16 -> dx [..., K]; regime/config/out as for int8_matmul."""
    _check(dy, wq, scale)
    n, k = wq.shape
    dy2 = dy.reshape(-1, n)
    if regime in ("gemv", "tiles"):
        raise ValueError(f"regime {regime!r} is forward only")
    regime = regime or _regime(dy2.shape[0])
    if regime == "dequant" and config is None:
        dx = torch.matmul(dy2, dequantize(wq, scale, dy.dtype), out=None if out is None else out.view(-1, k))
    else:
        dx = _launch(dy2, wq, (wq.stride(0), wq.stride(1)), scale.reshape(-1), k, True, regime, config, out)
    return dx.view(*dy.shape[:-1], k)
