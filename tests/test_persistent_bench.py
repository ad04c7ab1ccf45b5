"""bench/bench_persistent.py's kernels: its GEMV phases against torch under Triton's interpreter (one program, so
every grid barrier is passed at once), and its barrier and chain compiled for an H100 without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

triton = pytest.importorskip("triton")


def test_chain_matches_torch_under_interpreter():
    code = r"""
import json, sys, torch
sys.path.insert(0, "bench")
import bench_persistent as bp
shapes = [(48, 192), (32, 128), (64, 128), (32, 320)]  # K chunks of 64: 3, 2, 2, 5
w = bp.make_weights(2, shapes, device="cpu", seed=1)
x = torch.randn(2, 320, dtype=torch.float16)
count = torch.zeros(3, dtype=torch.int32)
outs = bp.run_chain(x, w, count, 1, bn=16, kc=64)
outs = bp.run_chain(x, w, count, 1, bn=16, kc=64)  # a second launch on the same barrier words
ref = bp.reference(x, w, kc=64)
print(json.dumps({"err": max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, ref)),
                  "arrived": int(count[0]), "generation": int(count[1]), "gave_up": int(count[2])}))
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["err"] < 1e-2, res
    # two launches x 2 layers x 4 phases: every barrier completed, its arrivals set back to 0
    assert res["generation"] == 2 * 2 * 4 and res["arrived"] == 0 and res["gave_up"] == 0, res


def test_barrier_and_chain_compile_for_hopper():
    """The spin-wait barrier and the persistent chain (with its L2 prefetch) compile and assemble for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import bench_persistent as bp
    sys.path.insert(0, str(REPO / "bench"))
    import kernel_resources
    target = GPUTarget("cuda", 90, 32)
    ptx = triton.compile(ASTSource(bp._barriers_kernel, {"bar_ptr": "*i32", "ROUNDS": "constexpr"},
                                   {"ROUNDS": 4}), target=target).asm["ptx"]
    assert "atom" in ptx
    k = bp._chain_kernel
    types = {"x_ptr": "*bf16", "count_ptr": "*i32", **{f"w{i}": "*i32" for i in range(4)},
             **{f"s{i}": "*fp32" for i in range(4)}, **{f"o{i}": "*fp32" for i in range(4)}}
    for bn, kc, nw in bp.CONFIGS[:: len(bp.CONFIGS) - 1]:  # the first and the last
        consts = {**{f"N{i}": n for i, (n, _) in enumerate(bp.SHAPES)},
                  **{f"K{i}": depth for i, (_, depth) in enumerate(bp.SHAPES)},
                  "BN": bn, "KC": kc, "PF_BYTES": 8 << 20, "PF_SLOTS": 32 * nw, "M": 2}
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in k.arg_names}
        attrs = {(k.arg_names.index(n),): [["tt.divisibility", 16]] for n in k.arg_names if sig[n].startswith("*")}
        ptx = triton.compile(ASTSource(k, sig, consts, attrs), target=target, options={"num_warps": nw}).asm["ptx"]
        assert "cp.async.bulk.prefetch.L2" in ptx and "atom" in ptx
        used = kernel_resources.resources(ptx, 90)
        assert 0 < used["registers"] <= 255 and used["spill_stores"] == used["spill_loads"] == 0, used
