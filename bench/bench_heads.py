"""The output heads' matmuls at the real vocabulary (8197 columns) against the same matmuls padded to a multiple
of 8 or 64 columns: does the odd width cost enough to pad the heads in the training step?

    python3 bench/bench_heads.py

Why: a bf16 matrix whose row length is not a multiple of 8 elements is not 16-byte aligned, and cuBLAS then falls
back to slower kernels (the captured training step's profile shows sm75 cutlass GEMMs for these shapes). Shapes of
the training step: codebook 0's head x [N, 3072] @ W[V, 3072]^T, and the depth heads' einsum out [N, 7, 3072] x
audio_head [7, 3072, V], forward and input gradient, for N = 375 (one 30 s clip) and 1500 (four). Each timing is
20 calls in one CUDA graph (kernels.timing: GPU time, no launch overhead). "pad copy" is the cost of building
the padded depth heads once (what padding per step would add). JSON to $OUT/bench_heads.json when OUT is set.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from kernels.timing import graph_time  # noqa: E402

D, K, V, CALLS = 3072, 7, 8197, 20


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_heads needs CUDA")
    bf = dict(device="cuda", dtype=torch.bfloat16)
    rows = []
    for n in (375, 1500):
        x, out = torch.randn(n, D, **bf), torch.randn(n, K, D, **bf)
        for width in (V, -(-V // 8) * 8, -(-V // 64) * 64):
            w, heads = torch.randn(width, D, **bf), torch.randn(K, D, width, **bf)
            g0, g = torch.randn(n, width, **bf), torch.randn(n, K, width, **bf)
            us = {
                "c0 fwd": graph_time(lambda i: x @ w.t(), CALLS),
                "c0 dx": graph_time(lambda i: g0 @ w, CALLS),
                "depth fwd": graph_time(lambda i: torch.einsum("nkd,kdv->nkv", out, heads), CALLS),
                "depth dx": graph_time(lambda i: torch.einsum("nkv,kdv->nkd", g, heads), CALLS),
            }
            us = {k: 1e6 * v for k, v in us.items()}
            if width != V:
                src = torch.randn(K, D, V, **bf)
                us["pad copy"] = 1e6 * graph_time(lambda i: F.pad(src, (0, width - V)), CALLS)
            row = {"rows": n, "width": width, "us": us, "sum_us": sum(v for k, v in us.items() if k != "pad copy")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; us per call (GPU time)")
    print("| rows | width | c0 fwd | c0 dx | depth fwd | depth dx | sum | pad copy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        u = r["us"]
        print(f"| {r['rows']} | {r['width']} | {u['c0 fwd']:.1f} | {u['c0 dx']:.1f} | {u['depth fwd']:.1f} | "
              f"{u['depth dx']:.1f} | {r['sum_us']:.1f} | {u.get('pad copy', 0):.1f} |")
    write_json("bench_heads.json", rows)


if __name__ == "__main__":
    main()
