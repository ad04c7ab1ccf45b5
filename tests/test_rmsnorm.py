"""kernels/rmsnorm.py: the training RMSNorm's forward and backward kernels against autograd of the torch reference,
and hmtiny.fused's switch of the norms on a tiny model.

On CPU the kernels run under Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is
imported; `rms_norm` takes the kernel path there), through the autograd function; on CUDA they also run for real,
in a CUDA graph and under torch.compile.

Errors are max |out - ref| / max |ref| in units of eps = torch.finfo(dtype).eps of x's dtype (2^-7 for bf16), the
spacing of that dtype at 1: one ulp of the largest element is at most 1 eps (dscale: eps of the coarser of x's and
the scale's dtypes, since it sums products with the rounded n).
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmtiny.fused import FusedRMSNorm, use_fused_kernels  # noqa: E402
from hmtiny.model import RMSNorm  # noqa: E402
from kernels import rmsnorm as rn  # noqa: E402
from kernels.timing import capture  # noqa: E402

EPS = 1e-5
# rows 1, 7 and 130 (as [2, 65]); D the model's widths and two that are not powers of two (masked lanes)
LEADS = ((1,), (7,), (2, 65))
WIDTHS = (3072, 1024, 1000, 37)
DTYPES = ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
          (torch.float32, torch.float32))  # (x, scale)
LAYOUTS = ("contiguous", "row-strided", "permuted")  # permuted: leading dims that do not merge (a copy)
GRADS = ("x", "x+scale", "scale")  # which inputs require grad: LoRA, full fine-tuning, a frozen input

# Bounds, in eps of x's dtype. The kernels repeat the reference's roundings; what differs is float32 reduction
# order and the rsqrt's last bits, which may move an element of n (forward) or dx (backward) across a rounding
# boundary of bf16/fp16: one ulp, and y = n * scale may round once more: 2 eps. Such flips are rare (under the
# interpreter, whose float32 arithmetic is numpy's: <= 0.01% of y, 0.04% of dx, <= 0.25 eps). A kernel that skipped
# one of the reference's roundings stays within the eps bounds but leaves many elements unequal (tried: without
# n's rounding >= 4% of y, without dn's >= 20% of dx), hence the `unequal` bounds. Against float64 (no roundings)
# the bf16/fp16 results carry their own: measured <= 0.8 eps. float32 x rounds nowhere coarser, so there every
# difference is float32 noise (measured <= 1.6 eps; dx may cancel in dn - n * mean(dn * n), hence more room).
BOUND = {"y": 2.0, "y_unequal": 0.01, "y64": 3.0, "dx": 1.0, "dx_unequal": 0.02, "dx64": 3.0,
         "dscale": 1.0, "dscale64": 2.0, "rstd64": 4.0}
BOUND_FP32 = dict(BOUND, y=8.0, y_unequal=1.0, y64=8.0, dx=16.0, dx_unequal=1.0, dx64=16.0, dscale=16.0,
                  dscale64=16.0)


def cases():
    """Every width, row count and dtype pair; layouts and grads rotate so that each (layout, grads) pair and each
    (dtype pair, grads) pair occurs (permuted needs two leading dims)."""
    i = 0
    for k, D in enumerate(WIDTHS):
        for lead in LEADS:
            for x_dtype, s_dtype in DTYPES:
                layout = LAYOUTS[(i + k) % 3] if len(lead) == 2 else LAYOUTS[i % 2]
                yield lead, D, x_dtype, s_dtype, layout, GRADS[i % 3]
                i += 1


def make_inputs(lead, D, x_dtype, s_dtype, layout, gen, device):
    """x of scale ~2 in the given layout, a scale near 1, dy of scale ~1 in y's dtype. The layout is made after the
    move to device and dtype: .to() would make a strided slice contiguous."""
    if layout == "contiguous":
        x = (torch.randn(*lead, D, generator=gen) * 2).to(device, x_dtype)
    elif layout == "row-strided":  # a slice of wider rows: read with a row stride, not copied
        x = (torch.randn(*lead, D + 3, generator=gen) * 2).to(device, x_dtype)[..., :D]
    else:
        x = (torch.randn(*reversed(lead), D, generator=gen) * 2).to(device, x_dtype).transpose(0, 1)
    scale = (1 + 0.5 * torch.randn(D, generator=gen)).to(device, s_dtype)
    dy = torch.randn(*lead, D, generator=gen).to(device, torch.promote_types(x_dtype, s_dtype))
    return x, scale, dy


def float64_ref(x, scale, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale.double()


def forward_backward(fn, x, scale, dy, grads):
    """fn(x, scale) and the gradients autograd gives for the inputs that require grad (None for the others)."""
    x = x.detach().requires_grad_("x" in grads)
    scale = scale.detach().requires_grad_("scale" in grads)
    y = fn(x, scale)
    wrt = [t for t in (x, scale) if t.requires_grad]
    got = iter(torch.autograd.grad(y, wrt, dy))
    return y.detach(), *(next(got) if t.requires_grad else None for t in (x, scale))


def err(out, ref, dtype) -> float:
    """max |out - ref| / max |ref|, in eps of dtype."""
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max()).item() / torch.finfo(dtype).eps


def kernel_errors(device):
    """Errors of `rms_norm` (the kernel path) against the reference and float64, for every case."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for lead, D, x_dtype, s_dtype, layout, grads in cases():
        x, scale, dy = make_inputs(lead, D, x_dtype, s_dtype, layout, gen, device)
        assert rn.usable(x, scale)
        y, dx, dscale = forward_backward(lambda a, b: rn.rms_norm(a, b, EPS), x, scale, dy, grads)
        y_ref, dx_ref, dscale_ref = forward_backward(lambda a, b: rn.rmsnorm_ref(a, b, EPS), x, scale, dy, grads)
        y64, dx64, dscale64 = forward_backward(lambda a, b: float64_ref(a, b, EPS), x.double(), scale.double(),
                                               dy.double(), grads)
        x2 = x.reshape(-1, D)[:7].contiguous()  # a few rows: each costs ~5 ms under the interpreter
        rstd64 = torch.rsqrt(x2.double().pow(2).mean(-1) + EPS)
        kept = {"contiguous": x.is_contiguous(), "row-strided": x.stride(-2) == D + 3, "permuted": x.stride(0) == D}
        r = {"case": f"x{list(x.shape)} {layout} {x_dtype} scale {s_dtype} grads {grads}", "layout": kept[layout],
             "fp32": x_dtype == torch.float32, "n": x.numel(),
             "same_layout": y.shape == y_ref.shape and y.dtype == y_ref.dtype,
             "y": err(y, y_ref, x_dtype), "y_unequal": (y != y_ref).float().mean().item(),
             "y64": err(y, y64, x_dtype),
             "rstd64": err(rn._forward(x2, scale, EPS)[1], rstd64, torch.float32)}
        if dx is not None:
            r["same_layout"] &= dx.shape == x.shape and dx.dtype == x.dtype
            r.update(dx=err(dx, dx_ref, x_dtype), dx_unequal=(dx != dx_ref).float().mean().item(),
                     dx64=err(dx, dx64, x_dtype))
        if dscale is not None:
            r["same_layout"] &= dscale.shape == scale.shape and dscale.dtype == scale.dtype
            coarse = max(x_dtype, s_dtype, key=lambda t: torch.finfo(t).eps)
            r.update(dscale=err(dscale, dscale_ref, coarse), dscale64=err(dscale, dscale64, coarse))
        out.append(r)
    return out


def check(errs):
    assert len(errs) == len(list(cases()))
    for key in ("layout", "same_layout"):  # inputs as the case says; outputs of the reference's shape and dtype
        assert all(e[key] for e in errs), (key, [e["case"] for e in errs if not e[key]])
    for key in BOUND:  # a share of unequal elements means little in a few dozen: one of 37 is 2.7%
        bad = [e for e in errs if e.get(key, 0.0) > (BOUND_FP32 if e["fp32"] else BOUND)[key]
               and not (key.endswith("_unequal") and e["n"] < 256)]
        assert not bad, (key, bad[:3])
    assert sum("dx" in e for e in errs) > 20 and sum("dscale" in e for e in errs) > 20


# ----------------------------------------------------------------------------- the tiny model with the switch
_DATASET = {}


def tiny_dataset(cfg):
    """The tiny dataset, loaded once per process (the model's config is the same for every tiny model)."""
    if not _DATASET:
        from test_captured_step import TINY

        from hmtiny.data import load_dataset
        from hmtiny.text import PromptTokenizer, find_text_assets

        tok = PromptTokenizer.load(*find_text_assets(TINY))
        _DATASET["tiny"] = load_dataset(TINY / "multidatabackend.json", tok, cfg, seed=0, log=lambda m: None)
    return _DATASET["tiny"]


def tiny_model_loss_and_grads(fused, device="cpu", checkpointing=False, clips=(0, 3), decoder_fraction=1.0):
    """Loss and LoRA gradients of the tiny model on some clips, with or without the fused norms."""
    from test_captured_step import reference, tiny_lora

    model, params = tiny_lora(device=device, checkpointing=checkpointing)
    keys = list(model.state_dict())
    switched = use_fused_kernels(model, only=(RMSNorm,)) if fused else 0
    assert list(model.state_dict()) == keys
    batch = tiny_dataset(model.cfg).batch(list(clips))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    torch.manual_seed(1)  # decoder_fraction's subset comes from the global generator
    losses, grads = reference(model, params, batch, decoder_fraction=decoder_fraction)
    return model, switched, losses, grads


class launches:
    """Counts calls of the kernels' launchers (rn._forward, rn._backward) inside the block: a model test that passed
    on the torch fallback alone would count none."""

    def __enter__(self):
        self.counts = {"_forward": 0, "_backward": 0}
        self.saved = {name: getattr(rn, name) for name in self.counts}
        for name, fn in self.saved.items():
            def counted(*args, _fn=fn, _name=name):
                self.counts[_name] += 1
                return _fn(*args)
            setattr(rn, name, counted)
        return self.counts

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(rn, name, fn)


def model_differences():
    """Largest relative differences in loss and LoRA gradients, fused vs plain, with gradient checkpointing (a
    block's forward runs twice). Under the interpreter each row costs ~5 ms: one clip, a quarter of its frames."""
    kw = dict(checkpointing=True, clips=(4,), decoder_fraction=0.25)
    with launches() as counts:
        _, switched, loss, grads = tiny_model_loss_and_grads(True, **kw)
    _, _, loss_ref, grads_ref = tiny_model_loss_and_grads(False, **kw)
    return {"switched": switched, "loss": ((loss - loss_ref).abs() / loss_ref.abs()).max().item(),
            "grads": max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(grads, grads_ref)),
            "launches": counts}


# ----------------------------------------------------------------------------- tests
@pytest.mark.skipif(rn.triton is None, reason="triton not installed")
def test_kernels_under_triton_interpreter(run_interpreted):
    check(run_interpreted(__file__, RMSNORM_PART="kernels"))


@pytest.mark.skipif(rn.triton is None, reason="triton not installed")
def test_tiny_model_with_kernels_under_triton_interpreter(run_interpreted):
    """Every norm of the tiny model (float32) through the kernels: the loss and LoRA gradients of model.loss."""
    diffs = run_interpreted(__file__, RMSNORM_PART="model")
    assert diffs["switched"] == 12  # two per block and each stack's final norm
    # the kernel path: every norm forward, a backward for all but the first (its input, the frozen embeddings,
    # needs no gradient)
    assert diffs["launches"]["_forward"] >= 12 and diffs["launches"]["_backward"] >= 11, diffs
    assert diffs["loss"] < 1e-5 and diffs["grads"] < 1e-4, diffs


@pytest.mark.parametrize("x_dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("s_dtype", (torch.bfloat16, torch.float32))
def test_reference_is_the_model_rmsnorm(x_dtype, s_dtype):
    """Bit-equal to hmtiny.model.RMSNorm, values and gradients."""
    norm = RMSNorm(384)
    with torch.no_grad():
        norm.scale.copy_(1 + 0.5 * torch.randn(384))
    norm = norm.to(s_dtype)
    x = (torch.randn(3, 5, 384) * 2).to(x_dtype).requires_grad_()
    dy = torch.randn(3, 5, 384).to(torch.promote_types(x_dtype, s_dtype))
    y = norm(x)
    want = torch.autograd.grad(y, (x, norm.scale), dy)
    y_ref = rn.rmsnorm_ref(x, norm.scale, norm.eps)
    assert torch.equal(y, y_ref)
    for g, w in zip(torch.autograd.grad(y_ref, (x, norm.scale), dy), want):
        assert torch.equal(g, w)


def test_dispatch_falls_back_to_reference_on_cpu():
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("TRITON_INTERPRET is set: rms_norm takes the kernel path on CPU")
    x = torch.randn(7, 384).bfloat16().requires_grad_()
    scale = torch.randn(384).bfloat16().requires_grad_()
    dy = torch.randn(7, 384).bfloat16()
    assert not rn.usable(x, scale)
    for a, b in zip(forward_backward(lambda a, b: rn.rms_norm(a, b, EPS), x, scale, dy, "x+scale"),
                    forward_backward(lambda a, b: rn.rmsnorm_ref(a, b, EPS), x, scale, dy, "x+scale")):
        assert torch.equal(a, b)


def test_rows_reads_row_strided_x_in_place():
    """A slice of wider rows (any leading dims that merge) is read where it is; other layouts, and any with a
    column stride other than 1, are copied."""
    base = torch.randn(2, 65, 40)
    for x, in_place in ((base[..., :37], True), (base.transpose(0, 1)[..., :37], False), (base, True),
                        (base[..., ::2], False), (torch.ones(37).expand(5, 37), True),
                        (torch.ones(()).expand(5, 37), False)):  # a row repeated (stride 0) reads fine
        rows = rn._rows(x)
        assert rows.shape == (x.numel() // x.shape[-1], x.shape[-1]) and rows.stride(-1) == 1
        assert torch.equal(rows, x.reshape(rows.shape)) and (rows.data_ptr() == x.data_ptr()) == in_place


def test_fused_norms_keep_loss_gradients_and_state_dict():
    """On CPU the fused function is the reference: the switched tiny model gives the same loss and LoRA gradients,
    bit for bit, and the same state dict; switching back restores the class."""
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("TRITON_INTERPRET is set: rms_norm takes the kernel path on CPU")
    model, switched, loss, grads = tiny_model_loss_and_grads(True)
    _, _, loss_ref, grads_ref = tiny_model_loss_and_grads(False)
    assert switched == 12 and sum(type(m) is FusedRMSNorm for m in model.modules()) == 12
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(g, w) for g, w in zip(grads, grads_ref))
    assert use_fused_kernels(model, on=False, only=(RMSNorm,)) == 12
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())


CUDA = pytest.mark.skipif(not torch.cuda.is_available() or rn.triton is None, reason="needs CUDA and triton")


@CUDA
def test_kernels_on_cuda():
    check(kernel_errors("cuda"))
    x = (torch.randn(2, 5, 3072, device="cuda") * 2).bfloat16()
    scale = (1 + 0.5 * torch.randn(3072, device="cuda")).bfloat16()
    dy = torch.randn_like(x)
    y, rstd = rn.rmsnorm_fwd_op(x.view(-1, 3072), scale, EPS)
    torch.library.opcheck(rn.rmsnorm_fwd_op.op, (x.view(-1, 3072), scale, EPS))
    for need_dx, need_n in ((True, False), (False, True), (True, True)):
        torch.library.opcheck(rn.rmsnorm_bwd_op.op, (dy.view(-1, 3072), x.view(-1, 3072), scale, rstd, need_dx, need_n))


@CUDA
def test_forward_and_backward_in_a_cuda_graph():
    """The forward and backward captured together; replays see new inputs (no host syncs in either)."""
    x = (torch.randn(4, 576, 3072, device="cuda") * 2).bfloat16().requires_grad_()
    scale = (1 + 0.5 * torch.randn(3072, device="cuda")).bfloat16().requires_grad_()
    dy = torch.randn_like(x)

    def step():
        y = rn.rms_norm(x, scale, EPS)
        return (y, *torch.autograd.grad(y, (x, scale), dy))

    graph, out = capture(step)  # the kernels compile before the capture
    with torch.no_grad():
        x.copy_(torch.randn_like(x) * 3)
        dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()
    want = forward_backward(lambda a, b: rn.rms_norm(a, b, EPS), x, scale, dy, "x+scale")
    for g, w in zip(out, want):
        assert torch.equal(g, w)  # the same kernels on the same inputs
    ref = forward_backward(lambda a, b: rn.rmsnorm_ref(a, b, EPS), x, scale, dy, "x+scale")
    assert err(out[0], ref[0], x.dtype) <= BOUND["y"] and err(out[1], ref[1], x.dtype) <= BOUND["dx"]
    assert err(out[2], ref[2], scale.dtype) <= BOUND["dscale"]


@CUDA
def test_under_torch_compile():
    """Compiled, the norm is the same two opaque kernels: y and dx bit-equal to the eager kernel path; dscale (a
    torch sum inductor may reorder) within float32 noise."""
    x = (torch.randn(2, 65, 1024, device="cuda") * 2).bfloat16()
    scale = (1 + 0.5 * torch.randn(1024, device="cuda")).bfloat16()
    dy = torch.randn_like(x)
    compiled = torch.compile(lambda a, b: rn.rms_norm(a, b, EPS) * 2, fullgraph=True)
    got = forward_backward(compiled, x, scale, dy, "x+scale")
    want = forward_backward(lambda a, b: rn.rms_norm(a, b, EPS) * 2, x, scale, dy, "x+scale")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert err(got[2], want[2], scale.dtype) <= 1.0


@CUDA
def test_tiny_model_with_kernels_on_cuda():
    for checkpointing in (False, True):
        with launches() as counts:
            _, switched, loss, grads = tiny_model_loss_and_grads(True, "cuda", checkpointing)
        _, _, loss_ref, grads_ref = tiny_model_loss_and_grads(False, "cuda", checkpointing)
        assert switched == 12 and counts["_forward"] >= 12 and counts["_backward"] >= 11, counts
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        for g, w in zip(grads, grads_ref):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@CUDA
def test_captured_step_with_fused_norms_on_cuda():
    """The training step's CUDA graphs (hmtiny/captured_step.py, bf16 autocast, checkpointing) with every norm
    fused: each replay equals the uncaptured step on the same inputs, across two shapes and a shape revisited."""
    from test_captured_step import tiny_lora

    from hmtiny.captured_step import CapturedStep

    model, params = tiny_lora(device="cuda", checkpointing=True)
    assert use_fused_kernels(model, only=(RMSNorm,)) == 12
    eager = CapturedStep(model, params, torch.bfloat16, bucket=16, capture=False)
    graphed = CapturedStep(model, params, torch.bfloat16, bucket=16, capture=True, log=lambda m: None)
    for p in params:
        p.grad = torch.zeros_like(p)
    for idx in ([0], [1, 2], [0]):
        batch = tiny_dataset(model.cfg).batch(idx)
        want = eager(batch, scale=0.5).clone()
        want_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad.zero_()
        with launches() as counts:
            got = graphed(batch, scale=0.5).clone()
        if idx == [1, 2]:  # a new shape: its warm-up and capture launched the kernels (a replay runs no Python)
            assert counts["_forward"] >= 12 and counts["_backward"] >= 11, counts
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip([p.grad for p in params], want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        for p in params:
            p.grad.zero_()


if __name__ == "__main__":  # the interpreter half of the *_under_triton_interpreter tests
    from test_add_rmsnorm import _round_bf16_like_the_gpu

    _round_bf16_like_the_gpu()  # the interpreter truncates float32 -> bf16; the GPU rounds to nearest even
    part = os.environ.get("RMSNORM_PART", "kernels")
    print(json.dumps(kernel_errors("cpu") if part == "kernels" else model_differences()))
