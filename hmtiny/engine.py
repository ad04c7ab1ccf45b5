"""The fast generation engine: the same songs as hmtiny/generate.py's loop (the tests hold it to that file), made
fast on CUDA. Prompt prefill, then one frame per step over a static KV cache of its own.

How it differs from the plain loop (the same arithmetic; on CUDA the kernels may round differently from torch in
the last bits, which can flip a near-tie):
- the KV cache is sized to the request (prompt + frames) and several songs run as one batch: prompts left-padded,
  each song at its own positions, each stopping on its own;
- q/k/v and gate/up weights are concatenated into one matrix each (one GEMV instead of three / two), the output
  heads padded to a multiple of 64 rows; on CUDA the few-row decode matmuls run through kernels.gemv (a Triton GEMV
  whose tile is timed per shape, bf16 or int8 weights), whose outputs may stay split along K, the slices summed by
  the next kernel; each GEMV, as it ends, asks L2 to fetch the first weights of the GEMV after it
  (kernels/prefetch.py);
- one kernel per layer does RoPE + the KV-cache write + attention over the valid slots (kernels.decode_attention),
  one adds the residual and normalises (kernels.add_rmsnorm), one per codebook does the guidance mix + allowed ids
  + top-k + the draw (kernels.topk_sample); on CPU/MPS each runs its plain-torch reference;
- mode "graph" (CUDA) captures the prompt prefill with the first frame, and the frame step, in CUDA graphs whose
  kernels are chained with programmatic dependent launch (kernels/pdl.py); the host checks for EOS only every
  `eos_check_every` frames. Mode "eager" runs the same step without graphs (any device): the tests' reference for
  the graph;
- before a process's first capture, its Triton kernels compile side by side on threads (kernels/ahead.py), not one
  by one as the first warm-up run reaches them.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import ahead, gemv, switches
from kernels.add_rmsnorm import add_rmsnorm
from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.topk_sample import sample as sample_kernel

from .generate import Prompt, allowed_ids
from .model import HeartMuLa, KVCache, Transformer
from .runtime import check_sampling

MODES = ("eager", "graph")
# devices whose step kernels this process has compiled ahead (Engine._compile_ahead: once, before the first capture)
_COMPILED_AHEAD: set = set()
# eager runs of a step before its capture: the first compiles/loads its Triton kernels, creates cuBLAS handles and
# allocates; nothing is lazily set up on a second run (gemv tiles are planned before, counters made on the first)
WARMUPS = 1


# ---------------------------------------------------------------- fused inference weights
class Fused(nn.Module):
    """Several linear layers applied to the same input, outputs concatenated. Plain nn.Linear layers become one
    matrix, several int8 layers one Int8Linear (scales are per output row, so rows concatenate): one GEMV at decode
    instead of several small ones. Anything else (a single int8 layer, LoRA wrappers) is called part by part."""

    def __init__(self, parts: list[nn.Module], fuse: bool, copy: bool = True):
        super().__init__()
        self.sizes = [p.out_features for p in parts]
        self._sources = parts  # a plain list: not registered, only read by refresh() and share()
        self.int8, self.parts, self.direct = None, None, None
        self.shared = False  # share(): the sources' weights are views of the fused copy
        self.tile = None  # plan(): the GEMV tile for captured decode steps (K slices summed by the consumer)
        self.tile_glu = self.tile_split = False
        self.register_buffer("weight", None, persistent=False)
        if fuse and len(parts) == 1 and type(parts[0]) is nn.Linear and parts[0].bias is None:
            self.direct = parts[0]  # nothing to concatenate: read the model's own weight
        elif fuse and copy and all(type(p) is nn.Linear and p.bias is None for p in parts):
            self.weight = torch.cat([p.weight.detach() for p in parts])
        elif fuse and copy and len(parts) > 1 and _all_int8(parts):
            from .quant import Int8Linear
            self.int8 = Int8Linear(parts[0].in_features, sum(self.sizes), group_size=parts[0].group_size,
                                   device=parts[0].weight.device)
            self.int8.weight, self.int8.scale = (torch.cat([p.weight for p in parts]),
                                                 torch.cat([p.scale for p in parts]))
        else:
            self.parts = nn.ModuleList(parts)

    @torch.no_grad()
    def refresh(self):
        """Copy the source weights again (in place: a captured graph keeps pointing at the same memory)."""
        if self.shared:  # the sources read the fused weights themselves: nothing to copy
            return
        if self.weight is not None:
            torch.cat([p.weight for p in self._sources], out=self.weight)
        elif self.int8 is not None:
            torch.cat([p.weight for p in self._sources], out=self.int8.weight)
            torch.cat([p.scale for p in self._sources], out=self.int8.scale)

    @torch.no_grad()
    def share(self):
        """Make the source layers' weights row views of the fused copy (no second copy; the caller owns the model
        and will not replace those weights). Direct and part-by-part layers hold no copy: nothing to do."""
        if self.weight is None and self.int8 is None:
            return
        start = 0
        for p, n in zip(self._sources, self.sizes):
            if self.weight is not None:
                p.weight = nn.Parameter(self.weight[start: start + n], requires_grad=False)
            else:  # int8 buffers
                p.weight, p.scale = self.int8.weight[start: start + n], self.int8.scale[start: start + n]
            start += n
        self.shared = True

    def gemv_weight(self):
        """(weight, int8 scale or None) when one decode GEMV computes this layer, else None."""
        if self.direct is not None:
            return self.direct.weight, None
        if self.weight is not None:
            return self.weight, None
        q = self.int8 if self.int8 is not None else self.parts[0] if len(self.parts) == 1 else None
        if type(q).__name__ == "Int8Linear" and q.group_size is None and q.bias is None:
            return q.weight, q.scale
        return None

    def plan(self, rows: int, split: bool, dtype: torch.dtype, glu: bool = False):
        """Pick the decode GEMV tile for `rows` input rows now (it is timed on the device), for the captured step's
        kernels.gemv calls: split=True lets K be cut into slices that the consumer adds up (`partials`). glu: for
        `swiglu` (whole outputs). Plain bf16/fp16 weights and per-channel int8 ones; others keep their own path."""
        ws = self.gemv_weight()
        if ws is not None:
            x = torch.zeros(rows, ws[0].shape[1], device=ws[0].device, dtype=dtype)
            self.tile, self.tile_glu = gemv.plan(x, ws[0], split=split, scale=ws[1], glu=glu), glu
            self.tile_split = split

    def _tiled(self, x) -> bool:
        """A planned tile applies to x (the prompt's many rows take the general path)."""
        return self.tile is not None and x.numel() // x.shape[-1] <= gemv.MAX_ROWS

    def decode_weight(self) -> torch.Tensor | None:
        """The one matrix a planned decode GEMV reads (the weights a GEMV before it may prefetch), else None."""
        return self.gemv_weight()[0] if self.tile is not None else None

    def forward(self, x, then=None):
        """then: the next decode GEMV's weight, fetched into L2 as this one ends (kernels/prefetch.py)."""
        if self._tiled(x) and not self.tile_glu:
            w, scale = self.gemv_weight()
            if self.tile_split:
                return gemv.linear_split(x, w, self.tile, scale)
            return gemv.linear_tiled(x, w, self.tile, scale, then=then)
        if self.direct is not None:
            return gemv.linear(x, self.direct.weight)
        if self.weight is not None:
            return gemv.linear(x, self.weight)
        if self.int8 is not None:
            return self.int8(x)
        outs = [p(x) for p in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    def partials(self, x, then=None):
        """The output as K slices [sk, ..., N] for kernels.add_rmsnorm to add up (one slice unless a split tile was
        planned). then: as in forward."""
        if self._tiled(x) and self.tile_split:
            w, scale = self.gemv_weight()
            return gemv.partials(x, w, self.tile, scale, then)
        return self(x, then)[None]

    def swiglu(self, x, then=None):
        """silu(gate) * up for this layer's [gate; up] outputs (SwiGLU's w1 | w3): with a `glu` tile one GEMV
        forms the product in its epilogue, else torch ops. then: as in forward."""
        if self._tiled(x) and self.tile_glu:
            w, scale = self.gemv_weight()
            return gemv.linear_tiled(x, w, self.tile, scale, glu=True, then=then)
        g, u = self(x).chunk(2, -1)
        return F.silu(g) * u


def _all_int8(parts) -> bool:
    if type(parts[0]).__name__ != "Int8Linear":
        return False
    return all(type(p) is type(parts[0]) and p.bias is None and p.group_size == parts[0].group_size for p in parts)


class FastLayer(nn.Module):
    """One transformer block for inference: fused projections, per-sample RoPE positions, masked cache attention."""

    def __init__(self, block: nn.Module, fuse: bool, copy: bool = True):
        super().__init__()
        a, m = block.attn, block.mlp
        self.block = block  # norms and KV cache live in the model
        self.n_heads, self.n_kv = a.n_heads, a.n_kv
        self.qkv = Fused([a.q_proj, a.k_proj, a.v_proj], fuse, copy)
        self.wo = Fused([a.output_proj], fuse, copy)
        self.w13 = Fused([m.w1, m.w3], fuse, copy)
        self.w2 = Fused([m.w2], fuse, copy)
        # the engine's own KV cache (not the model's): a captured graph writes here, so nothing outside the engine
        # may free it (model.drop_caches does not touch it)
        self.cache: KVCache | None = None

    def forward(self, x, pending, slots, pos, start, rope, prompt: bool, then=None):
        """x [B,S,D] (the residual stream, still without `pending`: the previous layer's last matmul output as K
        slices [sk,B,S,D], or None) at positions pos [B,S] (rope: the stack's (cos, sin) table), written to cache
        slots [S] (consecutive). Row i of song b attends to cache slots start[b]..slots[i]. Returns the new
        (x, pending). A frame step's few rows: one kernel adds the slices + residual and normalises, one does RoPE
        + the cache write + attention, the GEMVs leave K slices (gate/up's ends in SwiGLU's silu(g) * u); a whole
        prompt: the same operations in plain torch (decode_attention's reference: left-pad rows see themselves).
        then: the weight of the decode GEMV after this layer's last (each GEMV prefetches the next one's into L2)."""
        b = self.block
        x, n = add_rmsnorm(x, pending, b.sa_norm.scale, b.sa_norm.eps)
        # decode_attention adds the K slices
        qkv = self.qkv(n) if prompt else self.qkv.partials(n, self.wo.decode_weight())
        cache = self.cache
        attend = decode_attention_ref if prompt else decode_attention
        y = attend(qkv, cache.k, cache.v, rope, pos, slots, start, self.n_heads, self.n_kv)
        x, n = add_rmsnorm(x, self.wo.partials(y, self.w13.decode_weight()), b.mlp_norm.scale, b.mlp_norm.eps)
        return x, self.w2.partials(self.w13.swiglu(n, self.w2.decode_weight()), then)


class FastStack(nn.Module):
    def __init__(self, stack: Transformer, fuse: bool, copy: bool = True):
        super().__init__()
        self.stack = stack
        self.layers = nn.ModuleList(FastLayer(b, fuse, copy) for b in stack.layers)

    def setup_cache(self, batch: int, length: int, dtype, device):
        cfg = self.stack.cfg
        for layer in self.layers:
            layer.cache = KVCache(batch, cfg.num_kv_heads, length, cfg.head_dim, dtype, device)

    def first_weight(self) -> torch.Tensor | None:
        """The first decode GEMV's weight (what the GEMV before this stack prefetches)."""
        return self.layers[0].qkv.decode_weight() if len(self.layers) else None

    def forward(self, x, pos, slots, start, prompt: bool = False, then=None):
        """x [B,S,D] at positions pos [B,S], written to consecutive cache slots [S]; row i of song b sees cache
        slots start[b]..slots[i] -> normed output (see FastLayer.forward). then: the weight of the decode GEMV that
        follows the stack (the last layer's w2 prefetches it)."""
        pending = None
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].qkv.decode_weight() if i + 1 < len(self.layers) else then
            x, pending = layer(x, pending, slots, pos, start, self.stack.rope, prompt, nxt)
        return add_rmsnorm(x, pending, self.stack.norm.scale, self.stack.norm.eps)[1]


# ---------------------------------------------------------------- the engine
class Engine:
    """Holds the fused weights and, in graph mode, the captured steps for one request shape: keep the engine to
    generate again without a new capture (each call re-reads the model's weights).

    mode: "eager" (any device) or "graph" (CUDA graphs of the eager step). fuse: concatenate q/k/v and gate/up
    weights (a copy: about the size of the stacks' weights; share=True makes the model's own weights views of the
    fused ones instead, for callers that own the model and will not replace its parameters, e.g. sample.py;
    copy_weights=False fuses only what needs no copy of the stacks' weights, e.g. validation during training, whose
    memory must stay within the training step's). The KV cache is the engine's own; drop the engine to free it and
    its captured graphs.
    """

    def __init__(self, model: HeartMuLa, mode: str = "eager", fuse: bool = True, share: bool = False,
                 copy_weights: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        started = time.perf_counter()
        self.model, self.mode = model, mode
        self.device = model.text_embeddings.weight.device
        self.dtype = model.text_embeddings.weight.dtype
        if mode != "eager" and self.device.type != "cuda":
            raise ValueError(f"mode {mode!r} needs a CUDA device (model is on {self.device})")
        cfg = model.cfg
        self.K, self.V = cfg.audio_num_codebooks, cfg.audio_vocab_size
        self.eos = cfg.gen.audio_eos_id
        if not cfg.codebook_size <= self.eos < self.V:
            raise ValueError(f"audio_eos_id {self.eos} must lie in [{cfg.codebook_size}, {self.V})")
        self.backbone = FastStack(model.backbone, fuse, copy_weights)
        self.decoder = FastStack(model.decoder, fuse, copy_weights)
        self.projection = Fused([model.projection], fuse)
        self.sources = self._sources()
        if share and fuse:  # the model's own q/k/v and gate/up weights become views of the fused matrices
            for f in self._fused():
                f.share()
        # output heads padded to a multiple of 64 rows, [V, D] layout: aligned GEMVs (8197 columns are not)
        self.heads_fused = (fuse and type(model.codebook0_head) is nn.Linear
                            and isinstance(model.audio_head, nn.Parameter))
        self.Vout = -(-self.V // 64) * 64 if self.heads_fused else self.V
        if self.heads_fused:
            D = model.codebook0_head.in_features
            self.c0_w = torch.zeros(self.Vout, D, dtype=model.codebook0_head.weight.dtype, device=self.device)
            self.head_w = torch.zeros(self.K - 1, self.Vout, D, dtype=model.audio_head.dtype, device=self.device)
        # hmtiny.generate's allowed ids, padded to the heads' width (EOS is set per request)
        self.bias = torch.full((self.Vout,), -math.inf, device=self.device)
        self.bias[: self.V] = allowed_ids(cfg)
        self._graph_key = None
        self._graph = self._first_graph = None
        self._planned = False
        self._rng = None  # see generate
        # where a call's time went. Host seconds, every mode: build_s (this constructor: fusing weights), plan_s
        # (gemv tiles: timed, or read from the tile cache), capture_s (warm-up runs + CUDA graph captures, 0 once
        # captured), loop_s (the frames, from the first replay to the frames on the host), total_s (the call).
        # CUDA events: prefill_and_first_frame_ms, ms_per_frame_step (the loop's GPU time per step).
        self.last_timing = None
        self.plan_s = 0.0
        self.build_s = time.perf_counter() - started

    def _sources(self):
        """The module objects the engine was built from (to notice LoRA wrapping, quantisation, merging)."""
        out = [self.model.projection, self.model.codebook0_head]
        for stack in (self.model.backbone, self.model.decoder):
            for b in stack.layers:
                out += [b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.output_proj, b.mlp.w1, b.mlp.w2,
                        b.mlp.w3]
        return out

    def matches(self) -> bool:
        """The model still has the layers the engine was built from."""
        now = self._sources()
        return len(now) == len(self.sources) and all(a is b for a, b in zip(now, self.sources))

    def _fused(self):
        for st in (self.backbone, self.decoder):
            for layer in st.layers:
                yield layer.qkv
                yield layer.w13

    @torch.no_grad()
    def refresh(self):
        """Re-read the model's weights into the fused copies (weights may have changed since: training)."""
        for f in self._fused():
            f.refresh()
        if self.heads_fused:
            self.c0_w[: self.V].copy_(self.model.codebook0_head.weight)
            self.head_w[:, : self.V].copy_(self.model.audio_head.transpose(1, 2))

    def _head_weight(self, i: int) -> torch.Tensor | None:
        return (self.c0_w if i == 0 else self.head_w[i - 1]) if self.heads_fused else None

    def _head(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of codebook i from h [B,D] (0: backbone state; 1..K-1: depth-decoder state). Its GEMV prefetches
        the next one's weight: the projection before the decoder, or the backbone's first after the last codebook."""
        if self.heads_fused:
            then = self.backbone.first_weight() if i == self.K - 1 else self.projection.decode_weight()
            return gemv.linear(h, self._head_weight(i), then)
        return self.model.codebook0_head(h) if i == 0 else self.model.audio_logits(i, h)

    # ------------------------------------------------------------ one frame
    def _frame_from_hidden(self, h: torch.Tensor, noise) -> torch.Tensor:
        """Backbone state at the last position h [B2,D] -> frame [Bs,K]: codebook 0, then the depth decoder
        (positions 0 and 1 first, then one position per codebook; its cache is simply overwritten each frame)."""
        m, K = self.model, self.K
        # CFG mix, allowed ids, temperature, top-k and the draw in one kernel (kernels.topk_sample)
        pick = lambda i, logits: sample_kernel(logits, self.bias, self.cfg_scale if self.cfg_on else 1.0,
                                               self.temperature, self.topk, None if noise is None else noise[i])
        c = pick(0, self._head(0, h))
        codes = [c]
        dec_in = torch.stack([h, m.embed_audio(0, self._both(c)).to(h.dtype)], 1)
        for i in range(1, K):
            pos, slots = self.dec_steps[i - 1]
            out = self.decoder(self.projection(dec_in, self.decoder.first_weight()), pos, slots, self.dec_start,
                               then=self._head_weight(i))
            c = pick(i, self._head(i, out[:, -1]))
            codes.append(c)
            if i < K - 1:
                dec_in = m.embed_audio(i, self._both(c)).to(h.dtype)[:, None]
        return torch.stack(codes, -1)

    def _both(self, c):
        return torch.cat([c, c]) if self.cfg_on else c

    def _draw_noise(self):
        if self.topk == 1:
            return None
        # as wide as hmtiny.generate draws it (the padded heads' width), so that both draw the same numbers
        width = -(-self.V // 64) * 64
        noise = torch.empty(self.K, self.Bs, width, device=self.device).exponential_(generator=self.generator)
        return noise if width == self.Vout else noise[..., : self.Vout]

    def _first_frame(self):
        """The prompt prefill (slots 0..P-1, each song at its own positions 0..n-1), then the first frame from the
        backbone's state at the last prompt row. Reads the request buffers, so a CUDA graph can replay it."""
        r = self.request
        x = self.model.embed_rows(r["tokens"], r["tmask"], r["muq"], r["uncond"], r["ref"]).to(self.dtype)
        pos = (r["rows"][None] - self.pad[:, None]).clamp(min=0)
        h = self.backbone(x, pos, r["rows"], self.pad, prompt=True)[:, -1]
        self._record(self._frame_from_hidden(h, self._draw_noise()))

    def _step(self):
        """Feed the previous frame at the next cache slot, produce the next frame; all state on the device."""
        s, noise = self.state, self._draw_noise()
        x = self.model.audio_embeddings(self._both(s["prev"]) + self.model.audio_offsets).sum(1, keepdim=True)
        slot = s["slot"]
        pos = (slot - self.pad)[:, None]  # [B2,1] each song's own position
        h = self.backbone(x.to(self.dtype), pos, slot, self.pad, then=self._head_weight(0))[:, -1]
        self._record(self._frame_from_hidden(h, noise))
        slot.add_(1)

    def _record(self, frame):
        s = self.state
        s["out"].index_copy_(1, s["idx"], frame[:, None])
        eos = (frame == self.eos).any(-1)
        s["length"].copy_(torch.where(eos & ~s["done"], s["idx"], s["length"]))
        s["done"].logical_or_(eos)
        s["prev"].copy_(frame)
        s["idx"].add_(1)

    # ------------------------------------------------------------ a request
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], max_frames: int, cfg_scale: float = 1.5, topk: int = 50,
                 temperature: float = 1.0, generator: torch.Generator | None = None, eos_check_every: int = 32,
                 progress: Callable[[int, int], None] | None = None, stop_on_eos: bool = True) -> list[torch.Tensor]:
        """Frames for each prompt, as hmtiny.generate.generate makes them (same arguments), the prompts in one batch.
        Greedy, the same tokens; sampled, the same tokens for one prompt and the same generator state (on the same
        device: the generators of CPU and CUDA differ). Runs in the weights' dtype with autocast off, as
        sample.py does: under autocast a captured graph would read autocast's cached casts of float32 weights (the
        LoRA factors), which are freed when the caller's autocast region ends and stale after an optimizer step."""
        kind = self.device.type
        with torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else contextlib.nullcontext():
            return self._generate(prompts, max_frames, cfg_scale, topk, temperature, generator, eos_check_every,
                                  progress, stop_on_eos)

    def _generate(self, prompts, max_frames, cfg_scale, topk, temperature, generator, eos_check_every, progress,
                  stop_on_eos):
        started = time.perf_counter()
        planned_before = self.plan_s
        m = self.model
        if not prompts:
            raise ValueError("no prompt given")
        if not self.matches():
            raise ValueError("the model's layers were replaced since this engine was built (LoRA, quantisation, "
                             "merge): build a new Engine")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        check_sampling(topk, temperature, cfg_scale)
        self.refresh()
        self.bias[self.eos] = 0.0 if stop_on_eos else -math.inf  # in place: a captured graph sees it
        self.cfg_on, self.cfg_scale = cfg_scale != 1.0, float(cfg_scale)
        self.topk, self.temperature = int(topk), float(temperature)
        # The draws come from the engine's own generator, loaded with the caller's state (or the device's default
        # generator's) and written back at the end: a captured graph stays bound to one generator, so a new
        # generator per request needs no new capture, and the caller's generator advances as in eager code.
        source = generator if generator is not None else _default_generator(self.device)
        if source is not None:
            if self._rng is None:
                self._rng = torch.Generator(self.device)
            self._rng.set_state(source.get_state())
        self.generator = self._rng if source is not None else None
        dev, Bs = self.device, len(prompts)
        lens = [int(p[0].shape[0]) for p in prompts]
        P = max(lens)
        need = P + max_frames + 1  # frame rows up to P+max_frames-2, plus room for 2 warm-up steps
        # before capture (WARMUPS <= 2; the sizes stay as they were with 2: the same cache length, the same tiles)
        limit = m.cfg.backbone.max_seq_len
        if need > limit:
            raise ValueError(f"prompt ({P} rows) + {max_frames} frames exceeds the backbone context {limit}")
        L = min(-(-need // 8) * 8, limit)  # a multiple of 8 keeps the attention mask aligned

        # left-pad the prompts so every song's last prompt row sits at slot P-1
        tokens = torch.zeros(Bs, P, self.K + 1, dtype=torch.long)
        tmask = torch.zeros(Bs, P, self.K + 1, dtype=torch.bool)
        pad = torch.tensor([P - n for n in lens])
        muq = torch.tensor([int(p[2]) for p in prompts]) + pad
        for b, (t, mk) in enumerate(p[:2] for p in prompts):
            tokens[b, P - lens[b]:] = t.cpu()
            tmask[b, P - lens[b]:] = mk.cpu()
        uncond = torch.zeros(Bs, dtype=torch.bool)
        ref = reference_embeddings(prompts, m.cfg.muq_dim)
        if self.cfg_on:
            tokens, tmask, pad, muq = (torch.cat([t, t]) for t in (tokens, tmask, pad, muq))
            uncond = torch.cat([uncond, ~uncond])
            ref = None if ref is None else torch.cat([ref, ref])
        B2 = tokens.shape[0]
        tokens, tmask, uncond, muq = tokens.to(dev), tmask.to(dev), uncond.to(dev), muq.to(dev)
        self.Bs = Bs

        key = (B2, L, P, self.cfg_on, self.cfg_scale, self.topk, self.temperature, max_frames, ref is not None)
        if key != self._graph_key:
            self._graph = self._first_graph = None
            self.backbone.setup_cache(B2, L, self.dtype, dev)
            self.decoder.setup_cache(B2, self.K, self.dtype, dev)
            # depth decoder: (positions [B2,S], cache slots [S]) of its 7 calls, fixed; it sees its cache from slot 0
            self.dec_steps = []
            for i in range(1, self.K):
                slots = torch.arange(0 if i == 1 else i, i + 1, device=dev)
                self.dec_steps.append((slots[None].expand(B2, -1), slots))
            self.dec_start = torch.zeros(B2, dtype=torch.long, device=dev)
            # every tensor a captured graph reads lives as long as the graph: each request copies its values in
            self.pad = torch.zeros(B2, dtype=torch.long, device=dev)
            self.request = {"tokens": tokens.new_zeros(tokens.shape), "tmask": tmask.new_zeros(tmask.shape),
                            "muq": muq.new_zeros(muq.shape), "uncond": uncond.new_zeros(uncond.shape),
                            "rows": torch.arange(P, device=dev),
                            "ref": None if ref is None else torch.zeros(ref.shape, device=dev)}
            self.state = {"prev": torch.zeros(Bs, self.K, dtype=torch.long, device=dev),
                          "slot": torch.zeros(1, dtype=torch.long, device=dev),
                          "idx": torch.zeros(1, dtype=torch.long, device=dev),
                          # 2 spare frames: the warm-up steps before graph capture write there (WARMUPS <= 2)
                          "out": torch.zeros(Bs, max_frames + 2, self.K, dtype=torch.long, device=dev),
                          "length": torch.zeros(Bs, dtype=torch.long, device=dev),
                          "done": torch.zeros(Bs, dtype=torch.bool, device=dev)}
        s = self.state
        self.pad.copy_(pad)  # each song's left padding (its own positions start there)
        for name, t in (("tokens", tokens), ("tmask", tmask), ("muq", muq), ("uncond", uncond), ("ref", ref)):
            if t is not None:
                self.request[name].copy_(t)
        s["slot"].fill_(P)
        s["idx"].zero_()
        s["length"].fill_(max_frames)
        s["done"].zero_()

        # CUDA events (no sync): where the call's time went, read by benchmarks from `last_timing`
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if dev.type == "cuda" else None
        if marks:
            marks[0].record()
        # prefill + first frame, then one step per frame: each a CUDA graph (captured on a request shape's first
        # call) except in eager mode. A graph of the prefill spares the host launching its hundreds of kernels.
        captured = time.perf_counter()
        if self.mode == "eager":  # (its caches are set up again every call: no key kept)
            self._first_frame()
        else:
            if self._first_graph is None or (max_frames > 1 and self._graph is None):
                if not self._planned:
                    self._plan_tiles()
                if self.device not in _COMPILED_AHEAD and switches.compile_ahead():
                    self._compile_ahead()
                    _COMPILED_AHEAD.add(self.device)
                if self._first_graph is None:
                    self._first_graph = self._capture(self._first_frame)
                if max_frames > 1 and self._graph is None:
                    self._graph = self._capture(self._step)
                captured = time.perf_counter()
            self._first_graph.replay()
            self._graph_key = key
        if marks:
            marks[1].record()
        for k in range(1, max_frames):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
            if k % eos_check_every == 0:
                if progress:
                    progress(k + 1, max_frames)
                if bool(s["done"].all()):  # the only host sync of the loop
                    break
        if progress:
            progress(int(s["idx"].item()), max_frames)
        if marks:
            marks[2].record()
        lengths = s["length"].tolist()
        out = s["out"].cpu()
        if source is not None:
            source.set_state(self._rng.get_state())
        done = time.perf_counter()
        plan_s = self.plan_s - planned_before
        self.last_timing = {"build_s": self.build_s, "plan_s": plan_s,
                            "capture_s": captured - started - plan_s if self.mode != "eager" else 0.0,
                            "loop_s": done - captured, "total_s": done - started, "frames": int(s["idx"].item())}
        if marks:  # .cpu() above waited for the loop
            steps = max(int(s["idx"].item()) - 1, 1)
            self.last_timing.update(prefill_and_first_frame_ms=marks[0].elapsed_time(marks[1]), frame_steps=steps,
                                    ms_per_frame_step=marks[1].elapsed_time(marks[2]) / steps)
        return [out[b, : lengths[b]].clone() for b in range(Bs)]

    def _plan_tiles(self, rows: int | None = None):
        """Time each decode matmul's tile once for `rows` input rows (default: this request's), before capture.
        Outputs that go to kernels.add_rmsnorm (o_proj, w2) may be split along K, and so may q/k/v
        (kernels.decode_attention sums them); gate/up stays whole for its SwiGLU epilogue, and so does the
        projection (nothing after it would sum slices)."""
        started = time.perf_counter()
        rows = rows or self.pad.shape[0]
        for st in (self.backbone, self.decoder):
            for layer in st.layers:
                layer.qkv.plan(rows, split=True, dtype=self.dtype)
                layer.wo.plan(rows, split=True, dtype=self.dtype)
                layer.w13.plan(rows, split=False, dtype=self.dtype, glu=True)
                layer.w2.plan(rows, split=True, dtype=self.dtype)
        self.projection.plan(rows, split=False, dtype=self.dtype)
        self._planned = True
        self.plan_s += time.perf_counter() - started

    def _restorer(self) -> Callable[[], None]:
        """A function that puts the request state and the generators back as they are now."""
        s = self.state
        saved = {k: v.clone() for k, v in s.items()}
        gen_state = self.generator.get_state() if self.generator is not None else None
        cuda_state = torch.cuda.get_rng_state(self.device)

        def restore():
            for k, v in saved.items():
                s[k].copy_(v)
            if gen_state is not None:
                self.generator.set_state(gen_state)
            torch.cuda.set_rng_state(cuda_state, self.device)
        return restore

    def _compile_ahead(self):
        """Before this process's first capture on the device: the prefill with the first frame and one frame step
        run once with their Triton launches turned into compilations queued side by side (kernels/ahead.py), so a
        fresh machine compiles the step's dozen kernels at once instead of one after another in the warm-up run.
        The request state and the generators are restored after it."""
        restore = self._restorer()
        with ahead.compiling(self.device):
            self._first_frame()
            self._step()
        restore()

    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        """Warm up fn (WARMUPS runs: Triton compiles, cuBLAS handles), then record it in a CUDA graph; the request
        state and the generators are restored around both, so the first replay is the request's real call. The
        caller has planned the GEMV tiles (_generate, before the compile-ahead pass)."""
        restore = self._restorer()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # the prefill rewrites the same cache rows each time: safe to repeat
            for _ in range(WARMUPS):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        restore()
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and self.topk != 1:  # (one generator may serve several graphs)
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(self.device)
        restore()
        return graph


def reference_embeddings(prompts: list[Prompt], dim: int) -> torch.Tensor | None:
    """[B, dim] float32 reference embeddings of the prompts that carry one (zeros for the others), None if none do."""
    refs = [p[3] if len(p) > 3 else None for p in prompts]
    if all(r is None for r in refs):
        return None
    return torch.stack([torch.zeros(dim) if r is None else torch.as_tensor(r, dtype=torch.float32).reshape(dim).cpu()
                        for r in refs])


def _default_generator(device: torch.device) -> torch.Generator | None:
    """The generator torch.manual_seed seeds, for CPU and CUDA (other devices: None, their global RNG is used)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator if device.type == "cpu" else None
