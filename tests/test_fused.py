"""hmtiny/fused.py: the opt-in switch to the fused SwiGLU, RoPE and short-attention kernels leaves the model's loss,
its LoRA gradients and its state dict as they were. On CPU the switched modules run the reference ops (exact); under
Triton's interpreter (a subprocess) and on CUDA they run the kernels."""
import collections
import contextlib
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmtiny.data import load_dataset  # noqa: E402
from hmtiny.fused import FusedAttention, FusedMLP, use_fused_kernels  # noqa: E402
from hmtiny.model import MLP, Attention  # noqa: E402
from hmtiny.text import PromptTokenizer, find_text_assets  # noqa: E402
from tests.test_captured_step import TINY, reference, tiny_lora  # noqa: E402

KERNEL_ENTRIES = (("kernels.silu_mul", "silu_mul_forward"), ("kernels.silu_mul", "silu_mul_backward"),
                  ("kernels.rope", "rope_rotate"), ("kernels.rmsnorm", "_forward"), ("kernels.rmsnorm", "_backward"),
                  ("kernels.short_attention", "short_attention_forward"),
                  ("kernels.short_attention", "short_attention_backward"))


@contextlib.contextmanager
def kernel_calls():
    """Counts the launches of the fused kernels' entry points (module globals the autograd functions and custom
    ops look up at call time): a model test that passes on the torch fallback alone would count none."""
    import importlib
    counts = collections.Counter()
    saved = []
    for mod_name, name in KERNEL_ENTRIES:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, name)

        def counted(*args, _fn=fn, _key=f"{mod_name.split('.')[-1]}.{name}", **kw):
            counts[_key] += 1
            return _fn(*args, **kw)
        saved.append((mod, name, fn))
        setattr(mod, name, counted)
    try:
        yield counts
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


@functools.lru_cache
def batch(indices=(0, 3)):
    tok = PromptTokenizer.load(*find_text_assets(TINY))
    model, _ = tiny_lora()
    return load_dataset(TINY / "multidatabackend.json", tok, model.cfg, seed=0, log=lambda m: None).batch(
        list(indices))


def losses_and_grads(device="cpu", autocast=None, checkpointing=False):
    """(loss terms, LoRA grads) of the tiny LoRA model without and with the switch, the same batch and weights."""
    data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch().items()}
    out = []
    for fused in (False, True):
        model, params = tiny_lora(device=device, checkpointing=checkpointing)
        if fused:
            blocks = len(model.backbone.layers) + len(model.decoder.layers)
            assert use_fused_kernels(model, only=(MLP, Attention)) == 2 * blocks
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            out.append(reference(model, params, data))
    return out


def max_rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_switch_keeps_the_model_and_composes_with_lora():
    model, _ = tiny_lora()
    keys = list(model.state_dict())
    n = use_fused_kernels(model, only=(MLP, Attention))
    assert n == 10  # 3 backbone + 2 decoder blocks, an MLP and an attention each
    assert list(model.state_dict()) == keys
    mlp, attn = model.backbone.layers[0].mlp, model.decoder.layers[1].attn
    assert type(mlp) is FusedMLP and type(attn) is FusedAttention
    assert type(mlp.w1).__name__ == "LoRALinear" and type(attn.q_proj).__name__ == "LoRALinear"
    assert use_fused_kernels(model, only=(MLP, Attention)) == 0  # already switched
    assert use_fused_kernels(model, on=False, only=(MLP, Attention)) == n
    assert type(mlp) is MLP and type(attn) is Attention and list(model.state_dict()) == keys


@pytest.mark.parametrize("autocast,checkpointing", [(None, False), (torch.bfloat16, True)])
def test_same_loss_and_lora_grads_on_cpu(autocast, checkpointing):
    """Off CUDA the fused functions are the reference ops: bit-equal in float32. Under bf16 autocast the fused
    modules also run q/k/v and w1/w3 through one LoRAGroupUpdate each, whose GEMMs and dx sum round in another
    order than one LoRAUpdate per layer: equal up to bf16 rounding."""
    (want, want_grads), (got, got_grads) = losses_and_grads(autocast=autocast, checkpointing=checkpointing)
    if autocast is None:
        assert torch.equal(got, want)
        assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    else:
        assert max_rel(got, want) < 1e-3  # measured 0
        assert max(max_rel(g, w) for g, w in zip(got_grads, want_grads)) < 2e-2  # measured 7.4e-3


def interpreted():
    """Under TRITON_INTERPRET=1 the kernels run on the CPU tensors: max relative differences to the reference."""
    rows = {}
    for name, autocast in (("fp32", None), ("bf16", torch.bfloat16)):
        with kernel_calls() as calls:
            (want, want_grads), (got, got_grads) = losses_and_grads(autocast=autocast,
                                                                    checkpointing=autocast is not None)
        rows[name] = {"loss": max_rel(got, want), "grads": max(max_rel(g, w) for g, w in zip(got_grads, want_grads)),
                      "calls": dict(calls)}
    return rows


ELEMENTWISE = ("silu_mul.silu_mul_forward", "silu_mul.silu_mul_backward", "rope.rope_rotate")
# the depth decoder's attention (9 rows); the backbone's longer sequences keep SDPA
ATTENTION = ("short_attention.short_attention_forward", "short_attention.short_attention_backward")


@pytest.mark.skipif(pytest.importorskip("kernels.rope").triton is None, reason="triton not installed")
def test_same_loss_and_lora_grads_with_the_kernels(run_interpreted):
    """float32: the kernels differ from torch only where exp does (an ulp) and, in the decoder's attention, in the
    order of float32 sums (a few ulps): measured loss 5e-8, grads 5e-7. bf16 autocast: a rare one-ulp bf16
    difference of an activation, which the loss and gradients carry at bf16's precision (measured 0 before the
    attention kernel, which moves a few of its bf16 outputs and gradients by an ulp: loss 2.4e-5, grads 8.5e-3)."""
    rows = run_interpreted(__file__)
    for row in rows.values():  # the kernels ran (forward and backward), not the torch fallback
        assert all(row["calls"].get(key, 0) > 0 for key in ELEMENTWISE + ATTENTION), row["calls"]
    assert rows["fp32"]["loss"] < 1e-6 and rows["fp32"]["grads"] < 1e-5, rows
    assert rows["bf16"]["loss"] < 1e-2 and rows["bf16"]["grads"] < 5e-2, rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_loss_and_lora_grads_on_cuda():
    """bf16 autocast on CUDA: the kernels against the reference ops in the whole model, and the switched model's
    captured step (CUDA graphs replaying the kernels) against its eager step."""
    with kernel_calls() as calls:
        (want, want_grads), (got, got_grads) = losses_and_grads("cuda", torch.bfloat16, checkpointing=True)
    assert all(calls[key] > 0 for key in ELEMENTWISE + ATTENTION), calls  # the kernel path, not the fallback
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=1e-4)

    from hmtiny.captured_step import CapturedStep
    model, params = tiny_lora(device="cuda", checkpointing=True)
    CapturedStep(model, params, torch.bfloat16, bucket=16, capture=True, fused=False)  # the A/B switch
    assert not any(type(m) in (FusedAttention, FusedMLP) for m in model.modules())
    eager = CapturedStep(model, params, torch.bfloat16, bucket=16, capture=False)
    graphed = CapturedStep(model, params, torch.bfloat16, bucket=16, capture=True, log=lambda m: None)
    assert sum(type(m) in (FusedAttention, FusedMLP) for m in model.modules()) == 10  # capturing switches them
    for p in params:  # allocated once, zeroed in place, as the trainer does: a replayed graph adds into these
        p.grad = torch.zeros_like(p)
    for idx in ((0,), (1, 2), (0,)):
        data = batch(idx)
        for p in params:
            p.grad.zero_()
        want = eager(data).clone()
        want_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad.zero_()
        with kernel_calls() as calls:
            got = graphed(data).clone()
        if idx == (1, 2):  # a new shape: warm-up and capture ran every fused kernel (the norms' too)
            assert all(calls[key] > 0 for key in ELEMENTWISE + ATTENTION + ("rmsnorm._forward", "rmsnorm._backward")), \
                calls
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        for g, w in zip([p.grad for p in params], want_grads):
            torch.testing.assert_close(g, w, rtol=5e-2, atol=1e-4)


if __name__ == "__main__":  # the interpreter half of test_same_loss_and_lora_grads_with_the_kernels
    from tests.test_add_rmsnorm import _round_bf16_like_the_gpu

    _round_bf16_like_the_gpu()
    print(json.dumps(interpreted()))
