"""Would a persistent kernel per decode layer step be faster than the chain of launches? The two numbers that decide.

    python bench/bench_persistent.py [--layers 28] [--rounds 2000]

The int8 decode frame pays a few us at every kernel boundary (bench/NOTES.md, session 18: a layer step costs ~60 us
against 33 us of weight bytes). A persistent kernel (one program per SM, looping over its share of the work) would
replace the boundaries between a layer step's phases by grid-wide barriers. Two unknowns decide whether that pays:

1. what one grid barrier of one program per SM costs in Triton (an atomic arrival count, then a spin on it);
2. whether GEMV phases separated by such barriers stream the weights at close to the memory's bandwidth, each
   program asking L2 for its next phase's first weights (kernels/prefetch.py) before it waits.

Measured here on random int8 weights of the 3B backbone's shapes, `--layers` layers of the four GEMVs (q/k/v 5120 x
3072, o 3072 x 3072, gate/up 16384 x 3072, down 3072 x 8192; 2 activation rows; outputs left as float32 K-chunk
partials), against the same GEMVs launched as today (kernels.gemv with its picked tiles, K slices to the caller,
chained with PDL, in a CUDA graph). Nothing here is used by hmtiny; it only measures. JSON to
$OUT/bench_persistent.json when OUT is set. `tests/test_persistent_bench.py` checks the GEMV phases against torch
under Triton's interpreter with one program (where every barrier is passed at once).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_generate import copy_bandwidth  # noqa: E402
from kernels import prefetch, switches  # noqa: E402
from kernels.layer_step import _gemv_partials, _grid_barrier, words  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# the backbone's decode GEMVs of one layer: (N, K)
SHAPES = [(5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192)]
# (rows an item, K step, K chunk an item, warps) tried; compiled for sm_90 none spills (tests/test_persistent_bench.py)
CONFIGS = [(16, 512, 8), (32, 512, 8), (32, 1024, 8)]  # (bn, kc, warps); ptxas spills (16, 1024, 8) here

if triton is not None:
    @triton.jit
    def _barriers_kernel(bar_ptr, ROUNDS: tl.constexpr):
        n = tl.num_programs(0)
        for r in range(ROUNDS):
            _grid_barrier(bar_ptr, n)

    @triton.jit
    def _chain_kernel(x_ptr, stride_x, w0, s0, w1, s1, w2, s2, w3, s3, o0, o1, o2, o3, count_ptr, M: tl.constexpr,
                      LAYERS,
                      N0: tl.constexpr, K0: tl.constexpr, N1: tl.constexpr, K1: tl.constexpr,
                      N2: tl.constexpr, K2: tl.constexpr, N3: tl.constexpr, K3: tl.constexpr,
                      BN: tl.constexpr, KC: tl.constexpr, PF_BYTES: tl.constexpr,
                      PF_SLOTS: tl.constexpr):
        """LAYERS x the four GEMV phases, a grid barrier after each; before each barrier every program asks L2
        for its share of the next phase's first PF_BYTES (0: none). Weights as int32 words (layer_step.words): layer
        l's are w_i + l * N_i * K_i / 4."""
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        first0 = w0  # layer 0's q/k/v weights: what the last layer's last phase prefetches
        for layer in range(LAYERS):
            _gemv_partials(x_ptr, stride_x, w0, s0 + layer * N0, o0, M, pid, nprog, N0, K0, BN, KC, True, 0)
            if PF_BYTES > 0:
                prefetch.l2_prefetch(w1, PF_BYTES, pid, nprog, PF_SLOTS)
            _grid_barrier(count_ptr, nprog)
            _gemv_partials(x_ptr, stride_x, w1, s1 + layer * N1, o1, M, pid, nprog, N1, K1, BN, KC, True, 0)
            if PF_BYTES > 0:
                prefetch.l2_prefetch(w2, PF_BYTES, pid, nprog, PF_SLOTS)
            _grid_barrier(count_ptr, nprog)
            _gemv_partials(x_ptr, stride_x, w2, s2 + layer * N2, o2, M, pid, nprog, N2, K2, BN, KC, True, 0)
            if PF_BYTES > 0:
                prefetch.l2_prefetch(w3, PF_BYTES, pid, nprog, PF_SLOTS)
            _grid_barrier(count_ptr, nprog)
            _gemv_partials(x_ptr, stride_x, w3, s3 + layer * N3, o3, M, pid, nprog, N3, K3, BN, KC, True, 0)
            # the next layer's weights: pointers step on (64-bit pointer arithmetic, no int32 products)
            w0 += N0 * K0 // 4
            w1 += N1 * K1 // 4
            w2 += N2 * K2 // 4
            w3 += N3 * K3 // 4
            if PF_BYTES > 0:
                prefetch.l2_prefetch(w0 if layer + 1 < LAYERS else first0, PF_BYTES, pid, nprog, PF_SLOTS)
            _grid_barrier(count_ptr, nprog)


def make_weights(layers: int, shapes=SHAPES, device="cuda", seed=0):
    """Random int8 weights [layers, N, K] and float32 row scales [layers, N] for each shape."""
    g = torch.Generator(device).manual_seed(seed)
    return [(torch.randint(-127, 128, (layers, n, k), device=device, dtype=torch.int8, generator=g),
             torch.rand(layers, n, device=device, generator=g) / 100) for n, k in shapes]


def run_chain(x, weights, count, programs: int, bn=16, kc=1024, pf_bytes=0, num_warps=8):
    """One launch of the persistent chain; returns the four outputs [K/kc, M, N] (the last layer's). count: the
    barrier's three int32 words, zeroed once (see _grid_barrier)."""
    M = x.shape[0]
    layers = weights[0][0].shape[0]
    outs = [torch.empty(k // kc, M, n, device=x.device, dtype=torch.float32) for (w, _), (n, k) in
            zip(weights, [(w.shape[1], w.shape[2]) for w, _ in weights])]
    dims = {}
    for i, (w, _) in enumerate(weights):
        dims[f"N{i}"], dims[f"K{i}"] = w.shape[1], w.shape[2]
    args = [a for w, s in weights for a in (words(w), s)]
    _chain_kernel[(programs,)](x, x.stride(0), *args, *outs, count, M, layers, **dims, BN=bn, KC=kc,
                               PF_BYTES=pf_bytes, PF_SLOTS=32 * num_warps if pf_bytes else 1, num_warps=num_warps)
    return outs


def reference(x, weights, kc=1024):
    """The last layer's outputs of `run_chain` in torch: float32 K-chunk partials."""
    outs = []
    for w, s in weights:
        wl, sl = w[-1].float(), s[-1]
        K = wl.shape[1]
        parts = [x.float()[:, c * kc:(c + 1) * kc] @ wl[:, c * kc:(c + 1) * kc].T * sl for c in range(K // kc)]
        outs.append(torch.stack(parts))
    return outs


def _events_us(fn, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def today_chain_us(x, weights, reps=5):
    """The same GEMVs as the engine runs them now: kernels.gemv partials with its picked tiles, PDL, one graph."""
    from kernels import gemv
    from kernels.timing import graph_time
    layers = weights[0][0].shape[0]
    xs = [x[:, : w.shape[2]].contiguous() for w, _ in weights]  # each GEMV reads its first K columns
    tiles = [gemv.plan(xi, w[0], split=True, scale=s[0]) for xi, (w, s) in zip(xs, weights)]

    def chain(_):
        for layer in range(layers):
            for xi, (w, s), tile in zip(xs, weights, tiles):
                gemv.partials(xi, w[layer], tile, s[layer])
    return graph_time(chain, reps, warmup=1) * 1e6, tiles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--pf-mb", default="0,8", help="L2 prefetch caps (MiB) to try in the persistent chain")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"device": torch.cuda.get_device_name(), "sms": sms, "layers": args.layers}
    count = torch.zeros(3, dtype=torch.int32, device=dev)  # the barrier's words (see _grid_barrier)

    # 1. grid barriers: one program per SM (and two), ROUNDS barriers in one launch, minus an empty launch
    for per_sm in (1, 2):
        def launch(rounds):
            _barriers_kernel[(sms * per_sm,)](count, ROUNDS=rounds, num_warps=4)
        empty = _events_us(lambda: launch(1), 20)
        full = _events_us(lambda: launch(args.rounds), 5)
        res[f"barrier_us_{per_sm}_per_sm"] = (full - empty) / (args.rounds - 1)
        if int(count[2]):
            print(f"grid barrier, {per_sm} program(s) per SM: {int(count[2])} waits gave up", flush=True)
        print(f"grid barrier, {per_sm} program(s) per SM: {res[f'barrier_us_{per_sm}_per_sm']:.3f} us", flush=True)

    # 2. the four GEMVs x layers: persistent with barriers against today's launches
    weights = make_weights(args.layers)
    x = torch.randn(2, 8192, device=dev, dtype=torch.bfloat16)  # each phase reads its first K columns
    nbytes = sum(w.numel() for w, _ in weights)
    copy_tbps = copy_bandwidth() / 1e12
    res["bytes"] = nbytes
    res["floor_us"] = nbytes / (copy_tbps * 1e6)
    print(f"{args.layers} layers, {nbytes / 1e9:.2f} GB of int8 weights; floor {res['floor_us']:.0f} us "
          f"at {copy_tbps:.2f} TB/s", flush=True)
    t_today, tiles = today_chain_us(x, weights)
    res["today_us"], res["today_tiles"] = t_today, [list(t) if t else None for t in tiles]
    print(f"today's launches (kernels.gemv, PDL, graph): {t_today:.0f} us = {t_today / args.layers:.1f} us a layer",
          flush=True)
    res["persistent"] = []
    for mb in args.pf_mb.split(","):
        pf = int(float(mb) * 2**20) // 16 * 16
        # every program must be resident at once (they wait for each other): 1 or 2 a SM, which these tiles'
        # registers and shared memory allow
        for (bn, kc, nw), per_sm in [(c, p) for c in CONFIGS for p in (1, 2)]:
            progs = sms * per_sm
            label = f"bn={bn} kc={kc} warps={nw} programs={progs} pf={mb} MiB"
            try:
                outs = run_chain(x, weights, count, progs, bn, kc, pf, nw)
                t = _events_us(lambda: run_chain(x, weights, count, progs, bn, kc, pf, nw), 5)
            except Exception as e:
                print(f"  persistent {label}: failed {e}", flush=True)
                continue
            if int(count[2]):
                print(f"  persistent {label}: {int(count[2])} barrier waits gave up (programs not all resident)",
                      flush=True)
                continue
            ref = reference(x, weights)
            err = max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, ref))
            row = {"bn": bn, "kc": kc, "warps": nw, "programs": progs, "pf_mb": float(mb), "us": t,
                   "us_per_layer": t / args.layers, "TBps": nbytes / t / 1e6, "max_rel_err": err}
            res["persistent"].append(row)
            print(f"  persistent {label}: {t:.0f} us = {t / args.layers:.1f} us a layer, {row['TBps']:.2f} TB/s "
                  f"(err {err:.1e})", flush=True)
    (out / "bench_persistent.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    if switches.interpreting():
        raise SystemExit("run on a GPU (tests/test_persistent_bench.py covers the interpreter)")
    main()
