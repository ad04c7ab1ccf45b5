"""kernels/silu_mul.py: the fused SwiGLU product and its backward against the torch reference and its autograd.

On CPU the kernels run under Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is
imported), through the public `silu_mul` and autograd; on CUDA they also run for real and inside a CUDA graph.
Errors are max |out - ref| / max |ref| in units of eps = torch.finfo(dtype).eps, as in tests/test_add_rmsnorm.py.
"""
import json

import pytest
import torch

from kernels import silu_mul as sm
from kernels import switches
from kernels.timing import capture

# rows 1, 7, 130 and a 3-d input; widths not multiples of the 1024-element block (8192 is, at one row)
SHAPES = [(1, 8192), (7, 1000), (130, 96), (3, 5, 77)]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Bounds, in eps of the dtype. Every rounding of the reference is repeated, so bf16/fp16 results are bit-equal
# unless exp differs in its last float32 bit and moves a value across a rounding boundary: one ulp of an element
# (at most 1 eps) in a few elements (measured under the interpreter, numpy's exp against torch's: bf16 <= 1.5e-4 of
# the elements, fp16 <= 5e-4; fp16 has 3 more mantissa bits to flip).
# float32 results differ by an ulp or two wherever exp does (numpy's against torch's, ~1/3 of the elements).
BOUND = {"out": 1.0, "da": 1.0, "db": 1.0, "out_unequal": 1e-3, "da_unequal": 1e-3, "db_unequal": 1e-3}
BOUND_FP32 = {"out": 4.0, "da": 8.0, "db": 4.0, "out_unequal": 1.0, "da_unequal": 1.0, "db_unequal": 1.0}


def err(out, ref, dtype) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max()).item() / torch.finfo(dtype).eps


def make_inputs(shape, dtype, gen, device):
    """a of scale 3 (silu's curved part and both tails), with exp's overflow (+-100) and 0 in it; b, g ~ N(0, 1)."""
    a = torch.randn(shape, generator=gen) * 3
    a.view(-1)[:4] = torch.tensor([100.0, -100.0, 0.0, -20.0])[: a.numel()]
    b, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return [t.to(device, dtype) for t in (a, b, g)]


def forward_backward(fn, a, b, g):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = fn(a, b)
    return (out, *torch.autograd.grad(out, (a, b), g))


def kernel_errors(device, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        for dtype in DTYPES:
            a, b, g = make_inputs(shape, dtype, gen, device)
            assert sm.usable(a, b)
            got = forward_backward(sm.silu_mul, a, b, g)
            want = forward_backward(sm.silu_mul_ref, a, b, g)
            row = {"case": f"{list(shape)} {dtype}", "fp32": dtype == torch.float32,
                   "same_layout": all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(got, want))}
            for name, x, y in zip(("out", "da", "db"), got, want):
                row[name] = err(x, y, dtype)
                row[name + "_unequal"] = (x != y).float().mean().item()
            rows.append(row)
    return rows


def saved_by_the_kernel_path(device) -> bool:
    """The kernel path keeps exactly a and b for the backward (autograd's own also keeps silu(a))."""
    a, b, _ = make_inputs((3, 64), torch.bfloat16, torch.Generator().manual_seed(1), device)
    a.requires_grad_()
    b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sm.silu_mul(a, b)
    return len(saved) == 2 and saved[0] is a and saved[1] is b


def check(rows):
    assert all(r["same_layout"] for r in rows), [r["case"] for r in rows if not r["same_layout"]]
    for r in rows:
        bound = BOUND_FP32 if r["fp32"] else BOUND
        bad = {k: r[k] for k in bound if r[k] > bound[k]}
        assert not bad, (r["case"], bad)


@pytest.mark.skipif(sm.triton is None, reason="triton not installed")
def test_kernel_under_triton_interpreter(run_interpreted):
    out = run_interpreted(__file__)
    check(out["rows"])
    assert out["saves_a_and_b"]


def test_dispatch_falls_back_to_reference_on_cpu():
    a, b, g = make_inputs((4, 50), torch.bfloat16, torch.Generator().manual_seed(2), "cpu")
    with switches.overridden(TRITON_INTERPRET="0"):
        assert not sm.usable(a, b)
        got = forward_backward(sm.silu_mul, a, b, g)
    for x, y in zip(got, forward_backward(sm.silu_mul_ref, a, b, g)):
        assert torch.equal(x, y)
    with switches.overridden(TRITON_INTERPRET="1"):  # what the kernel path refuses, even where it could run
        assert sm.usable(a, b)
        assert not sm.usable(a, b.float()) and not sm.usable(a, b[:, :25]) and not sm.usable(a.t(), b.t())
        assert not sm.usable(a[:0], b[:0]) and not sm.usable(a.long(), b.long())


@pytest.mark.skipif(not torch.cuda.is_available() or sm.triton is None, reason="needs CUDA and triton")
def test_kernel_on_cuda():
    check(kernel_errors("cuda", SHAPES + [(2304, 8192), (576, 8192)]))  # and the training step's shapes
    assert saved_by_the_kernel_path("cuda")

    # inside a CUDA graph, forward and backward: replays see new inputs
    a, b, g = make_inputs((130, 8192), torch.bfloat16, torch.Generator().manual_seed(3), "cuda")
    a.requires_grad_()
    b.requires_grad_()

    def step():
        out = sm.silu_mul(a, b)
        return (out, *torch.autograd.grad(out, (a, b), g))

    graph, got = capture(step)  # the kernels compile before the capture
    with torch.no_grad():
        for t in (a, b, g):
            t.copy_(torch.randn_like(t) * 3)
    graph.replay()
    for name, x, y in zip(("out", "da", "db"), got, forward_backward(sm.silu_mul_ref, a.detach(), b.detach(), g)):
        assert err(x, y, torch.bfloat16) <= BOUND[name], name


if __name__ == "__main__":  # the interpreter half of test_kernel_under_triton_interpreter
    from test_add_rmsnorm import _round_bf16_like_the_gpu  # the GPU's round-to-nearest for float32 -> bf16

    _round_bf16_like_the_gpu()
    print(json.dumps({"rows": kernel_errors("cpu"), "saves_a_and_b": saved_by_the_kernel_path("cpu")}))
