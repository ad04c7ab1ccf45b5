"""Attention's wide-head GQA path (the depth decoder's 384-wide heads: k/v repeated per query head so SDPA's
memory-efficient kernel can take it) equals SDPA's own grouped attention, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from hmtiny.config import FLAVOURS, StackConfig
from hmtiny.model import Attention, apply_rope, rope_cache


def test_wide_heads_repeat_kv_equals_enable_gqa():
    torch.manual_seed(0)
    cfg = StackConfig(num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=4 * 264, intermediate_dim=8,
                      max_seq_len=16)
    attn = Attention(cfg).double()
    assert attn.head_dim == 264  # > 256: the repeated-k/v path
    x = torch.randn(3, 7, cfg.embed_dim, dtype=torch.float64, requires_grad=True)
    rope = rope_cache(cfg, 7).double()
    got = attn(x, rope)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)

    def grouped(module, x, rope):  # the same projections through enable_gqa
        b, s, _ = x.shape
        q = apply_rope(module.q_proj(x).view(b, s, 4, 264), rope).transpose(1, 2)
        k = apply_rope(module.k_proj(x).view(b, s, 2, 264), rope).transpose(1, 2)
        v = module.v_proj(x).view(b, s, 2, 264).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return module.output_proj(y.transpose(1, 2).reshape(b, s, -1))
    want = grouped(attn, x, rope)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoder_heads_run_on_the_memory_efficient_kernel_on_cuda():
    """The premise of the wide-head path: at the depth decoder's shapes (8 heads of 384, 4 kv heads, 8 positions,
    bf16) SDPA's memory-efficient kernel takes the repeated k/v, forward and backward (restricted to that backend,
    SDPA raises if it cannot), and gives SDPA's grouped attention (math backend, float32 inside) to bf16 noise:
    the two paths round differently in bf16 (on CPU the gradient differs by up to 0.9% of its largest element)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = FLAVOURS["llama-300M"]
    assert cfg.head_dim == 384 and cfg.num_kv_heads != cfg.num_heads
    torch.manual_seed(0)
    attn = Attention(cfg).to("cuda", torch.bfloat16)
    x = torch.randn(96, 8, cfg.embed_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rope = rope_cache(cfg, 8, "cuda")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        got = attn(x, rope)
        (g_got,) = torch.autograd.grad(got.float().square().sum(), x)
    with sdpa_kernel([SDPBackend.MATH]):
        b, s, _ = x.shape
        q = apply_rope(attn.q_proj(x).view(b, s, 8, 384), rope).transpose(1, 2)
        k = apply_rope(attn.k_proj(x).view(b, s, 4, 384), rope).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, 4, 384).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        want = attn.output_proj(y.transpose(1, 2).reshape(b, s, -1))
        (g_want,) = torch.autograd.grad(want.float().square().sum(), x)
    for a, b in ((got, want), (g_got, g_want)):  # largest difference relative to the largest value
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 5e-2  # CPU: <= 0.9%
