"""Attention's wide-head GQA path (the depth decoder's 384-wide heads: k/v repeated per query head so SDPA's
memory-efficient kernel can take it) equals SDPA's own grouped attention, values and gradients."""
import torch
import torch.nn.functional as F

from hmtiny.config import StackConfig
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
