"""HeartMuLa: a Llama-3.2 backbone over summed token-column embeddings, plus a small depth decoder.

Read top to bottom: RMSNorm -> RoPE -> Attention (GQA, static KV cache) -> MLP -> Block -> Transformer
-> HeartMuLa (embeddings, heads, training loss, inference-step helpers).

Parameter names equal the official checkpoint's keys (torchtune style), so a state dict loads unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, StackConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the activation dtype, as the official model does (torch.rms_norm: one
        # fused kernel on CUDA for x * rsqrt(mean(x^2) + eps)), then round to x's dtype before the scale
        normed = torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.scale


def llama3_rope_frequencies(cfg: StackConfig) -> torch.Tensor:
    """float32 RoPE frequencies theta_i = base^(-2i/d) with Llama-3 long-context scaling.

    Evaluated element-wise in float32 exactly as torchtune 0.4's Llama3ScaledRoPE does, so the values are
    bit-identical to the official model's.
    """
    d = cfg.head_dim
    theta = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, device="cpu")[: d // 2].float() / d))
    low_wavelen = cfg.old_context_len / cfg.low_freq_factor
    high_wavelen = cfg.old_context_len / cfg.high_freq_factor
    out = []
    for freq in theta:  # a 0-d float32 tensor: the arithmetic stays float32 like the reference
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / cfg.scale_factor)
        else:
            smooth = ((cfg.old_context_len / wavelen - cfg.low_freq_factor)
                      / (cfg.high_freq_factor - cfg.low_freq_factor))
            out.append((1 - smooth) * freq / cfg.scale_factor + smooth * freq)
    return torch.stack(out).float()


def rope_cache(cfg: StackConfig, length: int, device=None) -> torch.Tensor:
    """[length, head_dim/2, 2] table of (cos, sin) for positions 0..length-1, float32."""
    theta = llama3_rope_frequencies(cfg)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), theta)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return table if device is None else table.to(device)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate INTERLEAVED pairs (x[2i], x[2i+1]) of every head. x: [B, S, H, D]; rope: [S, D/2, 2] or [B, S, D/2, 2].
    A pair is a complex number x[2i] + i x[2i+1] times cos + i sin: (x0 cos - x1 sin, x1 cos + x0 sin)."""
    xs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    if rope.dim() == 3:
        rope = rope[None]
    turn = torch.view_as_complex(rope.contiguous())[:, :, None]  # [B or 1, S, 1, D/2]
    return torch.view_as_real(xs * turn).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Static, preallocated keys/values [B, kv_heads, L, head_dim]; written in place at given positions."""

    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # index_copy_ with a position tensor keeps the step free of host syncs (CUDA-graph friendly)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    rotate = staticmethod(apply_rope)  # hmtiny.fused swaps in a fused kernel of the same maths

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dim = cfg.embed_dim
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv * self.head_dim, bias=False)
        self.output_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.kv_cache: KVCache | None = None

    def project(self, x):
        """The q, k, v projections of x (hmtiny.fused runs LoRA-adapted ones in one node)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    @staticmethod
    def attend(q, k, v):
        """Causal attention of q [B,H,S,D] over k, v [B,Hkv,S,D] (no cache); hmtiny.fused swaps in a short-sequence
        kernel of the same maths."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

    def forward(self, x, rope, pos=None, mask=None):
        """x [B,S,D]. Without a cache: causal attention over the S rows. With a cache: write the new keys at `pos`
        [S] and attend over the whole cache under `mask` [S, L] (True = may attend)."""
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q = self.rotate(q.view(b, s, self.n_heads, self.head_dim), rope).transpose(1, 2)
        k = self.rotate(k.view(b, s, self.n_kv, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None and pos is not None:
            k, v = self.kv_cache.update(pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        else:
            y = self.attend(q, k, v)
        return self.output_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.mlp = MLP(cfg.embed_dim, cfg.intermediate_dim)

    def forward(self, x, rope, pos=None, mask=None):
        h = x + self.attn(self.sa_norm(x), rope, pos, mask)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """A Llama-3.2 stack without token embedding or output layer (HeartMuLa feeds and reads vectors)."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.gradient_checkpointing = False
        self.init_buffers()

    def init_buffers(self, device=None):
        """Computed (non-persistent) buffers; called again after building on the meta device."""
        self.register_buffer("rope", rope_cache(self.cfg, self.cfg.max_seq_len, device), persistent=False)
        self.register_buffer("causal_mask", torch.zeros(0, 0, dtype=torch.bool, device=device), persistent=False)

    def setup_cache(self, batch: int, length: int, dtype, device):
        """Allocate a static KV cache of `length` positions (sized to the request, not max_seq_len)."""
        if length > self.rope.shape[0]:
            self.rope = rope_cache(self.cfg, length, device)
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, self.cfg.num_kv_heads, length, self.cfg.head_dim, dtype, device)
        self.causal_mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()

    def drop_cache(self):
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.causal_mask = torch.zeros(0, 0, dtype=torch.bool, device=self.causal_mask.device)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,S,D]. pos None: training (causal over rows 0..S-1). pos [S]: cached step at those positions."""
        if pos is None:
            rope, mask = self.rope[: x.shape[1]], None
        else:
            rope, mask = self.rope[pos], self.causal_mask[pos]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # a block draws no random numbers (LoRA dropout is seeded, hmtiny/lora.py), so recomputing it
                # needs no saved RNG state, and the step stays capturable in a CUDA graph
                x = checkpoint(layer, x, rope, pos, mask, use_reentrant=False, preserve_rng_state=False)
            else:
                x = layer(x, rope, pos, mask)
        return self.norm(x)


class HeartMuLa(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim, V, K = cfg.dim, cfg.audio_vocab_size, cfg.audio_num_codebooks
        self.backbone = Transformer(cfg.backbone)
        self.decoder = Transformer(cfg.decoder)
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, dim)
        self.audio_embeddings = nn.Embedding(V * K, dim)  # codebook k, id t -> row t + k*V
        self.unconditional_text_embedding = nn.Embedding(1, dim)
        self.projection = nn.Linear(dim, cfg.decoder.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(dim, V, bias=False)
        self.audio_head = nn.Parameter(torch.empty(K - 1, cfg.decoder.embed_dim, V))
        self.muq_linear = nn.Linear(cfg.muq_dim, dim)
        nn.init.normal_(self.audio_head, std=cfg.decoder.embed_dim ** -0.5)
        self.init_buffers()

    def init_buffers(self, device=None):
        K, V = self.cfg.audio_num_codebooks, self.cfg.audio_vocab_size
        self.register_buffer("audio_offsets", torch.arange(K, device=device) * V, persistent=False)
        self.backbone.init_buffers(device)
        self.decoder.init_buffers(device)

    # ---------------------------------------------------------------- embeddings
    def embed_audio(self, codebook: int, ids: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(ids + codebook * self.cfg.audio_vocab_size)

    def embed_rows(self, tokens: torch.Tensor, tokens_mask: torch.Tensor,
                   muq_idx: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                   muq_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone input [B,S,D]: sum of the live columns' embeddings per row.

        muq_idx [B]: the MuQ row of each sample, overwritten by muq_linear(muq_embed), as the official generation
        does; muq_embed [B, muq_dim] is a reference song's MuQ-MuLan embedding, None = zeros (muq_linear's bias,
        what the official release uses). uncond [B] bool: these samples use the unconditional text embedding for
        every text column and the MuQ row (classifier-free guidance, caption dropout).
        """
        text = self.text_embeddings(tokens[..., -1])
        if uncond is not None:
            text = torch.where(uncond[:, None, None], self.unconditional_text_embedding.weight, text)
        audio = self.audio_embeddings(tokens[..., :-1] + self.audio_offsets)
        cols = torch.cat([audio, text.unsqueeze(-2)], dim=-2) * tokens_mask.unsqueeze(-1).to(text.dtype)
        h = cols.sum(dim=-2)
        if muq_idx is not None:
            if muq_embed is None:
                muq = self.muq_linear.bias.to(h.dtype).expand(h.shape[0], -1)  # muq_linear(zeros)
            else:
                muq = self.muq_linear(muq_embed.to(self.muq_linear.weight.dtype)).to(h.dtype)
            if uncond is not None:
                muq = torch.where(uncond[:, None], self.unconditional_text_embedding.weight.to(h.dtype), muq)
            h = h.clone()
            h[torch.arange(h.shape[0], device=h.device), muq_idx] = muq
        return h

    # ---------------------------------------------------------------- training
    def depth_states(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth decoder. h [N,D] backbone states, codes [N,K] the next frame -> the decoder's output
        states [N,K-1,D_dec] at positions 1..K-1 (each predicts its codebook through audio_head)."""
        K = self.cfg.audio_num_codebooks
        emb = self.audio_embeddings(codes[:, : K - 1] + self.audio_offsets[: K - 1])  # [N,K-1,D]
        seq = torch.cat([h.unsqueeze(1).to(emb.dtype), emb], dim=1)
        return self.decoder(self.projection(seq))[:, 1:]

    def depth_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth decoder logits [N,K-1,V] for backbone states h [N,D] and the next frame codes [N,K]."""
        out = self.depth_states(h, codes)
        return torch.einsum("nkd,kdv->nkv", out, self.audio_head.to(out.dtype))

    def forward(self, tokens, tokens_mask, muq_idx=None):
        """Full logits (for tests and analysis): backbone hidden [B,S,D], codebook-0 logits [B,S-1,V],
        decoder logits [B,S-1,K-1,V] for every position (teacher forcing on the next row)."""
        h = self.backbone(self.embed_rows(tokens, tokens_mask, muq_idx))
        c0 = self.codebook0_head(h[:, :-1])
        B, S, D = h.shape
        dec = self.depth_logits(h[:, :-1].reshape(-1, D), tokens[:, 1:, :-1].reshape(-1, tokens.shape[-1] - 1))
        return h, c0, dec.view(B, S - 1, *dec.shape[1:])

    def loss(self, tokens, tokens_mask, audio_frame_mask, muq_idx=None, decoder_fraction: float = 1.0,
             generator: torch.Generator | None = None, input_tokens: torch.Tensor | None = None,
             uncond: torch.Tensor | None = None, muq_embed: torch.Tensor | None = None):
        """Training loss (docs/model.md): CE of codebook 0 over every row t whose row t+1 is an audio frame, plus the
        mean CE of codebooks 1..K-1 from the teacher-forced depth decoder. The depth decoder runs only on those
        target rows (and, with decoder_fraction < 1, on a random subset of them: CSM's compute amortisation).
        The targets are always `tokens`; the backbone reads `input_tokens` when given (scheduled sampling feeds
        it frames of the model's own), uncond and muq_embed as in embed_rows (caption dropout, reference audio)."""
        rows = tokens if input_tokens is None else input_tokens
        h = self.backbone(self.embed_rows(rows, tokens_mask, muq_idx, uncond, muq_embed))
        target = audio_frame_mask[:, 1:]
        b_idx, t_idx = target.nonzero(as_tuple=True)
        n = b_idx.numel()
        if n == 0:
            raise ValueError("batch has no audio frame to predict")
        h_sel = h[b_idx, t_idx]  # [N,D]
        codes = tokens[b_idx, t_idx + 1, :-1]  # [N,K]
        c0_logits = self.codebook0_head(h_sel).float()
        loss_c0 = F.cross_entropy(c0_logits, codes[:, 0])
        if decoder_fraction < 1.0:
            m = max(1, int(round(n * decoder_fraction)))
            keep = torch.randperm(n, generator=generator, device="cpu")[:m].to(h_sel.device)
            h_sel, codes = h_sel[keep], codes[keep]
        dec_logits = self.depth_logits(h_sel, codes).float()
        loss_rest = F.cross_entropy(dec_logits.flatten(0, 1), codes[:, 1:].flatten())
        return loss_c0 + loss_rest, {"loss_c0": loss_c0.detach(), "loss_rest": loss_rest.detach(), "frames": n}

    # ---------------------------------------------------------------- inference
    def setup_caches(self, batch: int, backbone_len: int, dtype=None, device=None):
        """Static KV caches: backbone sized to the request (prompt + frames), decoder to one frame."""
        p = self.codebook0_head.weight
        dtype, device = dtype or p.dtype, device or p.device
        if backbone_len > self.cfg.backbone.max_seq_len:
            raise ValueError(f"prompt + frames = {backbone_len} exceeds the backbone context "
                             f"{self.cfg.backbone.max_seq_len}")
        self.backbone.setup_cache(batch, backbone_len, dtype, device)
        self.decoder.setup_cache(batch, self.cfg.audio_num_codebooks, dtype, device)

    def drop_caches(self):
        self.backbone.drop_cache()
        self.decoder.drop_cache()

    def audio_logits(self, codebook: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of `codebook` (1..K-1) from a depth-decoder state h [B,D]."""
        return h @ self.audio_head[codebook - 1].to(h.dtype)


def init_random_(model: HeartMuLa, seed: int = 0) -> HeartMuLa:
    """Random weights in place (benchmarks and the tiny default): linears N(0, 1/fan_in), norms 1, embeddings
    N(0, 1). Works for a model moved off the meta device with `to_empty`."""
    gen = torch.Generator(device=model.audio_head.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
            elif name == "muq_linear.bias":
                p.zero_()
            elif p.dim() >= 2 and "embedding" not in name:
                p.normal_(0.0, p.shape[-2 if name == "audio_head" else -1] ** -0.5, generator=gen)
            else:
                p.normal_(0.0, 1.0, generator=gen)
    return model


def build_random(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0) -> HeartMuLa:
    """A randomly initialised HeartMuLa built directly on `device` (no CPU copy of a 3B model)."""
    with torch.device("meta"):
        model = HeartMuLa(cfg).to(dtype)  # cast on meta: free
    model = model.to_empty(device=device)
    model.init_buffers(device)
    return init_random_(model, seed).eval()
