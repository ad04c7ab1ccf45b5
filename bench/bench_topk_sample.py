"""Sampling one codebook: the one-launch Triton kernel (kernels.topk_sample.sample) vs today's torch path
(sample_ref = Engine._mix + sample_tokens: CFG mix, bias, temperature, torch.topk, softmax, argmax(p / noise)).

    python3 bench/bench_topk_sample.py [--trials 2000]

The decode shape: V 8256 head columns (8197 real ids, the rest -inf bias), B2 = 2 rows (one song, CFG 1.5),
topk 50, temperature 1.0, bf16 logits (randn * 3). Each row of the table is 50 calls captured in one CUDA graph,
replayed 20 times (median), divided by 50: GPU time per call with no launch overhead, inputs in L2 as in a frame.
The kernel's time depends on the data (the bisection stops early once exactly k values lie above a candidate):
the "ties" row has many values equal to the k-th, so it runs the full 32 steps. Agreement: --trials random
inputs (fresh logits and noise each), fraction of ids equal; every mismatch is checked to be a near tie (two
candidates' reference scores within 1e-5 relative). JSON goes to $OUT/bench_topk_sample.json when OUT is set.
"""
import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import topk_sample as ts  # noqa: E402

V, V_REAL, CFG, TOPK, TEMP = 8256, 8197, 1.5, 50, 1.0


def graph_us(fn, calls: int = 50, replays: int = 20) -> float:
    """µs per call of fn(): `calls` calls captured in one CUDA graph, median over `replays` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (Triton compiles here)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def inputs(songs: int, gen, ties: bool = False):
    if ties:  # few distinct values: many entries equal to the k-th, no early stop
        logits = torch.randint(-6, 7, (2 * songs, V), device="cuda", generator=gen).bfloat16()
    else:
        logits = (torch.randn(2 * songs, V, device="cuda", generator=gen) * 3).bfloat16()
    noise = torch.empty(songs, V, device="cuda").exponential_(generator=gen)
    return logits, noise


def near_tie(logits, bias, noise, a, b, rtol=1e-5) -> bool:
    """Ids a and b (one output row) score within float rounding of each other in the reference."""
    x = ts.mix_ref(logits, bias, CFG)[0] / TEMP
    x = x.masked_fill(x < x.topk(TOPK).values[-1], -math.inf)
    score = (x.softmax(-1) / noise[0]).double()
    return bool(torch.isclose(score[a], score[b], rtol=rtol, atol=0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2000)
    args = ap.parse_args()
    assert torch.cuda.is_available() and ts.triton is not None, "needs CUDA and triton"
    gen = torch.Generator(device="cuda").manual_seed(0)
    bias = torch.zeros(V, device="cuda")
    bias[V_REAL:] = -math.inf

    rows = []

    def row(name, fn):
        us = graph_us(fn)
        rows.append({"variant": name, "us_per_call": us})
        print(f"{name:<44} {us:8.2f} µs", flush=True)

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {ts.triton.__version__}")
    print(f"V {V} ({V_REAL} real), CFG {CFG}, topk {TOPK}, temperature {TEMP}, bf16 logits")
    logits, noise = inputs(1, gen)
    row("torch sample_ref, 1 song", lambda: ts.sample_ref(logits, bias, CFG, TEMP, TOPK, noise))
    row("triton sample, 1 song", lambda: ts.sample(logits, bias, CFG, TEMP, TOPK, noise))
    for w in (4, 8, 16, 32):
        try:
            row(f"triton, 1 song, num_warps={w}", lambda w=w: ts._launch(logits, bias, CFG, TEMP, TOPK, noise, w))
        except Exception as e:  # a warp count this card or Triton refuses
            print(f"triton num_warps={w}: {type(e).__name__}: {str(e)[:100]}")
    tied, tnoise = inputs(1, gen, ties=True)
    row("torch sample_ref, 1 song, ties at k-th", lambda: ts.sample_ref(tied, bias, CFG, TEMP, TOPK, tnoise))
    row("triton sample, 1 song, ties at k-th", lambda: ts.sample(tied, bias, CFG, TEMP, TOPK, tnoise))
    row("torch sample_ref, 1 song, topk 1 (argmax)", lambda: ts.sample_ref(logits, bias, CFG, TEMP, 1, None))
    row("triton sample, 1 song, topk 1 (argmax)", lambda: ts.sample(logits, bias, CFG, TEMP, 1, None))
    logits8, noise8 = inputs(8, gen)
    row("torch sample_ref, 8 songs", lambda: ts.sample_ref(logits8, bias, CFG, TEMP, TOPK, noise8))
    row("triton sample, 8 songs", lambda: ts.sample(logits8, bias, CFG, TEMP, TOPK, noise8))

    # agreement on fresh random inputs, one song per trial as in the engine
    all_logits = (torch.randn(args.trials, 2, V, device="cuda", generator=gen) * 3).bfloat16()
    all_noise = torch.empty(args.trials, 1, V, device="cuda").exponential_(generator=gen)
    out = torch.stack([ts.sample(all_logits[i], bias, CFG, TEMP, TOPK, all_noise[i]) for i in range(args.trials)])
    ref = torch.stack([ts.sample_ref(all_logits[i], bias, CFG, TEMP, TOPK, all_noise[i])
                       for i in range(args.trials)])
    miss = (out != ref).flatten().nonzero().flatten().tolist()
    ties = sum(near_tie(all_logits[i], bias, all_noise[i], out[i, 0].item(), ref[i, 0].item()) for i in miss)
    equal = 1 - len(miss) / args.trials
    print(f"ids equal in {args.trials} trials: {equal:.4f} ({len(miss)} mismatches, {ties} of them near ties)")

    t_ref, t_k = rows[0]["us_per_call"], rows[1]["us_per_call"]
    print(f"speed-up at the decode shape: {t_ref / t_k:.2f}x ({t_ref:.1f} -> {t_k:.1f} µs a codebook)")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": ts.triton.__version__,
              "V": V, "V_real": V_REAL, "cfg": CFG, "topk": TOPK, "temperature": TEMP, "rows": rows,
              "trials": args.trials, "equal_fraction": equal, "mismatches": len(miss), "near_tie_mismatches": ties,
              "default_num_warps": ts._num_warps(ts.triton.next_power_of_2(V))}
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_topk_sample.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
