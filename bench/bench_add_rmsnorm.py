"""Residual add of K-slice partials + RMSNorm: the Triton kernel (kernels.add_rmsnorm) vs the eager torch reference
vs torch.compile of the reference.

    python3 bench/bench_add_rmsnorm.py          (HMTINY_PDL=0 to launch the kernel without PDL)

Decode shapes: rows 2 and 16, D 3072 (backbone) and 1536 (depth decoder), bf16 x and weight; S None (the norm
alone, h = x) or 4 float32 K slices as gemv.partials_op leaves them. Each timing is 50 calls captured in one CUDA
graph, replayed 20 times (median), divided by 50: GPU time per call without launch overhead, inputs in L2 as in
a frame. Errors: max |n - n_ref| / max |n_ref| against the eager reference, and whether h is bit-equal to it.
JSON goes to $OUT/bench_add_rmsnorm.json when OUT is set.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from kernels import add_rmsnorm as ar  # noqa: E402
from kernels import pdl  # noqa: E402
from kernels.timing import graph_time  # noqa: E402

EPS = 1e-5
CALLS, REPLAYS = 50, 20


def graph_us(fn) -> float:
    """µs per call of fn(), CALLS calls captured in one CUDA graph (median over REPLAYS replays)."""
    return graph_time(lambda i: fn(), CALLS, replays=REPLAYS) * 1e6


def rel_err(out, ref) -> float:
    ref = ref.float()
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def inputs(rows, D, S):
    x = (torch.randn(rows, D, device="cuda") * 2).bfloat16()
    partials = None if S is None else torch.randn(S, rows, D, device="cuda") / S
    weight = (1 + 0.5 * torch.randn(D, device="cuda")).bfloat16()
    return x, partials, weight


def main():
    if not torch.cuda.is_available() or ar.triton is None:
        sys.exit("bench_add_rmsnorm.py times CUDA kernels: it needs a CUDA device and triton, and found "
                 f"{'no CUDA device' if not torch.cuda.is_available() else 'no triton'}. Nothing was timed.")
    torch.manual_seed(0)
    probe = torch.empty(1, device="cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {ar.triton.__version__}  "
          f"PDL {'on' if pdl.enabled(probe) else 'off'}")
    print(f"bf16, eps {EPS}; µs per call, {CALLS} calls in one CUDA graph, median of {REPLAYS} replays\n")
    print("| rows | D | S | triton µs | eager µs | compile µs | eager / triton | compile / triton "
          "| err n triton | err n compile | h bit-equal (triton, compile) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for rows in (2, 16):
        for D in (3072, 1536):
            for S in (None, 4):
                x, partials, weight = inputs(rows, D, S)
                assert ar.usable(x, partials, weight)
                torch._dynamo.reset()  # a fresh compile cache per shape: no recompile limit to reach
                compiled = torch.compile(ar.add_rmsnorm_ref, fullgraph=True, dynamic=False)
                fns = {"triton": lambda: ar.add_rmsnorm(x, partials, weight, EPS),
                       "eager": lambda: ar.add_rmsnorm_ref(x, partials, weight, EPS),
                       "compile": lambda: compiled(x, partials, weight, EPS)}
                h_ref, n_ref = fns["eager"]()
                out = {name: fns[name]() for name in ("triton", "compile")}  # compiles outside the timed graphs
                us = {name: graph_us(fn) for name, fn in fns.items()}
                r = {"rows": rows, "D": D, "S": S, "us": us,
                     "err_n": {k: rel_err(n, n_ref) for k, (h, n) in out.items()},
                     "h_equal": {k: torch.equal(h, h_ref) for k, (h, n) in out.items()}}
                results.append(r)
                print(f"| {rows} | {D} | {S or '-'} | {us['triton']:.2f} | {us['eager']:.2f} | {us['compile']:.2f} "
                      f"| {us['eager'] / us['triton']:.1f}x | {us['compile'] / us['triton']:.1f}x "
                      f"| {r['err_n']['triton']:.1e} | {r['err_n']['compile']:.1e} "
                      f"| {'yes' if r['h_equal']['triton'] else 'NO'}, {'yes' if r['h_equal']['compile'] else 'NO'} |",
                      flush=True)
    print(f"\nerr n: max |n - n_ref| / max |n_ref| vs the eager reference (one bf16 ulp at the top of the range: "
          f"{torch.finfo(torch.bfloat16).eps:.1e})")
    write_json("bench_add_rmsnorm.json", {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "triton": ar.triton.__version__, "pdl": pdl.enabled(probe), "eps": EPS,
                                          "calls": CALLS, "replays": REPLAYS, "results": results})


if __name__ == "__main__":
    main()
