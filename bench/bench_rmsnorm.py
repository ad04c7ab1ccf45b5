"""The training RMSNorm (kernels/rmsnorm.py: one Triton launch forward, one backward) against the model's torch ops
(kernels.rmsnorm.rmsnorm_ref = hmtiny.model.RMSNorm: x.float(), torch.rms_norm, .type_as(x), * scale), bf16.

    python3 bench/bench_rmsnorm.py [--calls 20] [--replays 10]

Shapes: the training step's norms, rows x D: 2304 x 3072 and 576 x 3072 (backbone rows of four clips and of one),
12288 x 1024 and 3072 x 1024 (depth-decoder rows). Scale frozen (LoRA: dx only) or trained (full fine-tuning: dx
and dscale). Timings are GPU time per call without launch overhead: `--calls` calls captured in one CUDA graph
(kernels.timing), median of `--replays` replays:
    fwd      y = norm(x) with x requiring grad (what autograd saves is produced too)
    bwd      torch.autograd.grad of one forward's output, retained and replayed
    fwd+bwd  both, as a training step runs them
GB/s of the fused kernels counts the bytes each must move (fwd: x in, y out; bwd: dy and x in, dx out). `saved MB`:
what autograd keeps from one forward until its backward (CUDA memory after the forward less before, less y).
Errors: max |out - ref| / max |ref| and the share of elements not bit-equal, y and dx against the torch ops.
Prints a markdown table, then one JSON line; JSON also goes to $OUT/bench_rmsnorm.json when OUT is set.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from kernels import rmsnorm as rn  # noqa: E402
from kernels.timing import graph_time  # noqa: E402

SHAPES = [(2304, 3072), (576, 3072), (12288, 1024), (3072, 1024)]
EPS = 1e-5
IMPLS = {"fused": rn.rms_norm, "torch": rn.rmsnorm_ref}


def timings(fn, x, scale, dy, calls, replays):
    """µs per call of fwd, bwd and fwd+bwd, and the bytes autograd saves for the backward."""
    inputs = [t for t in (x, scale) if t.requires_grad]

    def us(f, stream=None):
        return 1e6 * graph_time(lambda i: f(), calls, replays=replays, stream=stream)

    out = {"fwd": us(lambda: fn(x, scale, EPS)),
           "fwd+bwd": us(lambda: torch.autograd.grad(fn(x, scale, EPS), inputs, dy))}
    stream = torch.cuda.Stream()  # the forward runs where the backward's capture will: autograd keeps its stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = fn(x, scale, EPS)
        saved = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    out["bwd"] = us(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), stream=stream)
    return out, saved


def errors(x, scale, dy):
    """y and dx of the fused path against the torch ops: max relative error and the share not bit-equal."""
    got, want = [], []
    for fn, into in ((rn.rms_norm, got), (rn.rmsnorm_ref, want)):
        y = fn(x, scale, EPS)
        into += [y.detach(), torch.autograd.grad(y, x, dy)[0]]
    return {name: {"rel": ((g.float() - w.float()).abs().max() / w.float().abs().max()).item(),
                   "unequal": (g != w).float().mean().item()} for name, g, w in zip(("y", "dx"), got, want)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20, help="calls captured in one CUDA graph (default 20)")
    ap.add_argument("--replays", type=int, default=10, help="graph replays timed, the median kept (default 10)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or rn.triton is None:
        sys.exit("bench_rmsnorm.py times CUDA kernels: it needs a CUDA device and triton, and found "
                 f"{'no CUDA device' if not torch.cuda.is_available() else 'no triton'}. Nothing was timed "
                 "(tests/test_rmsnorm.py checks the kernels on CPU under TRITON_INTERPRET=1).")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {rn.triton.__version__}")
    print(f"bf16 x and scale, eps {EPS}; µs per call, {args.calls} calls in one CUDA graph, median of "
          f"{args.replays} replays\n")
    print("| rows x D | scale | fwd fused / torch µs | bwd fused / torch µs | fwd+bwd fused / torch µs | fwd+bwd "
          "speed-up | fused GB/s fwd, bwd | saved MB fused / torch | y rel err (unequal) | dx rel err (unequal) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for rows, D in SHAPES:
        for train_scale in (False, True):
            x = (torch.randn(rows, D, device="cuda") * 2).bfloat16().requires_grad_()
            scale = (1 + 0.5 * torch.randn(D, device="cuda")).bfloat16().requires_grad_(train_scale)
            dy = torch.randn(rows, D, device="cuda").bfloat16()
            assert rn.usable(x, scale)
            us, saved = {}, {}
            for name, fn in IMPLS.items():
                us[name], saved[name] = timings(fn, x, scale, dy, args.calls, args.replays)
            gbs = {k: moved * x.numel() * 2 / us["fused"][k] / 1e3 for k, moved in (("fwd", 2), ("bwd", 3))}
            r = {"rows": rows, "D": D, "scale_grad": train_scale, "us": us, "fused_GBps": gbs,
                 "saved_bytes": saved, "errors": errors(x, scale, dy)}
            results.append(r)
            f, t, e = us["fused"], us["torch"], r["errors"]
            print(f"| {rows} x {D} | {'trained' if train_scale else 'frozen'} "
                  + "".join(f"| {f[k]:.1f} / {t[k]:.1f} " for k in ("fwd", "bwd", "fwd+bwd"))
                  + f"| {t['fwd+bwd'] / f['fwd+bwd']:.2f}x | {gbs['fwd']:.0f}, {gbs['bwd']:.0f} "
                  f"| {saved['fused'] / 2**20:.2f} / {saved['torch'] / 2**20:.2f} "
                  + "".join(f"| {e[k]['rel']:.1e} ({e[k]['unequal']:.1e}) " for k in ("y", "dx")) + "|", flush=True)
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": rn.triton.__version__,
               "calls": args.calls, "replays": args.replays, "results": results}
    print(f"\nrel err: one bf16 ulp at the top of the range is {torch.finfo(torch.bfloat16).eps:.1e}")
    print(json.dumps(summary))
    write_json("bench_rmsnorm.json", summary)


if __name__ == "__main__":
    main()
