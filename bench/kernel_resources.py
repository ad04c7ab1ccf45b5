"""Registers and spills of the decode GEMV at every tile this repository ships, compiled for a GPU on any machine.

    python3 bench/kernel_resources.py [--card "NVIDIA H100 80GB HBM3"] [--arch 90]

For each entry of kernels/gemv_tiles.json for that card, compiles kernels.gemv's kernel with the entry's tile as
the launch would (weight and activation dtypes, GLU, in-kernel K reduction, warps, pipeline stages, and 16-byte
divisibility of every pointer, K and stride: without those hints the compiler cannot vectorise the loads and the
same kernels use more registers and spill), then runs Triton's own `ptxas -v` on the PTX. No GPU is needed:
triton.compile targets `--arch` directly. A spill in the main loop would cost bandwidth that a decode step is
bound by; bench/NOTES.md has what this found.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

USAGE = re.compile(r"Used (\d+) registers|(\d+) bytes spill stores|(\d+) bytes spill loads")


def resources(ptx: str, arch: int) -> dict:
    """ptxas -v's register count and spill bytes for one PTX text."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path  # the ptxas Triton itself runs for this arch (Tritons ship more than one)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        out = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", src, "-o", src + ".o"], capture_output=True,
                             text=True, check=True).stderr
    found = {"registers": 0, "spill_stores": 0, "spill_loads": 0}
    for regs, stores, loads in USAGE.findall(out):
        found["registers"] = max(found["registers"], int(regs or 0))
        found["spill_stores"] += int(stores or 0)
        found["spill_loads"] += int(loads or 0)
    return found


def compile_pick(key: str, tile: list, arch: int, prefetch: bool = False) -> dict:
    """Compile the GEMV for one gemv_tiles.json entry (key: card|N|K|weight dtype|x dtype|partial|glu|...);
    prefetch: with the L2 prefetch of the next weight at the end of each program (kernels/prefetch.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import gemv
    _, N, K, wdt, xdt, partial, glu = key.split("|")[:7]
    bn, bk, sk, nw = tile
    partial, glu = partial == "True", glu == "True"
    types = {"torch.int8": "i8", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    x, w = types[xdt], types[wdt]
    consts = {"BLOCK_M": gemv.MAX_ROWS, "BLOCK_N": bn, "BLOCK_K": bk, "SCALED": w == "i8", "GLU": glu,
              "REDUCE": sk > 1 and not partial, "PDL": True, "PF_SLOTS": 32 * nw if prefetch else 0}
    pointers = {"x_ptr": x, "w_ptr": w, "s_ptr": "fp32", "y_ptr": "fp32" if partial and sk > 1 else x,
                "part_ptr": "fp32", "cnt_ptr": "i32", "pf_ptr": w}
    kernel = gemv._gemv_kernel
    signature = {n: "constexpr" if n in consts else "*" + pointers[n] if n in pointers else "i32"
                 for n in kernel.arg_names}
    # every argument but the row count M is a multiple of 16 at the real launch (pointers, K, widths, strides)
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in kernel.arg_names
             if n not in consts and n != "M"}
    stages = gemv._stages(bn * (2 if glu else 1), bk)
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": nw, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    return {"N": int(N), "K": int(K), "weights": w, "glu": glu, "partial": partial, "tile": tile, "stages": stages,
            "prefetches": ptx.count("cp.async.bulk.prefetch.L2"), **resources(ptx, arch)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--card", default="NVIDIA H100 80GB HBM3", help="the card's entries in kernels/gemv_tiles.json")
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N entries (0: all)")
    ap.add_argument("--prefetch", action="store_true", help="the kernel with its L2 prefetch of the next weight")
    a = ap.parse_args(argv)
    picks = [(k, v) for k, v in json.loads((REPO / "kernels" / "gemv_tiles.json").read_text()).items()
             if k.split("|")[0] == a.card]
    if not picks:
        ap.error(f"no entries for {a.card!r} in kernels/gemv_tiles.json")
    print("| N | K | weights | GLU | K slices to | tile (bn, bk, sk, warps) | stages | registers | spill bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, tile in picks[:a.limit or None]:
        r = compile_pick(key, tile, a.arch, a.prefetch)
        print(f"| {r['N']} | {r['K']} | {r['weights']} | {r['glu']} | {'caller' if r['partial'] else 'kernel'} | "
              f"{tuple(r['tile'])} | {r['stages']} | {r['registers']} | {r['spill_stores'] + r['spill_loads']} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
