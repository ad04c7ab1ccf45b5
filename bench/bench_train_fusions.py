"""The training step's fused elementwise kernels (kernels/silu_mul.py, kernels/rope.py) against the torch ops they
replace: forward, backward and both, at the LoRA training step's shapes under bf16.

    python3 bench/bench_train_fusions.py [--calls 20] [--only silu rope]

Shapes, from hmtiny.config's official 3B model: SwiGLU's product [rows, intermediate] for the backbone (576 rows
a clip: 4 clips 2304, 1 clip 576) and the depth decoder (8 rows a frame, ~1536 frames in 4 clips: 12288, 1 clip
3072); RoPE of q and k, backbone [clips, 576, heads, head_dim] with the model's table [576, D/2, 2], decoder
[frames, 8, heads, head_dim]. Inputs are bf16 ~N(0, 1) (a ~3 N(0, 1)); RoPE's output gradient arrives as the
transposed view SDPA's gradient leaves, as in the model.

Each timing is `--calls` calls captured in one CUDA graph (kernels.timing.graph_time): GPU time per call without
launch overhead. forward: the op alone (no autograd). backward: torch.autograd.grad of a forward taken before the
capture (retain_graph), i.e. the kernels autograd runs for it. both: forward + torch.autograd.grad. "unequal" is
the fraction of elements of the kernel's result that differ from the reference's (bf16; forward, then the
input gradients). The last lines estimate the time saved per training step (forward + backward of every layer,
without gradient checkpointing; with it the forward runs twice). A JSON line follows the table; JSON also goes to
$OUT/bench_train_fusions.json when OUT is set.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny.model import rope_cache  # noqa: E402
from kernels import rope as rp  # noqa: E402
from kernels import silu_mul as sm  # noqa: E402
from kernels.timing import graph_time  # noqa: E402

BACKBONE_ROWS, DECODER_FRAMES = 576, 384  # a clip: 200 prompt rows + 375 frames, padded; decoder rows 8 a frame
DEVICE = "cuda"


def cases(cfg: ModelConfig, only):
    """(op, name, shape, layers of the model that run it per step, clips)."""
    bb, dec = cfg.backbone, cfg.decoder
    out = []
    for clips in (4, 1):
        if "silu" in only:
            out.append(("silu", "backbone", (clips * BACKBONE_ROWS, bb.intermediate_dim), bb.num_layers, clips))
            out.append(("silu", "decoder", (clips * DECODER_FRAMES * 8, dec.intermediate_dim), dec.num_layers, clips))
        if "rope" in only:
            for st, name, lead in ((bb, "backbone", (clips, BACKBONE_ROWS)),
                                   (dec, "decoder", (clips * DECODER_FRAMES, 8))):
                out.append(("rope", f"{name} q", (*lead, st.num_heads, st.head_dim), st.num_layers, clips))
                out.append(("rope", f"{name} k", (*lead, st.num_kv_heads, st.head_dim), st.num_layers, clips))
    return out


def unequal(a, b) -> float:
    return (a != b).float().mean().item()


def time_op(fused, ref, inputs, const, grad, calls):
    """µs of forward, backward, both for fused(*inputs, *const) and ref(...) (gradients for the inputs, not the
    const ones), and the unequal fractions of the results."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    inputs, args = inputs + const, leaves + const
    row, results = {}, {}
    for name, fn in (("kernel", fused), ("torch", ref)):
        # autograd runs each backward op on the stream its forward ran on: the forward of the backward-only timing
        # runs on the stream that captures it (on the default stream, the capture would reach the legacy stream)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            y = fn(*args)
        results[name] = [y.detach(), *torch.autograd.grad(y, leaves, grad, retain_graph=True)]
        with torch.no_grad():
            row[f"{name} fwd us"] = 1e6 * graph_time(lambda i: fn(*inputs), calls)
        row[f"{name} bwd us"] = 1e6 * graph_time(lambda i: torch.autograd.grad(y, leaves, grad, retain_graph=True),
                                                 calls, stream=stream)
        row[f"{name} both us"] = 1e6 * graph_time(lambda i: torch.autograd.grad(fn(*args), leaves, grad), calls)
    row["unequal"] = [unequal(a, b) for a, b in zip(results["kernel"], results["torch"])]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    ap.add_argument("--only", nargs="+", choices=("silu", "rope"), default=["silu", "rope"])
    args = ap.parse_args()
    if not torch.cuda.is_available() or sm.triton is None:
        sys.exit("bench_train_fusions.py times CUDA kernels: it needs a CUDA device and triton, and found "
                 f"{'no CUDA device' if not torch.cuda.is_available() else 'no triton'}. Nothing was timed.")
    torch.manual_seed(0)
    cfg = ModelConfig.official_3b()
    bf16 = torch.bfloat16
    head = (f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {sm.triton.__version__}  bf16, "
            f"{args.calls} calls a CUDA graph")
    print(head + "\n")
    print("| op | shape | fwd kernel / torch us | bwd kernel / torch us | both kernel / torch us | both speedup "
          "| kernel fwd GB/s | unequal (out, grads) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for op, name, shape, layers, clips in cases(cfg, args.only):
        if op == "silu":
            a, b, grad = [(torch.randn(shape, device=DEVICE) * scale).to(bf16) for scale in (3, 1, 1)]
            row = time_op(sm.silu_mul, sm.silu_mul_ref, [a, b], [], grad, args.calls)
            fwd_bytes = 3 * a.numel() * 2  # read a, b; write the product
        else:
            B, S, H, D = shape
            stack = cfg.backbone if name.startswith("backbone") else cfg.decoder
            table = rope_cache(stack, S, DEVICE)
            x = torch.randn(shape, device=DEVICE).to(bf16)
            grad = torch.randn(B, H, S, D, device=DEVICE).to(bf16).transpose(1, 2)  # SDPA's gradient, transposed
            row = time_op(rp.rope_apply, rp.rope_ref, [x], [table], grad, args.calls)
            fwd_bytes = 2 * x.numel() * 2  # read x, write the result (the table stays in cache)
        row.update(op=op, name=name, shape=list(shape), layers=layers, clips=clips,
                   saved_us_per_step=layers * (row["torch both us"] - row["kernel both us"]),
                   kernel_fwd_GBps=fwd_bytes / row["kernel fwd us"] / 1e3)
        rows.append(row)
        print(f"| {op} {name} | {list(shape)} | {row['kernel fwd us']:.1f} / {row['torch fwd us']:.1f} | "
              f"{row['kernel bwd us']:.1f} / {row['torch bwd us']:.1f} | "
              f"{row['kernel both us']:.1f} / {row['torch both us']:.1f} | "
              f"{row['torch both us'] / row['kernel both us']:.2f}x | {row['kernel_fwd_GBps']:.0f} | "
              f"{', '.join(f'{u:.1e}' for u in row['unequal'])} |", flush=True)
    saved = {clips: sum(r["saved_us_per_step"] for r in rows if r["clips"] == clips) / 1e3 for clips in (4, 1)}
    print()
    for clips, ms in saved.items():
        print(f"per {clips}-clip step ({cfg.backbone.num_layers} backbone + {cfg.decoder.num_layers} decoder "
              f"layers, forward + backward of the ops above): {ms:.2f} ms saved")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": sm.triton.__version__,
              "calls": args.calls, "rows": rows, "saved_ms_per_step": saved}
    print(json.dumps(result))
    write_json("bench_train_fusions.json", result)


if __name__ == "__main__":
    main()
