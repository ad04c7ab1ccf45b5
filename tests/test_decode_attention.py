"""kernels/decode_attention.py: fused RoPE + KV-cache write + few-row attention against its reference.

On CPU the Triton kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before
triton is imported), in float32/float16 (the interpreter computes bf16 arithmetic wrongly), with both axis orders of
its tiles (FLIP: one is compiled on Triton < 3.7, the other since), with tile overrides (chunk, warps, head split)
and several times in a row (the merge's ticket counters must be reset); the reference itself is checked against a
float64 definition. On CUDA the real kernel runs in bf16 at the backbone and depth-decoder shapes: eagerly, inside
CUDA graphs whose slot tensors advance between replays, and under torch.compile.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import decode_attention as da  # noqa: E402
from kernels.counters import _buffers as counter_buffers  # noqa: E402

# (B, S, H, KV, hd, L, slots[0], start, launch overrides): one chunk and many (merge), L not a multiple of the
# chunk, slots at the start, middle and end of the cache, start > 0 (some chunks without a valid key, or only the
# new keys valid), GQA groups 1, 2, 3 with and without the query heads split over programs, hd 64, 128 and 384,
# 1, 2, 4 and 8 warps
CASES = [
    (2, 1, 4, 2, 64, 37, 30, (0, 5), {}),
    (2, 3, 6, 2, 64, 40, 30, (0, 17), {"chunk": 16}),  # S = 3: 9 rows split over 3 programs
    (2, 3, 6, 2, 64, 70, 15, (0, 15), {"chunk": 16, "head_split": 1}),  # row 1 sees only the new keys; 16 rows
    (2, 2, 3, 3, 64, 70, 0, (0, 0), {}),  # first rows of the cache
    (2, 1, 6, 2, 64, 70, 69, (3, 0), {"chunk": 32, "num_warps": 2}),  # last slot
    (1, 2, 4, 4, 64, 600, 598, (100,), {"chunk": 64, "num_warps": 8}),
    (2, 1, 6, 2, 64, 300, 200, (0, 150), {"chunk": 64, "num_warps": 1, "head_split": 3}),
    (2, 1, 6, 2, 128, 100, 90, (0, 7), {"chunk": 16, "head_split": 1}),  # backbone-like tile, 6 chunks
    (2, 1, 4, 2, 384, 8, 5, (0, 0), {}),  # depth-decoder-like: hd not a power of two, one chunk
    (2, 2, 4, 2, 384, 8, 0, (0, 0), {"head_split": 1, "num_warps": 8}),
    (2, 3, 2, 1, 384, 37, 20, (0, 4), {"chunk": 16}),
]


def make(B, S, H, KV, hd, L, slot0, start, dtype, device, gen):
    qkv = torch.randn(B, S + 1, (H + 2 * KV) * hd + 8, generator=gen)[:, 1:, 8:]  # a strided view, as in a model
    angles = torch.randn(L + 4, hd // 2, generator=gen) * 3
    return dict(qkv=qkv.to(device, dtype),
                k_cache=torch.randn(B, KV, L, hd, generator=gen).to(device, dtype),
                v_cache=torch.randn(B, KV, L, hd, generator=gen).to(device, dtype),
                rope=torch.stack([angles.cos(), angles.sin()], -1).to(device),
                pos=torch.randint(0, L + 4, (B, S), generator=gen).to(device),
                slots=torch.arange(slot0, slot0 + S, device=device),
                start=torch.tensor(start, device=device), n_heads=H, n_kv=KV)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run_both(args, fn):
    """fn(**args) and the reference on their own copies of the caches -> (out, ref, caches, ref caches)."""
    a = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    r = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    out, ref = fn(**a), da.decode_attention_ref(**r)
    return out, ref, (a["k_cache"], a["v_cache"]), (r["k_cache"], r["v_cache"])


def check_caches(args, caches, ref_caches):
    """Written rows equal the reference's bit for bit; every other slot is untouched."""
    others = torch.ones(args["k_cache"].shape[2], dtype=torch.bool)
    others[args["slots"].cpu()] = False
    for c, rc, orig in zip(caches, ref_caches, (args["k_cache"], args["v_cache"])):
        assert torch.equal(c[:, :, others], orig[:, :, others]), "a slot outside `slots` changed"
        bad = (c != rc).sum().item()
        assert bad == 0, f"{bad} written cache values differ from the reference"


def interpreter_results(dtype, **extra):
    gen = torch.Generator().manual_seed(0)
    out = []
    for B, S, H, KV, hd, L, slot0, start, kw in CASES:
        args = make(B, S, H, KV, hd, L, slot0, start, dtype, "cpu", gen)
        y, ref, caches, ref_caches = run_both(args, lambda **a: da._launch(**a, **kw, **extra))
        assert y.shape == ref.shape and y.dtype == dtype
        check_caches(args, caches, ref_caches)
        out.append(rel_err(y, ref))
    return out


def interpreter_slices():
    """q/k/v given as 3 float32 K slices (the GEMV's partials, a strided view) over float16 caches: the kernel sums
    them on load. Slices of fp16 values scaled by powers of two: the sum is exact in any order, so the written cache
    rows must still equal the reference's bit for bit."""
    gen = torch.Generator().manual_seed(4)
    out = []
    for B, S, H, KV, hd, L, slot0, start, kw in CASES[:4] + CASES[8:9]:
        args = make(B, S, H, KV, hd, L, slot0, start, torch.float16, "cpu", gen)
        whole = args["qkv"].float()
        parts = torch.empty(3, B, S, whole.shape[-1] + 4)[..., 4:]
        parts.copy_(torch.stack([whole / 2, whole / 4, whole / 4]))
        args["qkv"] = parts
        y, ref, caches, ref_caches = run_both(args, lambda **a: da._launch(**a, **kw))
        assert y.shape == ref.shape and y.dtype == torch.float16
        check_caches(args, caches, ref_caches)
        out.append(rel_err(y, ref))
    return out


def interpreter_repeat():
    """Launches in a row agree bit for bit (output and caches) and leave the ticket counters at 0."""
    gen = torch.Generator().manual_seed(6)
    args = make(1, 1, 2, 1, 64, 64, 50, (3,), torch.float32, "cpu", gen)
    kw = {"chunk": 16}
    runs = []
    for _ in range(3):
        a = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
        runs.append((da._launch(**a, **kw), a))
    same = all(torch.equal(y, runs[0][0]) and torch.equal(a["k_cache"], runs[0][1]["k_cache"])
               and torch.equal(a["v_cache"], runs[0][1]["v_cache"]) for y, a in runs)
    counters = [int(t.abs().sum()) for t in counter_buffers.values()]
    return {"same": same, "counters": counters}


@pytest.mark.skipif(da.triton is None, reason="triton not installed")
def test_kernels_under_triton_interpreter(run_interpreted):
    res = run_interpreted(__file__)
    assert len(res["float32"]) == len(CASES) and max(res["float32"]) < 1e-5, res
    assert len(res["float32_flip"]) == len(CASES) and max(res["float32_flip"]) < 1e-5, res  # the other axis order
    assert max(res["float16"]) < 2e-3, res  # fp16 rounding of q, k and the output
    assert res["repeat"] == {"same": True, "counters": [0]}, res["repeat"]
    assert max(res["slices"]) < 2e-3, res["slices"]  # q/k/v as K slices
    # the custom op's schema (mutated caches), fake implementation and functionalization (for torch.compile)
    assert all(v == "SUCCESS" for v in res["opcheck"].values()), res["opcheck"]


def naive(qkv, k_cache, v_cache, rope, pos, slots, start, n_heads, n_kv):
    """The definition in float64, one query head at a time (checks the reference's GQA layout and mask)."""
    B, S, _ = qkv.shape
    hd = qkv.shape[-1] // (n_heads + 2 * n_kv)
    x = qkv.double().unflatten(-1, (n_heads + 2 * n_kv, hd // 2, 2))
    cos, sin = rope[pos].double().unbind(-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    rot = torch.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 1] * cos + x[..., 0] * sin], -1).flatten(-2)
    q, k, v = rot[:, :, :n_heads], rot[:, :, n_heads:n_heads + n_kv], x[:, :, n_heads + n_kv:].flatten(-2)
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    kc[:, :, slots], vc[:, :, slots] = k.transpose(1, 2), v.transpose(1, 2)
    j = torch.arange(kc.shape[2])
    ok = (j >= start[:, None, None]) & (j <= slots[None, :, None])  # [B, S, L]
    out = []
    for h in range(n_heads):
        kv = h // (n_heads // n_kv)
        s = q[:, :, h] @ kc[:, kv].transpose(1, 2) / hd ** 0.5
        out.append(s.masked_fill(~ok, float("-inf")).softmax(-1) @ vc[:, kv])
    return torch.stack(out, 2).flatten(2), kc, vc


def test_reference_matches_definition():
    gen = torch.Generator().manual_seed(1)
    for B, S, H, KV, hd, L, slot0, start, _ in CASES:
        args = make(B, S, H, KV, hd, L, slot0, start, torch.float32, "cpu", gen)
        want, kc, vc = naive(**args)
        got = da.decode_attention_ref(**args)
        assert rel_err(got, want) < 1e-5
        assert torch.allclose(args["k_cache"].double(), kc, atol=1e-6) and torch.equal(args["v_cache"].double(), vc)


def test_dispatch_falls_back_to_reference_on_cpu():
    args = make(2, 2, 4, 2, 64, 37, 10, (0, 3), torch.float32, "cpu", torch.Generator().manual_seed(2))
    assert not da.usable(**args)
    out, ref, caches, ref_caches = run_both(args, da.decode_attention)
    assert torch.equal(out, ref)
    check_caches(args, caches, ref_caches)


# ------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available() or da.triton is None, reason="needs CUDA and triton")
BACKBONE = dict(B=2, H=24, KV=8, hd=128)  # CFG rows, Llama-3.2-3B attention
DECODER = dict(B=2, H=8, KV=4, hd=384)


def _cuda_args(s, seed=3):
    return make(s["B"], s["S"], s["H"], s["KV"], s["hd"], s["L"], s["slot0"], s["start"], torch.bfloat16, "cuda",
                torch.Generator().manual_seed(seed))


@cuda
@pytest.mark.parametrize("shape", [
    dict(BACKBONE, S=1, L=600, slot0=599, start=(0, 37)),
    dict(BACKBONE, S=1, L=600, slot0=40, start=(0, 40)),
    dict(BACKBONE, S=1, L=3000, slot0=2990, start=(12, 0)),
    dict(BACKBONE, S=3, L=584, slot0=300, start=(0, 9)),
    dict(DECODER, S=2, L=8, slot0=0, start=(0, 0)),
    dict(DECODER, S=1, L=8, slot0=7, start=(0, 0)),
], ids=lambda s: f"S{s['S']}-hd{s['hd']}-L{s['L']}-slot{s['slot0']}")
def test_kernels_on_cuda_bf16(shape):
    args = _cuda_args(shape)
    assert da.usable(**args)
    out, ref, caches, ref_caches = run_both(args, da.decode_attention)
    assert rel_err(out, ref) < 1e-2
    check_caches(args, caches, ref_caches)
    again, _, _, _ = run_both(args, da.decode_attention)
    assert torch.equal(out, again), "not deterministic"  # the merge must not depend on which program came last


@cuda
@pytest.mark.parametrize("shape", [dict(BACKBONE, S=1, L=600, slot0=599, start=(0, 37)),
                                   dict(DECODER, S=2, L=8, slot0=0, start=(0, 0))], ids=["backbone", "decoder"])
def test_qkv_slices_on_cuda(shape):
    """q/k/v as float32 K slices (the engine's split q/k/v GEMV) give what their bf16 sum gives: slices of bf16
    values scaled by powers of two, so the sum is exact in any order."""
    args = _cuda_args(shape)
    whole = args["qkv"].float()
    sliced = dict(args, qkv=torch.stack([whole / 2, whole / 4, whole / 8, whole / 8]))
    assert da.usable(**sliced)
    out, ref, caches, ref_caches = run_both(sliced, da.decode_attention)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    check_caches(args, caches, ref_caches)
    plain, _, plain_caches, _ = run_both(args, da.decode_attention)
    assert torch.equal(out, plain) and all(torch.equal(a, b) for a, b in zip(caches, plain_caches))


@cuda
@pytest.mark.parametrize("kw", [
    dict(chunk=16, num_warps=4), dict(chunk=64, num_warps=8), dict(chunk=32, num_warps=2),
    dict(chunk=32, num_warps=4, head_split=3), dict(chunk=128, num_warps=8), dict(chunk=32, num_warps=1),
], ids=str)
def test_tile_overrides_on_cuda(kw):
    """The knobs the benchmark sweeps give the same results (backbone shape, start > 0, several chunks)."""
    args = _cuda_args(dict(BACKBONE, S=1, L=584, slot0=500, start=(0, 77)))
    out, ref, caches, ref_caches = run_both(args, lambda **a: da._launch(**a, **kw))
    assert rel_err(out, ref) < 1e-2
    check_caches(args, caches, ref_caches)


def _frame_calls(kind, B, H, KV, hd, L, gen):
    """Static inputs of the calls one captured frame makes: the backbone's one call at a moving slot, or the depth
    decoder's 7 calls (slots 0-1, then 2..7) over its 8-slot cache."""
    if kind == "backbone":
        args = make(B, 1, H, KV, hd, L, 100, (0, 37), torch.bfloat16, "cuda", gen)
        return [args]
    calls = [make(B, 2, H, KV, hd, L, 0, (0, 0), torch.bfloat16, "cuda", gen)]
    calls += [make(B, 1, H, KV, hd, L, i, (0, 0), torch.bfloat16, "cuda", gen) for i in range(2, L)]
    for c in calls[1:]:  # one cache for all calls of the frame
        c["k_cache"], c["v_cache"], c["rope"] = calls[0]["k_cache"], calls[0]["v_cache"], calls[0]["rope"]
    return calls


@cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["backbone", "decoder"])
def test_cuda_graph_replays_with_advancing_slots(kind, compiled):
    """Capture a frame's calls (torch.compile(fullgraph=True) first, optionally), then replay with new inputs and
    the backbone's slot advanced on the device between replays; each replay must match the reference run eagerly
    (and the merge's counters must be back at 0 after each replay)."""
    shape = BACKBONE if kind == "backbone" else DECODER
    gen = torch.Generator().manual_seed(4)
    calls = _frame_calls(kind, L=600 if kind == "backbone" else 8, gen=gen, **shape)
    ref_k, ref_v = calls[0]["k_cache"].clone(), calls[0]["v_cache"].clone()

    def frame():
        return [da.decode_attention(**c) * 1.0 for c in calls]  # * 1.0: something around the op to fuse

    fn = torch.compile(frame, fullgraph=True, dynamic=False) if compiled else frame
    k0, v0 = ref_k.clone(), ref_v.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    calls[0]["k_cache"].copy_(k0)  # warm-up wrote the caches: start the replays from the saved state
    calls[0]["v_cache"].copy_(v0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    for step in range(4):
        for c in calls:
            c["qkv"].copy_(torch.randn(c["qkv"].shape, generator=gen).to(c["qkv"]))
            c["pos"].copy_(torch.randint(0, c["rope"].shape[0], c["pos"].shape, generator=gen))
        graph.replay()
        for c, out in zip(calls, outs):
            ref = da.decode_attention_ref(**dict(c, k_cache=ref_k, v_cache=ref_v))
            assert rel_err(out, ref) < 1e-2, (step, c["slots"].tolist())
        assert torch.equal(calls[0]["k_cache"], ref_k) and torch.equal(calls[0]["v_cache"], ref_v), step
        assert all(int(t.abs().sum()) == 0 for t in counter_buffers.values()), step
        if kind == "backbone":
            calls[0]["slots"].add_(1)  # in place, as the engine's slot: the graph reads the new value


if __name__ == "__main__":  # the interpreter half of test_kernels_under_triton_interpreter
    res = {"float32": interpreter_results(torch.float32), "float16": interpreter_results(torch.float16),
           "float32_flip": interpreter_results(torch.float32, flip=not da._FLIP),
           "repeat": interpreter_repeat(), "slices": interpreter_slices()}
    a = make(2, 2, 4, 2, 64, 37, 10, (0, 3), torch.float32, "cpu", torch.Generator().manual_seed(5))
    res["opcheck"] = torch.library.opcheck(da.decode_attention_op.op, tuple(a.values()))
    print(json.dumps(res))
