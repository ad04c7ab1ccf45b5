"""y = x @ W.T for a few rows of x (decode: 2 rows with CFG), streaming W once at close to memory bandwidth.

A decode frame is bound by reading the weights once, and cuBLAS reads them well below the memory's bandwidth on
HeartMuLa's few-row decode shapes (bench/NOTES.md). This Triton kernel splits W into row blocks (optionally also
into K slices, summed in a fixed order, deterministic, by the consumer or by the row block's last program) so that
every SM keeps several loads in flight. Each shape's tile sizes are picked once by timing a few candidates on the
device.

Weights may also be int8 with one float32 scale per output row (hmtiny.quant's per-channel Int8Linear): the tile
is converted to the activation dtype in registers (exact) and the scale applied to the fp32 sums, so a decode step
reads half the bytes.

SwiGLU's gate/up projection may end in the product (`glu`): each program computes the same rows of W_gate and
W_up and writes silu(gate) * up, so gate and up never go through memory. On Hopper it is launched with PDL
(kernels/pdl.py): the first weight tile is fetched before waiting for the previous kernel, and "one-shot" tiles
(the K step is the whole K slice) fetch all of a program's weights then.

Used only on CUDA for bf16/fp16 activations, at most 16 rows, shapes the tiles divide (N by the row block, K by
the K step): any other shape goes to the reference, F.linear, by design rather than through masked tiles. Rows
are masked, so any row count up to 16 runs. It is a torch custom op, so torch.compile treats it as one opaque call
and CUDA graphs capture it. Tile picks are kept on disk per machine (`cache_file`). `tests/test_gemv.py` checks it
against `gemv_ref` (under TRITON_INTERPRET=1 on CPU).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ahead, pdl, prefetch, switches
from .counters import counters
from .custom_op import custom_op
from .timing import graph_time

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear everywhere
    triton = None

MAX_ROWS = 16
# (rows of W per program, K per step, K slices, warps). A sweep over bn 16-128, bk 64-512, 1-8 K slices and 4/8
# warps on an H100 picked only these neighbourhoods, so tuning tries just them.
# HMTINY_GEMV_MAX_SPLIT (kernels/switches.py) caps their K slices when tiles are timed: an A/B switch for
# bench_generate.py (the narrow and one-shot tiles of `_candidates` are not capped).
CANDIDATES = [(bn, bk, sk, nw) for bn in (32, 64, 128) for bk in (128, 256) for sk in (1, 2, 4) for nw in (4, 8)]
DEFAULT = (32, 128, 1, 4)
# When the caller adds the K slices up itself (inside its next fused kernel, see `plan`), splitting K costs no
# extra pass: more programs keep all 132 SMs streaming for the shapes with few row blocks (N = 3072: 96 programs
# of 32 rows), so those splits are worth timing too.
PARTIAL_CANDIDATES = [(bn, bk, sk, nw) for bn in (16, 32, 64) for bk in (128, 256) for sk in (3, 4, 6, 8)
                      for nw in (4,)]
_best: dict[tuple, tuple] = {}
_names: dict[tuple, str] = {}  # key of _best -> its entry name in the cache files
# picks measured on the cards in bench/NOTES.md, used when this machine's cache has none
SHIPPED = Path(__file__).with_name("gemv_tiles.json")

if triton is not None:
    @triton.jit
    def _swiglu(g, u):
        """silu(g) * u for g, u already rounded to the output dtype, rounded like torch's `F.silu(g) * u` there
        (each op in float32, then rounded)."""
        gf = g.to(tl.float32)
        s = (gf * tl.sigmoid(gf)).to(u.dtype).to(tl.float32)
        return (s * u.to(tl.float32)).to(u.dtype)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, cnt_ptr, pf_ptr, pf_bytes, M, K_PER_SPLIT, n_out,
                     stride_xm, stride_wn, stride_ys, stride_ym, stride_ps, stride_pm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr,
                     GLU: tl.constexpr, REDUCE: tl.constexpr, PDL: tl.constexpr, PF_SLOTS: tl.constexpr):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_k * K_PER_SPLIT + tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
        up = n_out * stride_wn  # GLU: W is [gate; up], each n_out rows; a program takes the same rows of both
        row_ok = rm[:, None] < M
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        # The first weight tile does not depend on earlier kernels: with PDL it is fetched while they finish
        # (kernels/pdl.py). x and everything written come after the wait.
        w = tl.load(w_ptrs)
        if GLU:
            wu = tl.load(w_ptrs + up)
        if PDL:
            pdl.wait(PDL)
        x = tl.load(x_ptrs, mask=row_ok, other=0.0)
        # tensor cores on a 16-row tile: the spare rows cost nothing here; .to() is a no-op for bf16 weights and
        # exact for int8
        acc = tl.dot(x, tl.trans(w.to(x.dtype)))
        if GLU:
            acc_u = tl.dot(x, tl.trans(wu.to(x.dtype)))
        for k in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
            x = tl.load(x_ptrs + k, mask=row_ok, other=0.0)
            acc += tl.dot(x, tl.trans(tl.load(w_ptrs + k).to(x.dtype)))
            if GLU:
                acc_u += tl.dot(x, tl.trans(tl.load(w_ptrs + up + k).to(x.dtype)))
        if PF_SLOTS > 0:  # its weights are read: its share of the next GEMV's into L2 (kernels/prefetch.py)
            prefetch.l2_prefetch(pf_ptr, pf_bytes, pid_n + pid_k * tl.num_programs(0),
                                 tl.num_programs(0) * tl.num_programs(1), PF_SLOTS)
        if SCALED:  # per-output-row scale of an int8 weight; linear, so each K slice may apply it
            acc *= tl.load(s_ptr + rn)[None, :]
            if GLU:
                acc_u *= tl.load(s_ptr + n_out + rn)[None, :]
        out_ty = y_ptr.dtype.element_ty
        if REDUCE:
            # One output from the K slices without a second kernel: each program leaves its float32 partial (of
            # gate and up for GLU) in part [sk, M, N], the last of its row block to finish (ticket counter) adds
            # them up in slice order (deterministic) and writes y (same pattern as decode_attention's chunk merge).
            p_off = rm[:, None] * stride_pm + rn[None, :]
            tl.store(part_ptr + pid_k * stride_ps + p_off, acc, mask=row_ok)
            if GLU:
                tl.store(part_ptr + pid_k * stride_ps + n_out + p_off, acc_u, mask=row_ok)
            tl.debug_barrier()  # every thread's stores before the release below (cumulative at gpu scope)
            ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == tl.num_programs(1) - 1:
                tl.store(cnt_ptr + pid_n, 0)  # ready for the next launch
                total = tl.load(part_ptr + p_off, mask=row_ok, other=0.0, cache_modifier=".cg")
                for s in range(1, tl.num_programs(1)):
                    total += tl.load(part_ptr + s * stride_ps + p_off, mask=row_ok, other=0.0, cache_modifier=".cg")
                if GLU:
                    total_u = tl.load(part_ptr + n_out + p_off, mask=row_ok, other=0.0, cache_modifier=".cg")
                    for s in range(1, tl.num_programs(1)):
                        total_u += tl.load(part_ptr + s * stride_ps + n_out + p_off, mask=row_ok, other=0.0,
                                           cache_modifier=".cg")
                    res = _swiglu(total.to(out_ty), total_u.to(out_ty))
                else:
                    res = total.to(out_ty)
                tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], res, mask=row_ok)
        else:
            if GLU:
                res = _swiglu(acc.to(out_ty), acc_u.to(out_ty))
            else:
                res = acc.to(out_ty)
            tl.store(y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :], res, mask=row_ok)


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The plain-torch reference (and the path for every shape the kernel does not take)."""
    return F.linear(x, w)


def _stages(bn: int, bk: int) -> int:
    """Software-pipeline depth: as deep as 4 while the staged x and W tiles fit in ~200 KB of shared memory."""
    per_stage = (MAX_ROWS + bn) * bk * 2
    return max(1, min(4, 200_000 // per_stage))


def _run(x2, w, cfg, scale, glu, y, part, cnt, reduce, then=None):
    bn, bk, sk, nw = cfg
    N, K = w.shape
    n_out = N // 2 if glu else N
    pf, pf_bytes = prefetch.target(x2, then)
    ahead.launch(_gemv_kernel, (n_out // bn, sk), x2, w, w if scale is None else scale, y, part, cnt,
                 w if pf is None else pf, pf_bytes, x2.shape[0], K // sk, n_out, x2.stride(0), w.stride(0),
                 y.stride(0) if y.dim() == 3 else 0, y.stride(-2),
                 part.stride(0) if reduce else 0, part.stride(-2) if reduce else 0,
                 BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=bk, SCALED=scale is not None, GLU=glu, REDUCE=reduce,
                 PF_SLOTS=32 * nw if pf is not None else 0, num_warps=nw,
                 num_stages=_stages(bn * (2 if glu else 1), bk), zero=(y,), **pdl.launch_kwargs(x2))


def _launch_partials(x2, w, cfg, scale=None, then=None):
    """[sk, M, N]: the K slices' partial products (float32 when sk > 1, else already in x's dtype). then: the next
    GEMV's weight, whose first bytes each program asks L2 to fetch when it is done (kernels/prefetch.py)."""
    sk = cfg[2]
    y = torch.empty(sk, x2.shape[0], w.shape[0], device=x2.device, dtype=x2.dtype if sk == 1 else torch.float32)
    _run(x2, w, cfg, scale, False, y, y, y, reduce=False, then=then)
    return y


def _launch(x2, w, cfg, scale=None, glu=False, then=None):
    """[M, N] in x's dtype, or with glu (W = [gate; up]) [M, N/2] = silu(x W_gate^T) * (x W_up^T). With K slices
    the kernel adds them itself (its last program per row block): one launch. then: as in `_launch_partials`."""
    M, N, sk = x2.shape[0], w.shape[0], cfg[2]
    n_out = N // 2 if glu else N
    y = torch.empty(M, n_out, device=x2.device, dtype=x2.dtype)
    if sk == 1:
        _run(x2, w, cfg, scale, glu, y, y, y, reduce=False, then=then)
    else:
        part = torch.empty(sk, M, N, device=x2.device, dtype=torch.float32)
        _run(x2, w, cfg, scale, glu, y, part, counters(x2.device, n_out // cfg[0]), reduce=True, then=then)
    return y


def _fits(cfg, N, K, glu: bool = False) -> bool:
    bn, bk, sk, _ = cfg
    if glu and N % 2:
        return False
    return (N // 2 if glu else N) % bn == 0 and K % (bk * sk) == 0


def _candidates(K: int, partial: bool) -> list[tuple]:
    """Tiles worth timing: CANDIDATES, plus for few-row-block shapes (small N, e.g. int8 decode's 3072 -> 1024)
    16-row blocks and "one-shot" tiles whose K step is the whole K slice (a power of two): each program then issues
    all its weight loads at once, before waiting for x. With K slices summed by the consumer, more and deeper splits
    (PARTIAL_CANDIDATES)."""
    one_shot = [(bn, K // sk, sk, nw) for sk in (3, 4, 6, 8, 12, 16) if K % sk == 0 and K // sk in (256, 512, 1024)
                for bn in (16, 32) for nw in (4, 8)]
    base = [c for c in CANDIDATES if c[2] <= switches.gemv_max_split()]
    if partial:
        return base + PARTIAL_CANDIDATES + one_shot
    narrow = [(16, bk, sk, 4) for bk in (128, 256) for sk in (1, 2, 4)]
    return base + narrow + [c for c in one_shot if c[2] <= 8]


def time_in_graph(fn, w: torch.Tensor, reps: int = 24) -> float:
    """Seconds per call of fn(w_i), measured by replaying a CUDA graph of `reps` calls over enough copies of w to
    miss the L2 cache, as in a real frame (a host-timed loop of small kernels measures launch latency instead)."""
    copies = [w] + [w.clone() for _ in range(max(0, -(-128 * 2**20 // (w.numel() * w.element_size())) - 1))]
    return graph_time(lambda i: fn(copies[i % len(copies)]), reps, warmup=1)


def cache_file():
    """Where the tiles picked on this machine are kept between processes (timing every candidate means many Triton
    compiles on a fresh machine): $HMTINY_TILE_CACHE, or ~/.cache/hmtiny/gemv_tiles.json; "0" = none. The int8
    kernels keep their tuning picks in the same file (kernels/int8_matmul.py), under names of their own."""
    return switches.tile_cache_path()


_warned: set = set()


def read_cache(path) -> dict:
    """The picks kept in `path`; {} when there is none yet, or (with one warning per file) when it cannot be read
    or is not a table of picks: its tiles are then timed again and the file rewritten."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        problem = f"unreadable ({e})"
    else:
        try:
            table = json.loads(text)
            if isinstance(table, dict):
                return table
            problem = "not a JSON object"
        except ValueError as e:
            problem = f"damaged ({e})"
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"tile cache {path} is {problem}: ignored, its picks are timed again", stacklevel=2)
    return {}


def remember(name: str, value) -> None:
    """Add one pick (any JSON value) to the cache file: read, update, write a temporary file, rename (atomic; a
    failed write, e.g. a read-only home, only costs the timing next time)."""
    path = cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = read_cache(path)
        table[name] = value
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def card_name(device: torch.device) -> str:
    """The cache files' name of a device: the CUDA card's name (picks differ between cards), else the device."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def digest(candidates) -> str:
    return hashlib.sha1(repr(candidates).encode()).hexdigest()[:10]


def _cache_name(key: tuple, x2: torch.Tensor, fits: list) -> str:
    """An entry's name: the card, the shape and kind, and the candidate list (a new list re-times)."""
    return "|".join(map(str, (card_name(x2.device), *key, digest(fits))))


def pick_tables() -> list[dict]:
    """The kept picks, in the order to look them up: this machine's cache file (`cache_file`), then the picks
    shipped with the repository for known cards (SHIPPED). kernels.int8_matmul keeps its tuning picks there too."""
    path = cache_file()
    return [read_cache(path) if path is not None else {}, read_cache(SHIPPED)]


def has_shipped_picks(device) -> bool:
    """SHIPPED holds picks for this CUDA card (its first run then skips most of the timing)."""
    card = torch.cuda.get_device_name(device) + "|"
    return any(name.startswith(card) for name in read_cache(SHIPPED))


def export_picks() -> dict:
    """This process's picks in the cache files' format (bench/bench_generate.py writes them out; copied into
    SHIPPED they spare users of that card the first run's timing)."""
    return {_names[k]: list(t) for k, t in _best.items() if t is not None and k in _names}


def pick_key(w: torch.Tensor, x_dtype: torch.dtype, partial: bool, glu: bool) -> tuple:
    """What a tile pick is kept under (in `_best`, and with the card in the cache files' names): the weight's shape
    and dtype, the activations' dtype, the kind (K slices summed by the caller, SwiGLU epilogue) and PDL."""
    return w.shape[0], w.shape[1], w.dtype, x_dtype, partial, glu, pdl.enabled(w)


def _pick(x2, w, partial: bool = False, scale=None, glu: bool = False):
    """The fastest candidate tile, timed once per (N, K, dtypes, kind) on this machine (outside any graph capture)
    and remembered in memory and in `cache_file` (SHIPPED gives picks for known cards). partial: the caller sums
    the K slices itself (fused into its next kernel), so a split's sum is not timed. glu: see `linear_tiled`."""
    key = pick_key(w, x2.dtype, partial, glu)
    if key in _best:
        return _best[key]
    fits = [c for c in _candidates(w.shape[1], partial) if _fits(c, w.shape[0], w.shape[1], glu)]
    name = _names[key] = _cache_name(key, x2, fits)
    for table in pick_tables():
        stored = table.get(name)
        if isinstance(stored, list) and tuple(stored) in fits:
            _best[key] = tuple(stored)
            return _best[key]
    if x2.is_cuda and torch.cuda.is_current_stream_capturing():  # cannot time now: a safe default (warm up first)
        return DEFAULT if DEFAULT in fits else None
    if partial:
        launch = lambda wi, c: _launch_partials(x2, wi, c, scale)
    else:
        launch = lambda wi, c: _launch(x2, wi, c, scale, glu)
    times = []
    for c in fits:
        try:
            times.append((time_in_graph(lambda wi, c=c: launch(wi, c), w), c))
        except Exception:  # a tile this card cannot run (shared memory, registers): skip it
            continue
    _best[key] = min(times)[1] if times else None
    if times:  # an empty result may be passing trouble: not kept on disk
        remember(name, list(_best[key]))
    return _best[key]


def usable(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, glu: bool = False) -> bool:
    if scale is None:
        dtype_ok = w.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype
    else:  # int8 weight, float32 scale per output row
        dtype_ok = (w.dtype == torch.int8 and x.dtype in (torch.bfloat16, torch.float16) and scale.is_cuda
                    and scale.dtype == torch.float32 and scale.shape == (w.shape[0],) and scale.is_contiguous())
    return (triton is not None and x.is_cuda and w.is_cuda and dtype_ok
            and w.dim() == 2 and w.stride(1) == 1 and x.shape[-1] == w.shape[1]
            and x.numel() // x.shape[-1] <= MAX_ROWS
            and any(_fits(c, w.shape[0], w.shape[1], glu) for c in CANDIDATES))


@custom_op("hmtiny::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, w: torch.Tensor, then: torch.Tensor | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    cfg = _pick(x2, w)
    y = gemv_ref(x2, w) if cfg is None else _launch(x2, w, cfg, then=then)
    return y.view(*x.shape[:-1], w.shape[0])


@gemv_op.op.register_fake
def _(x, w, then=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@custom_op("hmtiny::gemv_partials", mutates_args=())
def partials_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bn: int, bk: int, sk: int,
                nw: int, then: torch.Tensor | None = None) -> torch.Tensor:
    return _launch_partials(x.reshape(-1, x.shape[-1]).contiguous(), w, (bn, bk, sk, nw), scale, then)


@partials_op.op.register_fake
def _(x, w, scale, bn, bk, sk, nw, then=None):
    m = x.numel() // x.shape[-1]
    return x.new_empty(sk, m, w.shape[0], dtype=x.dtype if sk == 1 else torch.float32)


@custom_op("hmtiny::gemv_tiled", mutates_args=())
def tiled_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bn: int, bk: int, sk: int,
             nw: int, glu: bool, then: torch.Tensor | None = None) -> torch.Tensor:
    return _launch(x.reshape(-1, x.shape[-1]).contiguous(), w, (bn, bk, sk, nw), scale, glu, then)


@tiled_op.op.register_fake
def _(x, w, scale, bn, bk, sk, nw, glu, then=None):
    return x.new_empty(x.numel() // x.shape[-1], w.shape[0] // (2 if glu else 1))


def plan(x: torch.Tensor, w: torch.Tensor, split: bool = True, scale: torch.Tensor | None = None,
         glu: bool = False) -> tuple | None:
    """The tile for `partials` / `linear_split` (split=True: the caller adds the K slices) or for `linear_tiled`
    (split=False: one whole output; K slices, if any, are added inside the kernel), timed now, once per shape (call
    it before capture/compile); None when the kernel does not apply.
    scale: the float32 per-row scales of an int8 weight. glu: for `linear_tiled(..., glu=True)` (not split)."""
    if not usable(x, w, scale, glu) or (glu and split):
        return None
    return _pick(x.reshape(-1, x.shape[-1]).contiguous(), w, partial=split, scale=scale, glu=glu)


def partials(x: torch.Tensor, w: torch.Tensor, cfg: tuple, scale: torch.Tensor | None = None,
             then: torch.Tensor | None = None):
    """The K slices of F.linear(x, w) (w * scale[:, None] for int8 w) as [sk, ..., N] (float32 when sk > 1), for a
    consumer that adds them up itself (kernels.add_rmsnorm). cfg from `plan` (not None). then: the weight of the
    GEMV that comes next, whose first bytes are fetched into L2 as this one ends (kernels/prefetch.py)."""
    y = partials_op(x, w, scale, *cfg, then)
    return y.view(cfg[2], *x.shape[:-1], w.shape[0])


def linear_split(x: torch.Tensor, w: torch.Tensor, cfg: tuple, scale: torch.Tensor | None = None):
    """F.linear(x, w) via `partials`, the K slices summed here in torch ops: for a layer planned with split tiles
    whose caller needs the whole output this time (the engine's q/k/v on a prompt of few rows)."""
    y = partials(x, w, cfg, scale)
    return y[0] if cfg[2] == 1 else y.sum(0).to(x.dtype)


def linear_tiled(x: torch.Tensor, w: torch.Tensor, cfg: tuple, scale: torch.Tensor | None = None,
                 glu: bool = False, then: torch.Tensor | None = None):
    """F.linear(x, w) (w * scale[:, None] for int8 w) with a tile from `plan(..., split=False)`: one launch.
    glu: w is SwiGLU's [gate; up] (each N/2 rows) and the result is silu(x gate^T) * (x up^T), [..., N/2]: each
    program takes the same rows of both halves, so the product is formed in its epilogue, never in memory.
    then: as in `partials`."""
    y = tiled_op(x, w, scale, *cfg, glu, then)
    return y.view(*x.shape[:-1], y.shape[-1])


def swiglu_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The reference of `linear_tiled(..., glu=True)`: silu(gate) * up of F.linear(x, [gate; up])."""
    g, u = F.linear(x, w).chunk(2, -1)
    return F.silu(g) * u


def linear(x: torch.Tensor, w: torch.Tensor, then: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w) without bias; the Triton GEMV when it applies (then: as in `partials`)."""
    return gemv_op(x, w, then) if usable(x, w) else gemv_ref(x, w)
