"""The training step's forward and backward, captured as CUDA graphs (one per padded batch shape) and replayed.

Why: with a frozen base and a LoRA, one clip's step is thousands of small kernels (the adapters' matmuls, dtype
casts, norms), and an eager step spends longer issuing them from Python than the GPU spends running them. A
replayed graph issues the whole forward and backward at once, so the step takes the GPU's time.

A graph replays fixed shapes and cannot read device values on the host, so this computes what `model.loss`
(the plain reference; tests hold this to it) computes, in a form with static shapes:
- the rows of a batch are padded up to a multiple of `bucket` (pad rows are empty: a zero embedding after every
  real row, which causal attention keeps out of the real rows);
- the frames the loss reads (rows whose next row is audio) are chosen on the host from the CPU batch, as index
  lists padded to a multiple of `bucket` with weight-0 entries; the loss divides by the real count.
Different lengths map to few shapes: one graph per (clips, padded length), captured on its first batch after one
eager warm-up (about a second) and kept. The loss-row lists of a shape have room for the most rows seen at that
length (rounded up to `bucket`): a batch with more re-captures it once with the larger room, a batch with fewer
pads. So a run captures at most a few graphs per padded length, however its clips split into prompt and audio.
Graphs share one memory pool, so memory is that of the largest shape, not the sum. `release()` frees them all
(validation does when the card lacks room for both); later steps capture their shapes again.

Frozen output heads (8197 columns) get storage padded to a multiple of 64 columns, in place (`pad_frozen_heads`):
cuBLAS runs an 8197-wide product with slow unaligned kernels, ~5x the time of the padded one (bench/NOTES.md).
The step computes the padded logits and drops the extra columns; the model's own parameters are views of the
first 8197 columns, so everything else reads the same values.

When it captures, the model's RMSNorms, SwiGLU products and RoPE switch (in place, and they stay switched) to the
Triton training kernels of `hmtiny/fused.py`: the same maths in fewer passes over memory, which is what a replayed
step is left waiting on (`fused=False` keeps the torch ops, for A/B timings).

Gradients accumulate into the parameters' existing `.grad` tensors, which must stay in place: the trainer zeroes
them in place (`zero_grad(set_to_none=False)`). Gradient accumulation, clipping and the optimizer stay eager.
Without CUDA (`capture=False`) the same code runs eagerly: that is how the CPU tests check it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused import use_fused_kernels
from .lora import FactorCopies
from .model import HeartMuLa


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Rows:
    """Which rows the loss reads, as the host computed them: *_at is b * row_stride + t for the target row t of
    sample b (the frame predicted is row t + 1), *_w is 1 for a real entry and 0 for padding. Flat indices make
    the gathers index_select, whose backward (index_add) needs no host sync."""
    c0_at: torch.Tensor
    c0_w: torch.Tensor
    dec_at: torch.Tensor
    dec_w: torch.Tensor
    frames: int  # real entries of c0 (every target frame)
    decoded: int  # real entries of dec (decoder_fraction of them)


def _extend(at: torch.Tensor, w: torch.Tensor, size: int):
    """Index and weight lists padded to `size` entries: padding reads row 0 of sample 0 (any valid row) with
    weight 0."""
    pad = size - at.numel()
    return F.pad(at, (0, pad)), F.pad(w, (0, pad))


def _padded(at: torch.Tensor, bucket: int):
    return _extend(at, torch.ones(at.numel()), round_up(at.numel(), bucket))


def plan_rows(audio_frame_mask: torch.Tensor, decoder_fraction: float, bucket: int, row_stride: int) -> Rows:
    """The loss rows of a CPU batch, in model.loss's order; decoder_fraction < 1 draws the same subset as
    model.loss does (torch.randperm on the global CPU generator)."""
    b, t = audio_frame_mask[:, 1:].nonzero(as_tuple=True)
    n = b.numel()
    if n == 0:
        raise ValueError("batch has no audio frame to predict")
    at = b * row_stride + t
    dec = at
    if decoder_fraction < 1.0:
        m = max(1, int(round(n * decoder_fraction)))
        dec = at[torch.randperm(n, device="cpu")[:m]]
    return Rows(*_padded(at, bucket), *_padded(dec, bucket), frames=n, decoded=dec.numel())


def pad_frozen_heads(model: HeartMuLa, multiple: int = 64):
    """Move frozen codebook0_head / audio_head weights into storage padded to `multiple` columns (zeros beyond the
    vocabulary) and leave the parameters as views of the real columns. Returns (c0 [Vp, D], audio [K-1, D_dec, Vp])
    for the padded products, or None where the heads train (full fine-tuning), are not plain, or need no padding."""
    c0, audio = model.codebook0_head, model.audio_head
    V = audio.shape[-1]
    Vp = round_up(V, multiple)
    if (Vp == V or type(c0) is not torch.nn.Linear or c0.weight.requires_grad or audio.requires_grad
            or c0.weight.shape[0] != V):
        return None
    D = c0.weight.shape[1]
    if audio.stride(-2) == Vp and c0.weight.untyped_storage().nbytes() == Vp * D * c0.weight.element_size():
        # padded already (an earlier step on this model): the same padded storage, seen whole
        return (c0.weight.data.as_strided((Vp, D), (D, 1)),
                audio.data.as_strided((*audio.shape[:-1], Vp), audio.stride()))
    with torch.no_grad():
        c0_pad = c0.weight.new_zeros(Vp, D)
        c0_pad[:V] = c0.weight
        c0.weight.data = c0_pad[:V]
        audio_pad = audio.new_zeros(*audio.shape[:-1], Vp)
        audio_pad[..., :V] = audio
        audio.data = audio_pad[..., :V]
    return c0_pad, audio_pad


def padded_loss(model: HeartMuLa, tokens, tokens_mask, input_tokens, muq_idx, uncond, muq_embed, rows: Rows,
                heads=None):
    """model.loss on a padded batch with host-chosen rows: (loss, loss_c0, loss_rest), no host sync. heads: the
    padded head weights of pad_frozen_heads, or None for the model's own."""
    h = model.backbone(model.embed_rows(input_tokens, tokens_mask, muq_idx, uncond, muq_embed)).flatten(0, 1)
    frames = tokens.flatten(0, 1)[:, :-1]  # [B*S, K]
    codes = frames.index_select(0, rows.c0_at + 1)
    h0 = h.index_select(0, rows.c0_at)
    V = model.audio_head.shape[-1]
    c0_logits = model.codebook0_head(h0) if heads is None else F.linear(h0, heads[0].to(h0.dtype))[:, :V]
    ce0 = F.cross_entropy(c0_logits.float(), codes[:, 0], reduction="none")
    loss_c0 = (ce0 * rows.c0_w).sum() / rows.frames
    codes = frames.index_select(0, rows.dec_at + 1)
    if heads is None:
        dec = model.depth_logits(h.index_select(0, rows.dec_at), codes).float()  # [M, K-1, V]
    else:
        out = model.depth_states(h.index_select(0, rows.dec_at), codes)
        dec = torch.einsum("nkd,kdv->nkv", out, heads[1].to(out.dtype))[..., :V].float()
    ce = F.cross_entropy(dec.flatten(0, 1), codes[:, 1:].flatten(), reduction="none").view(codes.shape[0], -1)
    loss_rest = (ce * rows.dec_w[:, None]).sum() / (rows.decoded * ce.shape[1])
    return loss_c0 + loss_rest, loss_c0, loss_rest


class _Shape:
    """Static inputs, the captured graph and its output for one padded batch shape."""

    def __init__(self, key, n_c0: int, n_dec: int, device, muq_dim: int):
        B, S, has_ref = key
        self.n_c0, self.n_dec = n_c0, n_dec  # room for loss rows (c0) and depth-decoder rows
        self.tokens = torch.zeros(B, S, 9, dtype=torch.long, device=device)
        self.input_tokens = torch.zeros_like(self.tokens)
        self.tokens_mask = torch.zeros(B, S, 9, dtype=torch.bool, device=device)
        self.uncond = torch.zeros(B, dtype=torch.bool, device=device)
        self.muq_embed = torch.zeros(B, muq_dim, device=device) if has_ref else None
        # one int and one float buffer: one host-to-device copy each per step
        self.ints = torch.zeros(B + n_c0 + n_dec, dtype=torch.long, device=device)
        self.floats = torch.zeros(n_c0 + n_dec + 3, device=device)
        self.muq_idx, c0_at, dec_at = self.ints.split([B, n_c0, n_dec])
        c0_w, dec_w, self.counts = self.floats.split([n_c0, n_dec, 3])
        self.rows = Rows(c0_at, c0_w, dec_at, dec_w, self.counts[0], self.counts[1])
        self.scale = self.counts[2]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def load(self, cpu: dict, rows: Rows, scale: float, extra: dict):
        S = cpu["tokens"].shape[1]
        pad = self.tokens.shape[1] - S
        tokens = F.pad(cpu["tokens"], (0, 0, 0, pad))
        self.tokens.copy_(tokens, non_blocking=True)
        self.tokens_mask.copy_(F.pad(cpu["tokens_mask"], (0, 0, 0, pad)), non_blocking=True)
        if "input_tokens" in extra:  # scheduled sampling: the backbone reads the model's own frames
            self.input_tokens.copy_(F.pad(extra["input_tokens"], (0, 0, 0, pad)))
        else:
            self.input_tokens.copy_(self.tokens)
        if "uncond" in extra:
            self.uncond.copy_(extra["uncond"])
        else:
            self.uncond.zero_()
        if self.muq_embed is not None:
            self.muq_embed.copy_(cpu["muq_embed"], non_blocking=True)
        c0_at, c0_w = _extend(rows.c0_at, rows.c0_w, self.n_c0)  # up to this shape's room, with weight 0
        dec_at, dec_w = _extend(rows.dec_at, rows.dec_w, self.n_dec)
        self.ints.copy_(torch.cat([cpu["muq_idx"], c0_at, dec_at]), non_blocking=True)
        counts = torch.tensor([rows.frames, rows.decoded, scale], dtype=torch.float32)
        self.floats.copy_(torch.cat([c0_w, dec_w, counts]), non_blocking=True)


class CapturedStep:
    """Forward + backward of one micro-batch: `step(cpu_batch, scale, extra)` adds scale x d(loss) to every
    parameter's .grad and returns the device tensor [loss, loss_c0, loss_rest] (read it before the next call)."""

    def __init__(self, model: HeartMuLa, params: list[torch.nn.Parameter], amp_dtype: torch.dtype | None,
                 decoder_fraction: float = 1.0, bucket: int = 64, capture: bool = True, log=print,
                 fused: bool = True):
        self.model, self.params, self.amp_dtype = model, params, amp_dtype
        self.decoder_fraction, self.bucket = decoder_fraction, bucket
        self.device = model.codebook0_head.weight.device
        self.capture = capture and self.device.type == "cuda"
        self.log = log
        self.shapes: dict[tuple, _Shape] = {}
        self.pool = None
        self.captures, self.capture_s = 0, 0.0
        # under autocast the LoRA factors are cast once per step (inside the graph), not in every layer call, and
        # their gradients added into .grad once per step, not in every layer's backward
        self.factor_copies = FactorCopies(model, amp_dtype) if amp_dtype is not None else None
        self.heads = pad_frozen_heads(model)
        if self.capture and fused:  # fused training kernels: inside a graph, fewer and larger kernels are the gain
            # (in place and kept: the model's eager calls run them too; fused=False leaves the model as it is, for
            # A/B timings against the torch ops)
            use_fused_kernels(model)
        for p in params:  # the graphs accumulate into these very tensors
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _run(self, s: _Shape) -> torch.Tensor:
        with self.factor_copies.active() if self.factor_copies is not None else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss, c0, rest = padded_loss(self.model, s.tokens, s.tokens_mask, s.input_tokens, s.muq_idx,
                                             s.uncond, s.muq_embed, s.rows, self.heads)
            (loss * s.scale).backward()
        return torch.stack([loss.detach(), c0.detach(), rest.detach()]).float()

    def _capture(self, s: _Shape):
        t0 = time.perf_counter()
        # the warm-up's gradient is undone from a copy kept in host memory: on the device it would add the LoRA's
        # size (~100 MiB at rank 16) to the warm-up's peak, often the run's peak
        saved = [p.grad.to("cpu") for p in self.params]
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: lazy initialisation, autotuning, cuBLAS workspaces
                self._run(s)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the warm-up's activations: the graph's pool gets that memory instead
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                s.out = self._run(s)
            s.graph = graph
        finally:
            with torch.no_grad():
                for p, g in zip(self.params, saved):  # undo the warm-up's gradient
                    p.grad.copy_(g)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        B, S = s.tokens.shape[:2]
        self.log(f"captured the training step for {B} x {S} rows ({s.n_c0} loss rows, {s.n_dec} depth-decoder rows) "
                 f"in {time.perf_counter() - t0:.1f} s")

    def __call__(self, cpu_batch: dict, scale: float = 1.0, extra: dict | None = None) -> torch.Tensor:
        extra = extra or {}
        B, S = cpu_batch["audio_frame_mask"].shape
        S_pad = max(S, min(round_up(S, self.bucket), self.model.cfg.backbone.max_seq_len))
        rows = plan_rows(cpu_batch["audio_frame_mask"], self.decoder_fraction, self.bucket, S_pad)
        key = (B, S_pad, "muq_embed" in cpu_batch)
        s = replaced = self.shapes.get(key)
        if s is None or s.n_c0 < rows.c0_at.numel() or s.n_dec < rows.dec_at.numel():
            # a new shape, or more loss rows than its room: (re)build it with room for both. Every shape is kept:
            # the graphs share one pool, so more shapes cost no more GPU memory
            n_c0, n_dec = max(rows.c0_at.numel(), s.n_c0 if s else 0), max(rows.dec_at.numel(), s.n_dec if s else 0)
            s = self.shapes[key] = _Shape(key, n_c0, n_dec, self.device, self.model.cfg.muq_dim)
        s.load(cpu_batch, rows, scale, extra)
        if not self.capture:
            return self._run(s)
        if s.graph is None:
            # `replaced` keeps the graph this one replaces alive until the new one is captured: if the pool's last
            # graph died while some of the pool's memory is still in use, PyTorch's allocator would refuse the pool
            # to the next capture (an internal assert, use_count > 0; seen after a validation had freed the others)
            try:
                self._capture(s)
            except RuntimeError as e:  # something in this step cannot live in a graph: say so, run it eagerly
                self.log(f"warning: the training step could not be captured in a CUDA graph ({e}); running it "
                         f"eagerly from now on (cuda_graphs: false skips the attempt)")
                self.capture = False
                self.release()
                return self._run(s)
        del replaced
        s.graph.replay()
        return s.out

    def release(self):
        """Free every graph and its memory (before validation); later calls capture again."""
        self.shapes.clear()
        self.pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
