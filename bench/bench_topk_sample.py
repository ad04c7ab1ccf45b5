"""Sampling one codebook: the one-launch Triton kernel (kernels.topk_sample, the "select" search: group-maximum
bound, compaction, all-pairs rank) at 4/8/16/32 warps vs the plain torch path (sample_ref: CFG mix, bias,
temperature, torch.topk, softmax, argmax(p / noise)).

    python3 bench/bench_topk_sample.py [--trials 2000] [--quick]

The decode shape: V 8256 head columns (8197 real ids, the rest -inf bias), B2 = 2 rows per song (CFG 1.5),
topk 50, temperature 1.0, bf16 logits. Inputs: "random" = randn * 3; "tied" = integers in [-6, 6] (many entries
equal to the k-th value: select's candidate set is larger). Each timing is 50
calls captured in one CUDA graph, replayed 20 times (median), divided by 50: GPU time per call with no launch
overhead, inputs in L2 as in a frame. 1 song = 1 program (one SM), 8 songs = 8 programs.

Agreement: --trials random single-song inputs (fresh logits and noise each) through the default `sample` (one
batched launch, B = trials; rows are independent) and 200 of them one call per trial as the engine does, ids
compared with the reference; every mismatch is checked to be a near tie (two candidates' reference scores within
1e-5 relative). Every warp count gets 200 trials too. Path statistics (select's STATS): how often
the candidates fit the C slots at once, after bisection steps, or not at all (more than C tie at the k-th).

The summary names the best warp count (1 song, random; ties broken by the mean over all four inputs) and the
setting to put in kernels/topk_sample.py: DEFAULT_WARPS. JSON goes to
$OUT/bench_topk_sample.json when OUT is set.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from kernels import topk_sample as ts  # noqa: E402
from kernels.timing import graph_time  # noqa: E402

V, V_REAL, CFG, TOPK, TEMP = 8256, 8197, 1.5, 50, 1.0
WARPS = (4, 8, 16, 32)
DEVICE = "cuda"


def graph_us(fn, calls: int = 50, replays: int = 20) -> float:
    """µs per call of fn(): `calls` calls captured in one CUDA graph, median over `replays` replays."""
    return graph_time(lambda i: fn(), calls, replays=replays) * 1e6


def inputs(songs: int, gen, ties: bool = False):
    if ties:  # few distinct values: many entries equal to the k-th
        logits = torch.randint(-6, 7, (2 * songs, V), device=DEVICE, generator=gen).bfloat16()
    else:
        logits = (torch.randn(2 * songs, V, device=DEVICE, generator=gen) * 3).bfloat16()
    noise = torch.empty(songs, V, device=DEVICE).exponential_(generator=gen)
    return logits, noise


def batch_of(trials: int, gen, ties: bool = False):
    """`trials` single-song inputs as one batch: logits [cond rows; uncond rows], noise one row per trial."""
    return inputs(trials, gen, ties)


def near_ties(logits, bias, noise, out, ref, rtol=1e-5) -> tuple[int, int]:
    """(mismatches, those that are near ties: the two ids' reference scores within rtol)."""
    miss = (out != ref).nonzero().flatten().tolist()
    x = ts.mix_ref(logits, bias, CFG) / TEMP
    ties = 0
    for r in miss:
        xr = x[r].masked_fill(x[r] < x[r].topk(TOPK).values[-1], -math.inf)
        score = (xr.softmax(-1) / noise[r]).double()
        ties += bool(torch.isclose(score[out[r]], score[ref[r]], rtol=rtol, atol=0))
    return len(miss), ties


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="8 and 16 warps only, 500 trials")
    args = ap.parse_args()
    assert (torch.cuda.is_available() or DEVICE != "cuda") and ts.triton is not None, "needs CUDA and triton"
    t_start = time.time()
    warps_list = (8, 16) if args.quick else WARPS
    if args.quick:
        args.trials = min(args.trials, 500)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    bias = torch.zeros(V, device=DEVICE)
    bias[V_REAL:] = -math.inf
    default = {"warps": ts._num_warps(V)}
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {ts.triton.__version__}")
    print(f"V {V} ({V_REAL} real), CFG {CFG}, topk {TOPK}, temperature {TEMP}, bf16 logits; µs per call (CUDA graph)")
    print(f"default: num_warps {default['warps']} (kernels/topk_sample.py DEFAULT_WARPS)")

    data = {(songs, kind): inputs(songs, gen, ties=kind == "tied") for songs in (1, 8) for kind in ("random", "tied")}
    cases = list(data)
    rows = []

    def row(name, fn, **meta):
        try:
            us = graph_us(fn)
        except Exception as e:  # a warp count this card or Triton refuses
            print(f"{name:<50} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            rows.append({"variant": name, "us_per_call": None, "error": str(e)[:300], **meta})
            return None
        rows.append({"variant": name, "us_per_call": us, **meta})
        print(f"{name:<50} {us:8.2f}", flush=True)
        return us

    print("\n-- torch reference")
    for (songs, kind) in cases:
        lg, nz = data[(songs, kind)]
        row(f"torch sample_ref, {songs} song(s), {kind}",
            lambda lg=lg, nz=nz: ts.sample_ref(lg, bias, CFG, TEMP, TOPK, nz),
            impl="torch", warps=None, songs=songs, kind=kind)
    lg1, nz1 = data[(1, "random")]
    row("torch sample_ref, 1 song, topk 1 (argmax)", lambda: ts.sample_ref(lg1, bias, CFG, TEMP, 1, None),
        impl="torch", warps=None, songs=1, kind="argmax")
    row("triton sample (default), 1 song, random", lambda: ts.sample(lg1, bias, CFG, TEMP, TOPK, nz1),
        impl="default", warps=default["warps"], songs=1, kind="random")

    table = {}  # warps -> {case: µs}
    print("\n-- select: 1 song random / tied, 8 songs random / tied")
    for w in warps_list:
        t0 = time.time()
        res = {}
        for (songs, kind) in cases:
            lg, nz = data[(songs, kind)]
            res[(songs, kind)] = row(f"select, w{w}, {songs} song(s), {kind}",
                                     lambda lg=lg, nz=nz, w=w: ts._launch(lg, bias, CFG, TEMP, TOPK, nz, w),
                                     impl="select", warps=w, songs=songs, kind=kind)
        table[w] = res
        print(f"   ({time.time() - t0:.1f} s with compile)")
    print("\n-- topk 1 (argmax), 1 song, default warps")
    w = default["warps"]
    row(f"select, w{w}, 1 song, topk 1 (argmax)", lambda: ts._launch(lg1, bias, CFG, TEMP, 1, None, w),
        impl="select", warps=w, songs=1, kind="argmax")

    # path statistics of the select search (same for every warp count up to ties in the group layout: 8 warps)
    print("\n-- select paths (STATS, 8 warps): rows whose candidates fit C slots at once / after bisection steps /"
          " never (more than C tie at the k-th)")
    paths = {}
    for kind in ("random", "tied"):
        lg, nz = batch_of(512, gen, ties=kind == "tied")
        B = nz.shape[0]
        st = torch.zeros(B, 4, dtype=torch.int32, device=DEVICE)
        ts._launch(lg, bias, CFG, TEMP, TOPK, nz, 8, stats=st)
        st = st.cpu()
        first, steps, path = st[:, 0].float(), st[:, 1].float(), st[:, 3]
        p = {"rows": B, "fit_at_once": int(((path == 1) & (steps == 0)).sum()),
             "fit_after_steps": int(((path == 1) & (steps > 0)).sum()), "never_fit": int((path == 2).sum()),
             "candidates_mean": round(first.mean().item(), 1), "candidates_max": int(first.max()),
             "steps_mean": round(steps.mean().item(), 2)}
        paths[kind] = p
        print(f"   {kind:<7} {p}")

    # agreement with the reference
    n_sub = min(200, args.trials)
    print(f"\n-- agreement with sample_ref ({args.trials} random single-song trials, one batched launch; {n_sub} one "
          f"call per trial; {n_sub} per variant)")
    logits, noise = batch_of(args.trials, gen)
    out, ref = ts.sample(logits, bias, CFG, TEMP, TOPK, noise), ts.sample_ref(logits, bias, CFG, TEMP, TOPK, noise)
    miss, ties = near_ties(logits, bias, noise, out, ref)
    equal = 1 - miss / args.trials
    print(f"default (w{default['warps']}): ids equal in {args.trials} trials: {equal:.4f} "
          f"({miss} mismatches, {ties} of them near ties)")
    per_call = 0
    for i in range(n_sub):
        lg = torch.stack([logits[i], logits[args.trials + i]])
        per_call += int(ts.sample(lg, bias, CFG, TEMP, TOPK, noise[i:i + 1]).item() != ref[i].item())
    print(f"default, one call per trial: {per_call} of {n_sub} differ from the reference")
    agree = {}
    sub = torch.cat([logits[:n_sub], logits[args.trials:args.trials + n_sub]])
    for w in table:
        o = ts._launch(sub, bias, CFG, TEMP, TOPK, noise[:n_sub], w)
        m, t = near_ties(sub, bias, noise[:n_sub], o, ref[:n_sub])
        agree[f"w{w}"] = {"mismatches": m, "near_ties": t}
    print(f"per variant (mismatches / near ties of them, {n_sub} trials):",
          ", ".join(f"{k} {v['mismatches']}/{v['near_ties']}" for k, v in agree.items()))

    # summary: best warps
    def mean_all(res):
        vals = [v for v in res.values() if v is not None]
        return sum(vals) / len(vals) if len(vals) == len(res) else math.inf

    print("\n-- summary (µs per call; 1s = 1 song, 8s = 8 songs)")
    print(f"{'warps':>6}{'1s rand':>9}{'1s tied':>9}{'8s rand':>9}{'8s tied':>9}{'mean':>9}")
    best = None  # (warps, (µs 1 song random, mean))
    for w, res in table.items():
        f = lambda c: f"{res[c]:9.2f}" if res[c] is not None else f"{'-':>9}"
        print(f"{w:>6}{f((1, 'random'))}{f((1, 'tied'))}{f((8, 'random'))}{f((8, 'tied'))}{mean_all(res):9.2f}")
        key = (res[(1, "random")] if res[(1, "random")] is not None else math.inf, mean_all(res))
        if best is None or key < best[1]:
            best = (w, key)
    ref_us = next(r["us_per_call"] for r in rows if r["variant"] == "torch sample_ref, 1 song(s), random")
    best_w, (us, mean) = best
    print(f"best: num_warps {best_w}: {us:.2f} µs at 1 song (random), mean {mean:.2f} µs over the four inputs; "
          f"{ref_us / us:.1f}x the torch path")
    print(f"\nsetting for kernels/topk_sample.py: DEFAULT_WARPS = {best_w} (now: {default['warps']} warps)"
          + ("  -> no change needed" if best_w == default["warps"] else "  -> change this line"))
    print(f"total bench time {time.time() - t_start:.0f} s")

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": ts.triton.__version__,
              "V": V, "V_real": V_REAL, "cfg": CFG, "topk": TOPK, "temperature": TEMP, "rows": rows,
              "trials": args.trials, "equal_fraction": equal, "mismatches": miss, "near_tie_mismatches": ties,
              "per_call_mismatches_of_200": per_call, "variant_agreement_200": agree, "select_paths": paths,
              "default": default, "best": {"warps": best_w, "us_1song_random": us, "us_mean": mean},
              "recommended": {"DEFAULT_WARPS": best_w}}
    write_json("bench_topk_sample.json", result)


if __name__ == "__main__":
    main()
