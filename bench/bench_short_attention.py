"""The depth decoder's training attention: kernels/short_attention.py (one Triton launch forward, one backward)
against the SDPA call it replaces (hmtiny.model.Attention.attend: F.scaled_dot_product_attention(q, k, v,
is_causal=True, enable_gqa=True), the math backend on CUDA at head_dim 384 with GQA), bf16.

    python3 bench/bench_short_attention.py [--calls 20] [--replays 5] [--frames 375 1500] [--no-sweep]
    python3 bench/bench_short_attention.py --smoke      # CPU, Triton's interpreter, tiny shapes: the code runs

Shapes: q [B, 8, 8, 384], k and v [B, 4, 8, 384] (hmtiny.config's official decoder: 8 heads on 4 kv heads, 8 rows
a frame), as the model passes them: transposed views of [B, 8, H, 384] projections, and the output gradient the
transposed view the output projection's backward leaves. B = frames: 375 a 30 s clip, 1500 for the 4-clip step.

Timings are GPU time per call without launch overhead: `--calls` calls captured in one CUDA graph
(kernels.timing.graph_time), median of `--replays` replays:
    fwd      the output alone (no autograd)
    bwd      torch.autograd.grad of one forward's output, retained and replayed
    both     forward + torch.autograd.grad, as a training step runs them
`saved MB`: what autograd keeps from one forward until its backward (CUDA memory after the forward, less before,
less the output). Errors against SDPA: max |out - ref| / max |ref| in bf16 eps (2^-7) and the share of elements
not bit-equal, for the output and the three input gradients. Then, unless --no-sweep, the kernels alone (no
autograd) at other tile choices (BLOCK_D, num_warps) than kernels.short_attention.plan's, the default marked *.
The last lines estimate the time saved per training step (3 decoder layers, forward + backward; with gradient
checkpointing the forward runs twice). A JSON line follows; JSON also goes to $OUT/bench_short_attention.json
when OUT is set.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # Triton reads TRITON_INTERPRET when it is imported (kernels.short_attention imports it)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny.model import Attention  # noqa: E402
from kernels import short_attention as sa  # noqa: E402

FWD_SWEEP = [(32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]  # (BLOCK_D, num_warps)
BWD_SWEEP = [(16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8)]


def make_inputs(B, H, Hkv, S, D, device, gen):
    """bf16 q, k, v and the output gradient, laid out as the model's: scores of std ~2 (q, k of std sqrt(2))."""
    def view(heads, scale):
        return (torch.randn(B, S, heads, D, generator=gen) * scale).to(device, torch.bfloat16).transpose(1, 2)
    return view(H, 2 ** 0.5), view(Hkv, 2 ** 0.5), view(Hkv, 1.0), view(H, 1.0)


def forward_backward(fn, q, k, v, w):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, w)]


def errors(got, want):
    """Per tensor (out, dq, dk, dv): max |got - want| / max |want| in bf16 eps, and the share not bit-equal."""
    eps = torch.finfo(torch.bfloat16).eps
    return {name: {"err_eps": ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                   / eps, "unequal": (a != b).float().mean().item()}
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}


def cuda_timings(fn, q, k, v, w, calls, replays):
    """µs of fwd, bwd, both and the MB autograd saves."""
    from kernels.timing import graph_time
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def us(f, stream=None):
        return 1e6 * graph_time(lambda i: f(), calls, replays=replays, stream=stream)

    with torch.no_grad():
        out = {"fwd": us(lambda: fn(q, k, v))}
    out["both"] = us(lambda: torch.autograd.grad(fn(*leaves), leaves, w))
    stream = torch.cuda.Stream()  # the forward runs where the backward's capture will: autograd keeps its stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = fn(*leaves)
        out["saved_MB"] = (torch.cuda.memory_allocated() - before - y.numel() * y.element_size()) / 2 ** 20
    out["bwd"] = us(lambda: torch.autograd.grad(y, leaves, w, retain_graph=True), stream=stream)
    return out


def host_timings(fn, q, k, v, w):
    """Seconds of one forward + backward on the host (the interpreter: says only that the code runs)."""
    start = time.perf_counter()
    forward_backward(fn, q, k, v, w)
    return {"both_s": time.perf_counter() - start}


def sweep(q, k, v, w, calls, replays, cuda):
    """The kernels alone at each (BLOCK_D, num_warps): µs, or host seconds, and errors against the default tiles."""
    from kernels.timing import graph_time
    B, H, S, D = q.shape
    G = H // k.shape[1]
    rows = []
    base_out = sa.short_attention_forward(q, k, v)
    base_grads = sa.short_attention_backward(w, q, k, v)
    for kind, configs in (("fwd", FWD_SWEEP), ("bwd", BWD_SWEEP)):
        default = sa.plan(G, S, D, kind == "bwd")
        for block_d, warps in dict.fromkeys((min(bd, sa._pow2(D)), nw) for bd, nw in configs):
            if kind == "fwd":
                def run(bd=block_d, nw=warps):
                    return [sa.short_attention_forward(q, k, v, bd, nw)]
                base = [base_out]
            else:
                def run(bd=block_d, nw=warps):
                    return list(sa.short_attention_backward(w, q, k, v, bd, nw))
                base = list(base_grads)
            if cuda:
                seconds = graph_time(lambda i: run(), calls, replays=replays)
            else:
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
            got = run()
            row = {"kind": kind, "BLOCK_D": block_d, "num_warps": warps,
                   "default": (block_d, warps) == (default["BLOCK_D"], default["num_warps"]),
                   "us" if cuda else "host_s": seconds * (1e6 if cuda else 1),
                   "max_err_eps_vs_default": max(e["err_eps"] for e in errors(got, base).values())}
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    ap.add_argument("--replays", type=int, default=5, help="graph replays timed (the median is kept)")
    ap.add_argument("--frames", type=int, nargs="+", default=[375, 1500], help="batch sizes B (audio frames)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the (BLOCK_D, num_warps) sweep")
    ap.add_argument("--smoke", action="store_true",
                    help="run on the CPU under Triton's interpreter with tiny shapes (checks the code, times nothing "
                         "meaningful)")
    args = ap.parse_args()
    if sa.triton is None:
        sys.exit("bench_short_attention.py needs triton, and found none. Nothing was timed.")
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_short_attention.py times CUDA kernels: it needs a CUDA device (or --smoke for the CPU "
                 "interpreter), and found none. Nothing was timed.")
    dec = ModelConfig.official_3b().decoder
    H, Hkv, S, D = dec.num_heads, dec.num_kv_heads, 8, dec.head_dim
    frames = args.frames
    device = "cuda" if cuda else "cpu"
    if args.smoke:
        H, Hkv, S, D, frames = 8, 4, 8, 40, [3, 5]  # D = 40: a masked tail, as 384 has none at the default tiles
    gen = torch.Generator().manual_seed(0)
    head = (f"{torch.cuda.get_device_name() if cuda else 'CPU, Triton interpreter (--smoke)'}  torch "
            f"{torch.__version__}  triton {sa.triton.__version__}  bf16 q [B, {H}, {S}, {D}], k/v [B, {Hkv}, {S}, "
            f"{D}]" + (f", {args.calls} calls a CUDA graph" if cuda else ""))
    print(head + "\n")
    sdpa = Attention.attend
    rows = []
    for B in frames:
        q, k, v, w = make_inputs(B, H, Hkv, S, D, device, gen)
        assert sa.usable(q, k, v), "the kernel path refuses the benchmark's inputs"
        got = forward_backward(sa.short_attention, q, k, v, w)
        want = forward_backward(sdpa, q, k, v, w)
        row = {"B": B, "H": H, "Hkv": Hkv, "S": S, "D": D, "errors_vs_sdpa": errors(got, want)}
        if cuda:
            row["kernel"] = cuda_timings(sa.short_attention, q, k, v, w, args.calls, args.replays)
            row["sdpa"] = cuda_timings(sdpa, q, k, v, w, args.calls, args.replays)
        else:
            row["kernel"] = host_timings(sa.short_attention, q, k, v, w)
            row["sdpa"] = host_timings(sdpa, q, k, v, w)
        if not args.no_sweep:
            row["sweep"] = sweep(q, k, v, w, args.calls, args.replays, cuda)
        rows.append(row)

    if cuda:
        print("| B | fwd kernel / sdpa us | bwd kernel / sdpa us | both kernel / sdpa us | both speedup "
              "| saved MB kernel / sdpa | err eps (out, dq, dk, dv) | unequal (out, dq, dk, dv) |")
        print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        kt, st, e = row["kernel"], row["sdpa"], row["errors_vs_sdpa"]
        errs = ", ".join(f"{x['err_eps']:.2f}" for x in e.values())
        uneq = ", ".join(f"{x['unequal']:.1e}" for x in e.values())
        if cuda:
            print(f"| {row['B']} | {kt['fwd']:.1f} / {st['fwd']:.1f} | {kt['bwd']:.1f} / {st['bwd']:.1f} | "
                  f"{kt['both']:.1f} / {st['both']:.1f} | {st['both'] / kt['both']:.2f}x | "
                  f"{kt['saved_MB']:.1f} / {st['saved_MB']:.1f} | {errs} | {uneq} |", flush=True)
        else:
            print(f"B {row['B']}: kernel {kt['both_s']:.2f} s, sdpa {st['both_s']:.3f} s (host, forward + backward); "
                  f"err eps vs sdpa {errs}; unequal {uneq}")
    if not cuda:
        print("(the interpreter truncates float32 -> bf16 where the GPU rounds to nearest, and CPU SDPA runs its own "
              "kernel: these errors say nothing of the GPU's; tests/test_short_attention.py measures the kernels)")
    if not args.no_sweep:
        unit = "us" if cuda else "host_s"
        print(f"\ntile sweep (the kernels alone; {unit}; * = kernels.short_attention.plan's choice):")
        for row in rows:
            cells = [f"{s['kind']} {s['BLOCK_D']}/{s['num_warps']}{'*' if s['default'] else ''}: {s[unit]:.1f}"
                     f" ({s['max_err_eps_vs_default']:.2f} eps)" for s in row["sweep"]]
            print(f"B {row['B']}: " + ", ".join(cells))
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu-interpreter", "torch": torch.__version__,
              "triton": sa.triton.__version__, "calls": args.calls, "rows": rows}
    if cuda:
        layers = dec.num_layers
        result["saved_ms_per_step"] = {row["B"]: layers * (row["sdpa"]["both"] - row["kernel"]["both"]) / 1e3
                                       for row in rows}
        print()
        for B, ms in result["saved_ms_per_step"].items():
            print(f"B = {B} frames, {layers} decoder layers (forward + backward): {ms:.2f} ms saved a step")
    print(json.dumps(result))
    write_json("bench_short_attention.json", result)


if __name__ == "__main__":
    main()
