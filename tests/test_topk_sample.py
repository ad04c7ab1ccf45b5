"""kernels/topk_sample.py: the one-launch CFG + top-k + temperature sampler against its reference.

On CPU the Triton kernels run under Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before
triton is imported) on float32 logits (the interpreter computes bf16 arithmetic wrongly); on CUDA they run for real
through `sample`, with bf16 logits too, inside a CUDA graph and under torch.compile(fullgraph=True).

The kernel's search (group-maximum bound, compaction, all-pairs rank) has four ways through it; the interpreter
run records which ones the cases took (the kernel's STATS output) and asserts all four ran: the candidates fit at
once; they fit after bisection steps (small capacity); more than the capacity tie at the k-th value after
bisection steps; they tie at the row maximum with no step possible.

Inputs are built so that no two candidates are within float rounding of each other: "distinct" rows are
float32 normals, "tied" rows are multiples of 1/8 (exact through CFG 1.5, many exact ties at the k-th value).
Half the cases give the entries ranked around k tiny noise, so that a kept set one entry too big or too small
changes the id (with plain Exp(1) noise the entries at the boundary almost never win).
"""
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import topk_sample as ts  # noqa: E402

VS = [69, 300, 1000, 8197]
TEMPS = [0.7, 1.0, 1.3]


def topks(V):
    return [0, 1, 5, 50, V - 1, V + 3]


def make_case(V, topk, i, gen):
    """Case number i for (V, topk): cycles CFG on/off, B2, temperature, value family, bias and noise kind."""
    cfg = (1.0, 1.5)[i % 2]
    B2 = [1, 2, 4, 6][(i // 2) % 4] if cfg == 1.0 else [2, 4, 6][(i // 2) % 3]
    B = B2 // 2 if cfg != 1.0 else B2
    temp = TEMPS[(i // 3) % 3]
    tied = (i // 2) % 2 == 1
    if tied:  # multiples of 1/8: the CFG mix stays exact, ties everywhere
        logits = torch.randint(-40, 41, (B2, V), generator=gen).float() / 8
    else:
        logits = torch.randn(B2, V, generator=gen) * 2
    bias = torch.zeros(V)
    kind = ["zero", "holes", "sparse"][i % 3 if V > 100 else (i + 1) % 3]
    if kind == "holes":  # disallowed ids and a padded tail, as the engine's bias
        bias[torch.rand(V, generator=gen) < 0.3] = -math.inf
        bias[-(V % 64 + 3):] = -math.inf
    elif kind == "sparse":  # only 3 finite entries: fewer than topk
        bias[:] = -math.inf
        bias[torch.randperm(V, generator=gen)[:3]] = 0.0
    noise = torch.empty(B, V).exponential_(generator=gen)
    if i % 4 in (1, 2) and 1 < topk < V:  # tiny noise on the entries ranked k-2 .. k+1: the boundary decides the id
        mixed = ts.mix_ref(logits, bias, cfg) / temp
        order = torch.sort(mixed, dim=-1, descending=True, stable=True).indices
        near = order[:, max(0, topk - 3): topk + 1]
        noise.scatter_(1, near, noise.gather(1, near) * 1e-20)
    return logits, bias, cfg, temp, topk, noise


def all_cases():
    gen = torch.Generator().manual_seed(1234)
    for V in VS:
        for topk in topks(V):
            for i in range(8):
                yield make_case(V, topk, i, gen)
    # explicit ties at the k-th value: all four 3.0 are kept (topk 3), the last one wins through its noise
    logits = torch.tensor([[5.0, 3.0, 4.0, 3.0, 1.0, 3.0, 0.5, 3.0, 2.0]])
    noise = torch.ones(1, 9)
    noise[0, 7] = 1e-6
    yield logits, torch.zeros(9), 1.0, 1.0, 3, noise
    # -0.0 and +0.0 are equal: topk 2 keeps both (kth = 0), the -0.0 wins (no bias: -0.0 + 0.0 would be +0.0)
    logits = torch.tensor([[1.0, 0.0, -0.0, -1.0, -2.0]])
    noise = torch.ones(1, 5)
    noise[0, 2] = 1e-6
    yield logits, None, 1.0, 1.0, 2, noise
    yield from extra_cases(gen)


def extra_cases(gen):
    """Shapes and values the generic cases miss (the select kernel: tile layout, tail, tie breaks)."""
    # equal race scores (same value, same noise) at indices 5 and 130: the lower index wins although the kernel's
    # candidate slots come in thread order (at V 300 index 130 is register 1 of thread 2, before thread 5)
    for cfg in (1.0, 1.5):
        logits = torch.randn(2 if cfg != 1.0 else 1, 300, generator=gen)
        logits[:, [5, 130]] = 4.0
        noise = torch.empty(1, 300).exponential_(generator=gen)
        noise[0, [5, 130]] = 1e-3
        yield logits, None, cfg, 1.0, 50, noise
    # V a power of two: no tail tile
    for V, topk in ((256, 5), (256, 50), (1024, 50), (1024, 1)):
        logits = torch.randn(2, V, generator=gen) * 2
        yield logits, torch.zeros(V), 1.5, 1.0, topk, torch.empty(1, V).exponential_(generator=gen)
    # every entry equal: all kept, more than any capacity, and no bisection step possible (lo = max)
    logits = torch.full((1, 300), 0.5)
    noise = torch.empty(1, 300).exponential_(generator=gen)
    yield logits, None, 1.0, 0.7, 5, noise
    # the largest entries in the tail (V 8197 = 8192 + 5): candidates and the race winner beyond the main tile
    logits = torch.randn(1, 8197, generator=gen)
    logits[0, -3:] = torch.tensor([9.0, 8.0, 9.0])
    noise = torch.ones(1, 8197)
    noise[0, -2] = 1e-4
    yield logits, None, 1.0, 1.0, 50, noise
    yield logits, None, 1.0, 1.0, 1, None  # argmax: the first of the two 9.0
    # the k-th value tied by many entries across main tile and tail, more than 128 of them
    logits = torch.randint(-3, 4, (1, 8197), generator=gen).float()
    yield logits, None, 1.0, 1.0, 50, torch.empty(1, 8197).exponential_(generator=gen)
    # the largest values crowded into few of the kernel's groups (group = entries of neighbouring threads, thread
    # t holding entries t, t + NT, ...): the k-th largest group maximum bounds the k-th value loosely, more
    # candidates than slots, bisection steps until they fit. V 1000 (4 warps, NT 128): thread 3 holds 3, 131,
    # ..., 899. V 8197 (8 warps, NT 256, groups of 2 threads): threads 0..4 hold 150 large values.
    logits = torch.randn(1, 1000, generator=gen)
    logits[0, 3::128] = torch.arange(10.0, 18.0)
    yield logits, None, 1.0, 1.0, 5, torch.empty(1, 1000).exponential_(generator=gen)
    logits = torch.randn(1, 8197, generator=gen)
    crowd = (torch.arange(5)[:, None] + 256 * torch.arange(30)[None, :]).flatten()
    logits[0, crowd] = 10 + torch.randn(150, generator=gen)
    yield logits, None, 1.0, 1.0, 50, torch.empty(1, 8197).exponential_(generator=gen)


def tied_boundaries(cases):
    """How many sampled rows have several entries equal to the k-th value (the tie semantics are exercised)."""
    n = 0
    for logits, bias, cfg, temp, topk, noise in cases:
        if 1 < topk < logits.shape[-1]:
            mixed = ts.mix_ref(logits, bias, cfg) / temp
            kth = mixed.topk(topk, -1).values[:, -1:]
            n += int(((mixed >= kth).sum(-1) > topk).sum())
    return n


def row_near_tie(args, row, a, b, rtol=1e-5):
    """Ids a and b of output row `row` are within float rounding of each other in the reference's own scores."""
    logits, bias, cfg, temp, topk, noise = args
    mixed = ts.mix_ref(logits, bias, cfg)[row]
    if topk == 1 or noise is None:
        return bool(mixed[a] == mixed[b])
    x = mixed / temp
    if 0 < topk < x.shape[-1]:
        x = x.masked_fill(x < x.topk(topk).values[-1], -math.inf)
    score = (x.softmax(-1) / noise[row]).double()
    return bool(torch.isclose(score[a], score[b], rtol=rtol, atol=0))


def compare(device, fn, dtype=torch.float32, vs=None, ks=None):
    """Run fn (the kernel) and the reference on every case (of V in vs and topk in ks, if given). Returns
    (rows compared, mismatches that are not near ties, mismatches that are: two candidates within float rounding
    in the reference's own scores)."""
    rows, bad, ties = 0, [], []
    for n, (logits, bias, cfg, temp, topk, noise) in enumerate(all_cases()):
        if (vs is not None and logits.shape[-1] not in vs) or (ks is not None and topk not in ks):
            continue
        noise = None if noise is None else noise.to(device)
        args = (logits.to(device, dtype), None if bias is None else bias.to(device), cfg, temp, topk, noise)
        out, ref = fn(*args), ts.sample_ref(*args)
        assert out.dtype == torch.int64 and out.shape == ref.shape
        rows += ref.numel()
        for r in (out != ref).nonzero().flatten().tolist():
            a, b = out[r].item(), ref[r].item()
            info = {"case": n, "row": r, "V": logits.shape[-1], "cfg": cfg, "temp": temp, "topk": topk, "ids": (a, b)}
            (ties if row_near_tie(args, r, a, b) else bad).append(info)
    return rows, bad, ties


@pytest.mark.skipif(ts.triton is None, reason="triton not installed")
def test_kernel_under_triton_interpreter(run_interpreted):
    res = run_interpreted(__file__)
    for name, run in res["runs"].items():  # inputs have no near ties: every id equal
        assert run["rows"] > 50 and run["bad"] == [] and run["ties"] == [], (name, run)
    assert res["runs"]["select"]["rows"] > 300
    # every way through the select kernel ran: (1 = candidates raced, 2 = whole tiles raced; bisection steps)
    assert set(res["paths"]) >= {"1,0", "1,1", "2,0", "2,1"}, res["paths"]


def test_cases_exercise_ties_and_boundaries():
    cases = list(all_cases())
    assert tied_boundaries(cases) >= 20
    assert sum(1 for c in cases if c[2] != 1.0) >= 50


def test_sample_falls_back_to_reference_on_cpu():
    logits, bias, cfg, temp, topk, noise = make_case(300, 50, 1, torch.Generator().manual_seed(0))
    assert torch.equal(ts.sample(logits, bias, cfg, temp, topk, noise),
                       ts.sample_ref(logits, bias, cfg, temp, topk, noise))
    with pytest.raises(ValueError):
        ts.sample(torch.randn(3, 10), None, 1.5, 1.0, 5, None)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or ts.triton is None, reason="needs CUDA + triton")


@needs_cuda
def test_kernel_on_cuda_matches_reference():
    rows, bad, ties = compare("cuda", ts.sample)  # float32 cases: the same inputs as the interpreter test
    assert rows > 300 and bad == [] and len(ties) <= 2, (bad, ties)
    # bf16 logits as the engine has them: V 8256 (8197 real + padding), CFG 1.5, topk 50; ids may differ only
    # where two candidates' scores are within float rounding
    gen = torch.Generator(device="cuda").manual_seed(0)
    bias = torch.zeros(8256, device="cuda")
    bias[8197:] = -math.inf
    diffs, trials = [], 0
    for temp in TEMPS:
        for topk in (1, 5, 50, 0):
            logits = (torch.randn(2 * 64, 8256, device="cuda", generator=gen) * 3).bfloat16()
            noise = torch.empty(64, 8256, device="cuda").exponential_(generator=gen)
            args = (logits, bias, 1.5, temp, topk, noise)
            out, ref = ts.sample(*args), ts.sample_ref(*args)
            trials += 64
            for r in (out != ref).nonzero().flatten().tolist():
                diffs.append((r, out[r].item(), ref[r].item()))
                assert row_near_tie(args, r, out[r].item(), ref[r].item()), (temp, topk, diffs[-1])
    assert len(diffs) <= trials // 100, diffs


@needs_cuda
@pytest.mark.parametrize("warps", [4, 8, 16, 32])
def test_warps_on_cuda(warps):
    """The select kernel at the warp counts the bench compares, on the cases of V 300 and 8197 (and the extras) with
    top-k 0 (no filter), 1 (argmax) and 50 (the default). Each case family is a specialisation compiled anew at
    every warp count (66 for every top-k, ~1-2 s each at 16 and 32 warps: minutes of device time per count); the
    default warps see every case in test_kernel_on_cuda_matches_reference."""
    rows, bad, ties = compare("cuda", lambda *a: ts._launch(*a, num_warps=warps), vs=(300, 8197), ks=(0, 1, 50))
    assert rows > 100 and bad == [] and len(ties) <= 2, (bad, ties)


@needs_cuda
def test_select_paths_on_cuda():
    """The four ways through the select kernel all run on the GPU too (its layouts differ from the interpreter's).
    The generation shape (V 8197, top-k 50) and the capacity-8 cases, which between them take all four ways in the
    interpreter: every case family is a specialisation compiled anew with STATS on (all 66 took minutes)."""
    paths = {}
    for fn, vs, ks in ((launch_with_paths(paths), (8197,), (50,)),
                       (launch_with_paths(paths, capacity=8), (300, 1000), (5, 50))):
        rows, bad, ties = compare("cuda", fn, vs=vs, ks=ks)
        assert bad == [] and len(ties) <= 2, (bad, ties)
    assert set(paths) >= {"1,0", "1,1", "2,0", "2,1"}, paths


@needs_cuda
def test_kernel_in_cuda_graph_and_compile():
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(4, 8256, device="cuda", generator=gen) * 3).bfloat16()
    bias = torch.zeros(8256, device="cuda")
    bias[8197:] = -math.inf
    noise = torch.empty(2, 8256, device="cuda").exponential_(generator=gen)
    want = ts.sample(logits, bias, 1.5, 1.0, 50, noise)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ts.sample(logits, bias, 1.5, 1.0, 50, noise)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = ts.sample(logits, bias, 1.5, 1.0, 50, noise)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    logits.copy_((torch.randn(4, 8256, device="cuda", generator=gen) * 3).bfloat16())  # new inputs, same memory
    graph.replay()
    assert torch.equal(got, ts.sample(logits, bias, 1.5, 1.0, 50, noise))

    fn = torch.compile(lambda lg, b, q: ts.sample(lg, b, 1.5, 1.0, 50, q) + 0, fullgraph=True)
    assert torch.equal(fn(logits, bias, noise), ts.sample(logits, bias, 1.5, 1.0, 50, noise))


def launch_with_paths(paths, **kw):
    """ts._launch with the select kernel's STATS: counts (way through the kernel, bisection steps > 0) per row."""
    def fn(logits, bias, cfg, temp, topk, noise):
        B = logits.shape[0] // (2 if cfg != 1.0 else 1)
        stats = torch.zeros(B, 4, dtype=torch.int32, device=logits.device)
        out = ts._launch(logits, bias, cfg, temp, topk, noise, stats=stats, **kw)
        for n0, steps, n, path in stats.tolist():
            if path:
                key = f"{path},{int(steps > 0)}"
                paths[key] = paths.get(key, 0) + 1
        return out
    return fn


if __name__ == "__main__":  # the interpreter half of test_kernel_under_triton_interpreter
    t0, runs, paths = time.time(), {}, {}
    for name, fn, only_v, only_k in (
            ("select", launch_with_paths(paths), None, None),
            # capacity 8: bisection steps before the candidates fit (topk 5), or more than 8 kept (topk 50)
            ("select, capacity 8", launch_with_paths(paths, capacity=8), (300, 1000), (5, 50))):
        rows, bad, ties = compare("cpu", fn, vs=only_v, ks=only_k)
        runs[name] = {"rows": rows, "bad": bad, "ties": ties}
    print(json.dumps({"runs": runs, "paths": paths, "seconds": round(time.time() - t0, 1)}))
