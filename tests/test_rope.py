"""kernels/rope.py: the fused RoPE forward and backward against the torch reference and its autograd, and the
reference against hmtiny.model.apply_rope.

On CPU the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is
imported), through the public `rope_apply` and autograd; on CUDA it also runs for real and inside a CUDA graph.
Errors are max |out - ref| / max |ref| in units of eps = torch.finfo(dtype).eps, as in tests/test_add_rmsnorm.py.
"""
import json

import pytest
import torch

from hmtiny.config import FLAVOURS
from hmtiny.model import apply_rope, rope_cache
from kernels import rope as rp
from kernels import switches
from kernels.timing import capture

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Bounds, in eps of the dtype. The kernel repeats the reference's float32 operations (products rounded, then one
# add or subtract, one rounding to the dtype), so it is bit-equal where torch rounds each product. Under the
# interpreter (numpy, no FMA) it is, in every bf16/fp16 case and in float32 but for D = 6, where torch's CPU multiply
# takes its scalar loop (3 pairs a row) and differs in the last bit of ~15% of the elements (an FMA, presumably).
# On the GPU, should torch's complex multiply fuse a product into an FMA, a float32 result moves by an ulp: a
# bf16/fp16 element then rarely rounds the other way (one ulp, <= 1 eps).
BOUND = {"y": 1.0, "dx": 1.0, "y_unequal": 1e-3, "dx_unequal": 1e-3}
BOUND_FP32 = {"y": 2.0, "dx": 2.0, "y_unequal": 1.0, "dx_unequal": 1.0}
EXACT = {key: 0.0 for key in BOUND}


def cases():
    """(B, S, H, D, table, dtype, strided): H in 1, 3, 8; D 128, 64, 6 (masked lanes) and 384 (the depth decoder's,
    not a power of two); table [S, D/2, 2] "S" or [B, S, D/2, 2] "BS" (and broadcast "1", "1S"); strided: x is every
    other head of a wider tensor (a view, as q of a fused projection would be)."""
    i = 0
    for H in (1, 3, 8):
        for D in (128, 64, 6, 384):
            for table in ("S", "BS"):
                B, S = (1, 2)[i % 2], (1, 5, 17)[i % 3]
                for dtype in DTYPES if D == 64 else (torch.bfloat16, torch.float32):
                    yield B, S, H, D, table, dtype, i % 4 == 3
                i += 1
    yield 2, 5, 3, 64, "1", torch.bfloat16, False
    yield 2, 5, 3, 64, "1S", torch.bfloat16, True


def make_inputs(B, S, H, D, table, dtype, strided, gen, device):
    """x ~ N(0, 1), a table of real cos/sin values of random angles, and an output gradient w [B, H, S, D]."""
    x = torch.randn(B, S, 2 * H if strided else H, D, generator=gen).to(device, dtype)
    if strided:
        x = x[:, :, ::2]
    lead = {"S": (S,), "BS": (B, S), "1": (1,), "1S": (1, S)}[table]
    angles = torch.rand(*lead, D // 2, generator=gen) * 100
    rope = torch.stack([angles.cos(), angles.sin()], -1).to(device)
    w = torch.randn(B, H, S, D, generator=gen).to(device, dtype)
    return x, rope, w


def forward_backward(fn, x, rope, w):
    """y = fn(x, rope) and dx for the output gradient w.transpose(1, 2): the non-contiguous view SDPA's gradient
    arrives as in the model (q and k are transposed to [B, H, S, D] after RoPE)."""
    x = x.detach().requires_grad_()
    y = fn(x, rope)
    (dx,) = torch.autograd.grad(y.transpose(1, 2), x, w)
    return y, dx


def err(out, ref, dtype) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max()).item() / torch.finfo(dtype).eps


def kernel_errors(device, extra=()):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in [*cases(), *extra]:
        x, rope, w = make_inputs(*case, gen, device)
        assert rp.usable(x, rope), case
        got = forward_backward(rp.rope_apply, x, rope, w)
        want = forward_backward(rp.rope_ref, x, rope, w)
        dtype = case[5]
        row = {"case": f"x {list(x.shape)} {dtype} table {list(rope.shape)} strided {case[6]}",
               "fp32": dtype == torch.float32,
               "same_layout": all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(got, want))
               and got[0].is_contiguous()}
        for name, a, b in zip(("y", "dx"), got, want):
            row[name] = err(a, b, dtype)
            row[name + "_unequal"] = (a != b).float().mean().item()
        rows.append(row)
    return rows


def check(rows, exact=False):
    assert len(rows) >= 50
    assert all(r["same_layout"] for r in rows), [r["case"] for r in rows if not r["same_layout"]]
    for r in rows:
        bound = BOUND_FP32 if r["fp32"] else EXACT if exact else BOUND
        bad = {k: r[k] for k in bound if r[k] > bound[k]}
        assert not bad, (r["case"], bad)


@pytest.mark.skipif(rp.triton is None, reason="triton not installed")
def test_kernel_under_triton_interpreter(run_interpreted):
    check(run_interpreted(__file__), exact=True)


@pytest.mark.parametrize("dims", (3, 4))
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_model_rope(dims, dtype):
    """rope_ref is hmtiny.model.apply_rope, bit for bit and in its gradient, on the model's own tables."""
    cfg = FLAVOURS["llama-3B"]
    table = rope_cache(cfg, 40)[3:40:3]  # 13 positions
    if dims == 4:
        table = torch.stack([table, rope_cache(cfg, 13)])
    x = torch.randn(2, 13, 3, cfg.head_dim).to(dtype)
    w = torch.randn(2, 3, 13, cfg.head_dim).to(dtype)
    for a, b in zip(forward_backward(rp.rope_ref, x, table, w), forward_backward(apply_rope, x, table, w)):
        assert torch.equal(a, b)


def test_dispatch_falls_back_to_reference_on_cpu():
    x, rope, w = make_inputs(2, 5, 3, 64, "S", torch.bfloat16, False, torch.Generator().manual_seed(1), "cpu")
    with switches.overridden(TRITON_INTERPRET="0"):
        assert not rp.usable(x, rope)
        got = forward_backward(rp.rope_apply, x, rope, w)
    for a, b in zip(got, forward_backward(rp.rope_ref, x, rope, w)):
        assert torch.equal(a, b)
    with switches.overridden(TRITON_INTERPRET="1"):  # what the kernel path refuses, even where it could run
        assert rp.usable(x, rope)
        assert not rp.usable(x, rope.double()) and not rp.usable(x, rope[:4]) and not rp.usable(x[..., :6], rope)
        assert not rp.usable(x, rope.transpose(-1, -2).contiguous().transpose(-1, -2))  # (cos, sin) not adjacent
        assert not rp.usable(x, rope.clone().requires_grad_()) and not rp.usable(x[0], rope)
        assert not rp.usable(x, torch.stack([rope] * 3))  # 3 table rows for a batch of 2


@pytest.mark.skipif(not torch.cuda.is_available() or rp.triton is None, reason="needs CUDA and triton")
def test_kernel_on_cuda():
    bf16 = torch.bfloat16
    # and the training step's q and k: backbone (head_dim 128), depth decoder (head_dim 384, 8 positions)
    check(kernel_errors("cuda", [(4, 576, 24, 128, "S", bf16, False), (4, 576, 8, 128, "S", bf16, False),
                                 (1536, 8, 8, 384, "S", bf16, False), (1536, 8, 4, 384, "S", bf16, False)]))

    # inside a CUDA graph, forward and backward: replays see new inputs
    x, rope, w = make_inputs(2, 64, 8, 128, "S", bf16, False, torch.Generator().manual_seed(2), "cuda")
    x.requires_grad_()

    def step():
        y = rp.rope_apply(x, rope)
        return y, torch.autograd.grad(y.transpose(1, 2), x, w)[0]

    graph, got = capture(step)  # the kernels compile before the capture
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        w.copy_(torch.randn_like(w))
    graph.replay()
    for name, a, b in zip(("y", "dx"), got, forward_backward(rp.rope_ref, x, rope, w)):
        assert err(a, b, bf16) <= BOUND[name], name


if __name__ == "__main__":  # the interpreter half of test_kernel_under_triton_interpreter
    from test_add_rmsnorm import _round_bf16_like_the_gpu  # the GPU's round-to-nearest for float32 -> bf16

    _round_bf16_like_the_gpu()
    print(json.dumps(kernel_errors("cpu")))
