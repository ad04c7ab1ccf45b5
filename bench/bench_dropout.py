"""Seeded dropout (kernels/dropout.py) against torch: the Triton kernel vs torch's own F.dropout (Philox draws,
which this kernel replaces in LoRA layers) vs the plain-torch reference of the same hash.

    python3 bench/bench_dropout.py

Shapes: a LoRA input of the training step, bf16 rows x width: 575 x 3072 (one clip's backbone rows), 575 x 8192
(the input of w2), 3000 x 3072 (the depth decoder's rows for 375 frames), 2300 x 3072 (four clips). Each timing is
20 calls captured in one CUDA graph (kernels.timing), so it is GPU time without launch overhead; GB/s counts one
read and one write of x. Also checks that the kernel equals the reference bit for bit on every shape. JSON goes
to $OUT/bench_dropout.json when OUT is set.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from kernels import dropout as dk  # noqa: E402
from kernels.timing import graph_time  # noqa: E402

SHAPES = [(575, 3072), (575, 8192), (3000, 3072), (2300, 3072)]
P, CALLS = 0.1, 20


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_dropout needs CUDA (tests/test_dropout.py checks the kernel on CPU under the interpreter)")
    seed = torch.tensor([1234], dtype=torch.int32, device="cuda")
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda").bfloat16()
        gbytes = 2 * x.numel() * x.element_size() / 1e9
        times = {
            "triton": graph_time(lambda i: dk.seeded_dropout_triton(x, seed, 3, P), CALLS),
            "torch F.dropout": graph_time(lambda i: F.dropout(x, P, training=True), CALLS),
            "reference": graph_time(lambda i: dk.seeded_dropout_ref(x, seed, 3, P), CALLS),
        }
        equal = torch.equal(dk.seeded_dropout_triton(x, seed, 3, P), dk.seeded_dropout_ref(x, seed, 3, P))
        row = {"shape": shape, "equal": equal, **{f"{k} us": 1e6 * t for k, t in times.items()},
               **{f"{k} GB/s": gbytes / t for k, t in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, p {P}, bf16")
    print("| rows x width | Triton us (GB/s) | torch F.dropout us (GB/s) | reference us | equal |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['triton us']:.1f} ({r['triton GB/s']:.0f}) | "
              f"{r['torch F.dropout us']:.1f} ({r['torch F.dropout GB/s']:.0f}) | {r['reference us']:.1f} | "
              f"{r['equal']} |")
    write_json("bench_dropout.json", rows)


if __name__ == "__main__":
    main()
