"""LoRA: low-rank adapters on chosen linear layers, saved as PEFT-style safetensors.

y = base(x) + (alpha / r) * B(A(dropout(x))), A [r, in] kaiming-uniform, B [out, r] zero (so a fresh adapter
changes nothing). Dropout (training mode only) is seeded (kernels/dropout.py): its mask is a hash of a seed that
the trainer sets once per micro-batch (`set_dropout_seed`), the index of the layer's input and the element's
position, so gradient checkpointing recomputes the same mask without saving RNG states and a captured CUDA graph
draws a new one on every replay; layers reading one input (q/k/v, w1/w3) share its mask. The base is any module
with `in_features`, `out_features` and `forward` (nn.Linear or hmtiny.quant.Int8Linear); under autocast a frozen
nn.Linear base's matmul runs inside the adapter's autograd node (LoRAUpdate), and hmtiny.fused runs the layers of
one input as one node (LoRAGroupUpdate). A wrapped layer keeps its module path, so file keys are
`<module path>.lora_A.weight` / `.lora_B.weight`, e.g. `backbone.layers.0.attn.q_proj.lora_A.weight`.

Files written by SimpleTuner load too (Hugging Face Llama names, `self_attn.o_proj`, `mlp.gate_proj`...): a PEFT
folder (`adapter_model.safetensors`, keys `base_model.model.backbone.layers.0.self_attn.q_proj.lora_A.weight`, with
`adapter_config.json` giving r and lora_alpha) or a diffusers-packed file (`transformer.backbone...`). The prefixes
are dropped and the names mapped to ours. Adapters that are not W + scale * B @ A (DoRA, LyCORIS, per-layer rank or
alpha patterns) are refused rather than applied wrongly.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.dropout import seeded_dropout, seeded_dropout_apply

from . import quant
from .checkpoint import atomic_write

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's save_pretrained folder: these two files
PEFT_CONFIG_NAME = "adapter_config.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
# SimpleTuner's HeartMuLa port uses Hugging Face Llama module names; these are the same layers.
HF_NAMES = {"o_proj": "output_proj", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
FILE_PREFIXES = ("transformer.", "base_model.model.", "model.")
# layers that read one input tensor: their adapters share its dropout mask (LoRALinear.salt), so the fused path
# drops that input once and runs their LoRA-down matmuls as one (LoRAGroupUpdate)
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "w1": "w13", "w3": "w13"}


class DropoutSeed:
    """The seed every LoRA layer of one model reads: a one-element int32 tensor, changed in place."""

    def __init__(self, device=None):
        self.tensor = torch.zeros(1, dtype=torch.int32, device=device)

    def on(self, device: torch.device) -> torch.Tensor:
        if self.tensor.device != device:
            self.tensor = self.tensor.to(device)
        return self.tensor


class LoRALinear(nn.Module):
    """A base linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        device = _module_device(base)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout_p = float(dropout)
        # which input the layer reads (inject_lora): masks differ between inputs under one seed, and the layers
        # reading one input (q/k/v, w1/w3) draw the same mask, as if the input were dropped once for all of them
        self.salt = 0
        self.seed = DropoutSeed(device)  # inject_lora gives all layers of a model one shared seed
        self.factor_copies: tuple[torch.Tensor, torch.Tensor] | None = None  # see FactorCopies
        self.factor_grads: FactorGrads | None = None  # likewise, inside FactorCopies.active() only
        self.reset_lora()

    def reset_lora(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The dense update scaling * B @ A [out, in], float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def folded_weight(self) -> torch.Tensor | None:
        """The base's weight when LoRAUpdate runs the base matmul itself: the base is exactly nn.Linear, without
        bias or hooks of its own, and its weight is frozen. Else None and the base runs as its own module (an int8
        base, a weight that trains as in full fine-tuning, a subclass)."""
        base = self.base
        if type(base) is not nn.Linear or base.bias is not None or base.weight.requires_grad:
            return None
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        return base.weight

    def int8_base(self):
        """The base when LoRAGroupUpdate can run its matmul over the dequantised weight: an Int8Linear without
        bias or hooks of its own. Else None."""
        base = self.base
        if type(base) is not quant.Int8Linear or base.bias is not None:
            return None
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        return base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling():
            # training: one autograd node for the whole adapter (LoRAUpdate below), and for the base's matmul too
            # when the base is a frozen nn.Linear or an int8 one
            p = self.dropout_p if self.training else 0.0
            a, b = self.factor_copies if self.factor_copies is not None else (None, None)
            w = self.folded_weight()
            if w is None and self.int8_base() is not None:  # an int8 base: the group node, as a group of one,
                out = group_update((self,), x)  # runs its matmul and adds its dx into the LoRA dx
                if out is not None:
                    return out[0]
            return LoRAUpdate.apply(self.base(x) if w is None else None, x, self.lora_A.weight, self.lora_B.weight,
                                    a, b, self.scaling, self.seed.on(x.device), self.salt, p, w, self.factor_grads)
        y = self.base(x)
        h = x
        if self.training and self.dropout_p > 0:
            h = seeded_dropout(x, self.seed.on(x.device), self.salt, self.dropout_p)
        if torch.is_autocast_enabled(x.device.type):  # torch.compile traces this form
            low = F.linear(h, self.lora_A.weight).reshape(-1, self.rank)
            return torch.addmm(y.reshape(-1, y.shape[-1]), low, self.lora_B.weight.t(), alpha=self.scaling).view_as(y)
        # without autocast the adapter runs in its own (float32) dtype
        update = F.linear(F.linear(h.to(self.lora_A.weight.dtype), self.lora_A.weight), self.lora_B.weight)
        return torch.add(y, update.to(y.dtype), alpha=self.scaling)  # one kernel for scale + add

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}" + (f", dropout={self.dropout_p:g}" if self.dropout_p else "")


class LoRAUpdate(torch.autograd.Function):
    """y + scaling * B(A(dropout(x))) in y's dtype, with a hand-written backward.

    Autograd's own graph of this (casts of A and B, two matmuls, an add) costs, per layer and step, a cast back
    and a gradient-accumulation kernel for each factor on top of the matmuls; 224 adapted layers make that
    thousands of small kernels, a large part of a one-clip training step. Here the backward runs the four
    matmuls and adds each factor's gradient into its float32 `.grad` in one kernel (cast, scale and accumulate
    together), and rebuilds the dropout mask from its seed. The factors' gradients go straight into `.grad`
    (autograd sees None for them), so no gradient hook runs for A and B; the trainer uses none. Held to the
    plain composition by tests/test_lora.py.

    Folded base (y None, `weight` a frozen nn.Linear weight, LoRALinear.folded_weight): the node also runs the
    base's matmul, y = x @ weight.T in autocast's dtype (weight cast as autocast's F.linear casts it), adds the
    LoRA product into that y in place and, in the backward, adds the base's dx = g @ weight inside the LoRA dx's
    GEMM (addmm_, beta 1): one fewer full-size add kernel per layer in the backward and no second output buffer
    in the forward. The output is bit-identical to the unfolded path (the same F.linear, then the same addmm on
    the same y); dx is rounded to the compute dtype once (g @ weight + LoRA dx) where the unfolded path rounds
    g @ weight and the sum each, so the two differ by that rounding only.

    Buffered factor gradients (`grads` a FactorGrads, inside FactorCopies.active()): the backward writes the two
    factor-gradient GEMMs into the layer's buffers in the compute dtype instead of adding each into its .grad, and
    the window's exit adds every layer's at once (FactorCopies.active): a few multi-tensor kernels per step in
    place of one small kernel per factor and layer. The same bf16 products with the same alpha: the same .grad
    bits (a layer that runs twice in one window sums its two products in the buffer first, one more rounding).
    """

    @staticmethod
    def forward(ctx, y, x, A, B, a, b, scaling: float, seed, salt: int, p: float, weight=None, grads=None):
        """y: the base's output, or None with `weight`: then y = x @ weight.T is computed here (see above).
        a, b: A and B already in the compute dtype (FactorCopies), or None to cast them here.
        grads: the layer's FactorGrads inside FactorCopies.active(), or None to add into .grad in the backward."""
        if weight is not None and (y is not None or weight.requires_grad):
            raise ValueError("LoRAUpdate: a folded base weight needs y None and a frozen weight (it gets no grad)")
        # the compute dtype autocast gave (or gives) the base layer, x's own without autocast; no autocast inside
        # (explicit casts)
        dev = x.device.type
        if y is not None:
            dt = y.dtype
        else:
            dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            h = (seeded_dropout_apply(x, seed, salt, p) if p > 0 else x).to(dt)
            a, b = _compute_copy(a, A, dt), _compute_copy(b, B, dt)
            low = h.reshape(-1, h.shape[-1]) @ a.t()  # [M, r]
            if weight is None:
                out = torch.addmm(y.reshape(-1, y.shape[-1]), low, b.t(), alpha=scaling).view_as(y)
            else:
                weight = weight.to(dt)  # as autocast's F.linear: a no-op for bf16 weights, a fresh cast for float32
                out = F.linear(h if p == 0 else x.to(dt), weight)  # the very op autocast dispatches the base to
                out.view(-1, out.shape[-1]).addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(h, low, a, b, seed, weight)
        ctx.factors, ctx.scaling, ctx.salt, ctx.p, ctx.x_dtype = (A, B), scaling, salt, p, x.dtype
        ctx.folded = weight is not None
        ctx.grads = grads
        return out

    @staticmethod
    def backward(ctx, g):
        h, low, a, b, seed, weight = ctx.saved_tensors
        A, B = ctx.factors
        with torch.autocast(g.device.type, enabled=False):
            g2, h2 = g.reshape(-1, g.shape[-1]).to(h.dtype), h.reshape(-1, h.shape[-1])
            d_low = (g2 @ b).mul_(ctx.scaling)  # [M, r]
            # dB = scaling * (g2.T @ low), dA = d_low.T @ h2 (scaling is in d_low already): each product rounded
            # to the compute dtype, then added into .grad with its alpha, now or (buffered) on leaving the window
            _factor_grad(B, ctx.grads, 1, g2.t(), low, ctx.scaling)
            _factor_grad(A, ctx.grads, 0, d_low.t(), h2, 1.0)
            dx = None
            if ctx.needs_input_grad[1]:
                dx = (d_low @ a).view(h.shape)
                if ctx.p > 0:
                    dx = seeded_dropout_apply(dx, seed, ctx.salt, ctx.p)
                if ctx.folded:  # + the base's dx, g @ weight, in the same GEMM
                    dx.view(-1, dx.shape[-1]).addmm_(g2, weight)
                dx = dx.to(ctx.x_dtype)
        return None if ctx.folded else g, dx, None, None, None, None, None, None, None, None, None, None


class LoRAGroupUpdate(torch.autograd.Function):
    """Several folded LoRA layers that read the same input x (q/k/v; w1/w3) in one autograd node: each output is
    x @ W_i.T + scaling_i * B_i(A_i(dropout(x))), as LoRAUpdate computes it per layer, with the work they share
    done once: the dropout of x (the layers share its mask, LoRALinear.salt), one LoRA-down GEMM for all the A's
    stacked, and in the backward one dx buffer that every dx term is added into by GEMMs (the LoRA part, its
    dropout, then each base's g_i @ W_i through addmm_, beta 1) instead of one dx per layer summed by autograd.
    An int8 base (LoRALinear.int8_base) is dequantised to the compute dtype (hmtiny.quant.dense_weight, what its
    own product does for training's row counts) and then multiplied as a folded weight is. Factor gradients go
    where LoRAUpdate puts them (FactorGrads buffers or .grad). Layers: LoRALinear with a folded_weight or an
    int8_base, under autocast (`group_update` checks). Held to the per-layer path by tests/test_lora.py."""

    @staticmethod
    def forward(ctx, x, seed, layers, p: float, *factors):
        """factors: the layers' A and B (read from the layers; passed so that autograd runs this node's backward
        when x needs no gradient, as in the first block, whose input comes from frozen embeddings)."""
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            xd = x.to(dt)
            h = seeded_dropout_apply(x, seed, layers[0].salt, p).to(dt) if p > 0 else xd
            pairs = [m.factor_copies or (None, None) for m in layers]
            a_cat = torch.cat([_compute_copy(a, m.lora_A.weight, dt)
                               for m, (a, _) in zip(layers, pairs)])  # [sum of ranks, in]
            bs = [_compute_copy(b, m.lora_B.weight, dt) for m, (_, b) in zip(layers, pairs)]
            # per layer a dense weight in the compute dtype: the frozen nn.Linear's, or an int8 base dequantised
            int8 = [m.int8_base() is not None for m in layers]
            weights = [quant.dense_weight(m.base, dt) if q else m.folded_weight().to(dt) for m, q in zip(layers, int8)]
            low = h.reshape(-1, h.shape[-1]) @ a_cat.t()  # [M, sum of ranks]
            outs, start = [], 0
            for m, b, w in zip(layers, bs, weights):
                out = F.linear(xd, w)
                out.view(-1, out.shape[-1]).addmm_(low[:, start:start + m.rank], b.t(), alpha=m.scaling)
                outs.append(out)
                start += m.rank
        # An int8 base's dense weight is kept for the backward only under gradient checkpointing, where the
        # forward's saves are dropped and the recomputation's live just until this block's backward: the dense
        # copy then spares the backward a second dequantisation. Without checkpointing every layer's would stay
        # until the backward (a bf16 copy of the model): the backward dequantises again.
        keep_dense = any(int8) and _under_checkpoint()
        ctx.again = [q and not keep_dense for q in int8]
        ctx.save_for_backward(h, low, a_cat, seed, *bs, *[w for w, again in zip(weights, ctx.again) if not again])
        ctx.layers, ctx.p, ctx.x_dtype = layers, p, x.dtype
        ctx.grads = [m.factor_grads for m in layers]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):
        h, low, a_cat, seed, *rest = ctx.saved_tensors
        layers, n = ctx.layers, len(ctx.layers)
        bs, kept = rest[:n], iter(rest[n:])
        with torch.autocast(h.device.type, enabled=False):
            h2 = h.reshape(-1, h.shape[-1])
            g2s, d_lows, start = [], [], 0
            for m, g, b, grads in zip(layers, gs, bs, ctx.grads):
                g2 = g.reshape(-1, g.shape[-1]).to(h.dtype)
                low_i = low[:, start:start + m.rank]
                d_low = (g2 @ b).mul_(m.scaling)  # [M, r]
                _factor_grad(m.lora_B.weight, grads, 1, g2.t(), low_i, m.scaling)
                _factor_grad(m.lora_A.weight, grads, 0, d_low.t(), h2, 1.0)
                g2s.append(g2)
                d_lows.append(d_low)
                start += m.rank
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.cat(d_lows, dim=1) @ a_cat  # every layer's LoRA dx in one GEMM
                if ctx.p > 0:
                    dx = seeded_dropout_apply(dx, seed, layers[0].salt, ctx.p)
                for m, g2, again in zip(layers, g2s, ctx.again):  # + each base's dx, into the buffer
                    dx.addmm_(g2, quant.dense_weight(m.base, h.dtype) if again else next(kept))
                dx = dx.view(h.shape).to(ctx.x_dtype)
        return (dx, None, None, None) + (None,) * len(ctx.layers) * 2


def _under_checkpoint() -> bool:
    """True inside torch.utils.checkpoint (non-reentrant): saved tensors then pass through its hooks, which drop
    them after the first forward and recompute them just before the block's backward. Read from the innermost
    saved-tensor hooks (a private torch function; False where it is missing)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


def group_update(layers, x: torch.Tensor):
    """The layers' outputs for the same input x through LoRAGroupUpdate, or None where it does not apply (then
    call each layer): every layer a LoRALinear with a folded or int8 base and no hooks of its own, one dropout
    (rate, seed and salt), under autocast and outside torch.compile."""
    if not (torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()):
        return None
    if not all(isinstance(m, LoRALinear) for m in layers):
        return None
    first = layers[0]
    for m in layers:
        if (m.folded_weight() is None and m.int8_base() is None) or m._forward_hooks or m._forward_pre_hooks:
            return None
        if (m.dropout_p, m.salt, m.seed, m.training) != (first.dropout_p, first.salt, first.seed, first.training):
            return None
    p = first.dropout_p if first.training else 0.0
    factors = [w for m in layers for w in (m.lora_A.weight, m.lora_B.weight)]
    return LoRAGroupUpdate.apply(x, first.seed.on(x.device), tuple(layers), p, *factors)


class FactorGrads:
    """One layer's A and B gradients in the compute dtype, for one FactorCopies.active() window at a time.

    LoRAUpdate's backward hands its two factor-gradient GEMMs to `put`, which writes them here (torch.mm into the
    buffer; a second backward of the layer in the same window adds to it) instead of adding each into its
    float32 .grad, one small kernel per factor and layer; FactorCopies adds every written buffer to .grad when
    the window closes. Outside a window, or for a factor without a buffer, `put` declines and the backward adds
    into .grad itself."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype):
        self.params = (A, B)
        # allocated once, like FactorCopies.dst: a captured graph writes the same memory on every replay
        self.bufs = tuple(torch.empty_like(w, dtype=dtype) if w.requires_grad else None for w in (A, B))
        self.alphas = [1.0, 1.0]
        self.written = [False, False]
        self.open = False

    def put(self, i: int, m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> bool:
        """Factor i's (0: A, 1: B) gradient is alpha * (m1 @ m2): into its buffer, True; False where it cannot go
        there (no window open, no buffer, another dtype, another alpha than this window's first): the caller
        adds it into .grad."""
        buf = self.bufs[i]
        if not self.open or buf is None or buf.dtype != m1.dtype or buf.device != m1.device:
            return False
        if self.written[i]:
            if alpha != self.alphas[i]:
                return False
            buf.addmm_(m1, m2)  # the layer ran twice in this window: both contributions
        else:
            torch.mm(m1, m2, out=buf)
            self.alphas[i], self.written[i] = alpha, True
        return True


class FactorCopies:
    """Every LoRA factor of a model cast to the compute dtype once per step instead of in every layer call, and
    every factor's gradient added into .grad once per step instead of in every layer's backward.

    `with copies.active():` copies the float32 factors into persistent low-precision buffers (one multi-tensor
    copy) and lets the layers read them for the forward, checkpointing's recomputation and the backward inside
    the block. Refreshed on entry, so the copies are never stale; inside a captured CUDA graph the copy is part of
    the graph and runs on every replay. Inside the block the layers' backwards also leave their factor gradients
    in per-layer buffers in the compute dtype (FactorGrads); leaving the block adds the written ones to the
    factors' .grad (a multi-tensor cast to .grad's dtype, then one multi-tensor add per alpha), bit for bit
    what adding each into .grad in the backward gives. A block left by an exception adds nothing.
    `buffer_grads=False` keeps the backward adding into .grad itself (for A/B comparisons)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, buffer_grads: bool = True):
        self.layers = list(lora_layers(model).values())
        self.src = [w for m in self.layers for w in (m.lora_A.weight, m.lora_B.weight)]
        self.dst = [torch.empty_like(w, dtype=dtype) for w in self.src]
        self.grads = [FactorGrads(m.lora_A.weight, m.lora_B.weight, dtype) if buffer_grads else None
                      for m in self.layers]

    @contextmanager
    def active(self):
        with torch.no_grad():
            torch._foreach_copy_(self.dst, self.src)
        for m, a, b, grads in zip(self.layers, self.dst[0::2], self.dst[1::2], self.grads):
            m.factor_copies, m.factor_grads = (a, b), grads
            if grads is not None:
                grads.open, grads.written = True, [False, False]
        try:
            yield
            self._add_grads()  # not reached when the block raised
        finally:
            for m in self.layers:
                if m.factor_grads is not None:
                    m.factor_grads.open = False
                m.factor_copies = m.factor_grads = None

    def _add_grads(self):
        """Every written buffer into its factor's .grad: .grad += alpha * buffer, as _accumulate adds."""
        todo = []  # (.grad, buffer, alpha)
        with torch.no_grad():
            for grads in (g for g in self.grads if g is not None):
                for p, buf, alpha, written in zip(grads.params, grads.bufs, grads.alphas, grads.written):
                    if not written:
                        continue
                    if p.grad is None:  # as _accumulate (a copy: the buffer is reused)
                        p.grad = buf.to(p.dtype, copy=True).mul_(alpha)
                    else:
                        todo.append((p.grad, buf, alpha))
            if not todo:
                return
            # torch._foreach_add_ takes its fast path (multi-tensor kernels) only when both lists have one dtype;
            # a bf16 list into float32 .grads would add tensor by tensor. So: cast into .grad's dtype first (exact,
            # one multi-tensor copy, which takes mixed dtypes), then add per alpha (each adds grad + alpha * value)
            wide = [torch.empty_like(buf, dtype=g.dtype) for g, buf, _ in todo]
            torch._foreach_copy_(wide, [buf for _, buf, _ in todo])
            by_alpha: dict[float, tuple[list, list]] = {}
            for (g, _, alpha), w in zip(todo, wide):
                gs, ws = by_alpha.setdefault(alpha, ([], []))
                gs.append(g)
                ws.append(w)
            for alpha, (gs, ws) in by_alpha.items():
                torch._foreach_add_(gs, ws, alpha=alpha)


def _compute_copy(copy: torch.Tensor | None, w: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """A LoRA factor in the compute dtype: its FactorCopies copy when there is one in that dtype, else a cast."""
    return copy if copy is not None and copy.dtype == dt else w.to(dt)


def _factor_grad(p: torch.Tensor, grads, i: int, m1: torch.Tensor, m2: torch.Tensor, alpha: float):
    """Factor p's gradient alpha * (m1 @ m2), for a LoRA backward: into the layer's FactorGrads buffer (i: 0 = A,
    1 = B) when it takes it, else added into p.grad now. Nothing for a frozen factor."""
    if p.requires_grad and not (grads is not None and grads.put(i, m1, m2, alpha)):
        _accumulate(p, m1 @ m2, alpha)


def _accumulate(p: torch.Tensor, grad: torch.Tensor, alpha: float):
    """p.grad += alpha * grad in p's dtype: one kernel when .grad exists (the trainer keeps it allocated)."""
    if p.grad is None:
        p.grad = grad.to(p.dtype).mul_(alpha)
    else:
        p.grad.add_(grad, alpha=alpha)


def _module_device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------- choosing and wrapping layers
def normalize_targets(targets) -> list[str]:
    """Config value (list or comma-separated string) -> our layer names; HF Llama names are accepted."""
    if targets is None:
        return list(DEFAULT_TARGETS)
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    out = []
    for t in targets:
        parts = str(t).split(".")
        parts[-1] = HF_NAMES.get(parts[-1], parts[-1])
        parts = ["attn" if p == "self_attn" else p for p in parts]
        out.append(".".join(parts))
    if not out:
        raise ValueError("lora_target_modules is empty")
    return out


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA can wrap (anything linear-shaped), by path; LoRA internals excluded."""
    found, skip = {}, set()
    for path, m in model.named_modules():
        if any(path.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, LoRALinear):
            skip.add(path)
            continue
        if path and hasattr(m, "in_features") and hasattr(m, "out_features"):
            found[path] = m
    return found


def target_paths(model: nn.Module, targets) -> list[str]:
    """The module paths selected by `targets`; an entry that selects nothing is an error."""
    targets = normalize_targets(targets)
    layers = linear_layers(model)
    chosen = []
    for t in targets:
        hits = [p for p in layers if _matches(p, t)]
        if not hits:
            names = sorted({p.rsplit(".", 1)[-1] for p in layers})
            raise ValueError(f"lora_target_modules entry {t!r} matches no linear layer of the model; "
                             f"layer names are {names} (or dotted paths such as 'decoder.layers.0.attn.q_proj')")
        chosen += [p for p in hits if p not in chosen]
    return sorted(chosen, key=list(layers).index)


def _set_module(model: nn.Module, path: str, module: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def inject_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                targets=None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Wrap the target layers in place (alpha None = rank). Returns the wrapped paths. Seed torch first for a
    reproducible A init."""
    if lora_layers(model):
        raise ValueError("the model already carries LoRA layers")
    alpha = float(rank if alpha is None else alpha)
    paths = target_paths(model, targets)
    seed, salts = None, {}
    for p in paths:
        layer = LoRALinear(model.get_submodule(p), rank, alpha, dropout, dtype)
        seed = seed or layer.seed
        layer.salt, layer.seed = salts.setdefault(input_group(p), len(salts)), seed
        _set_module(model, p, layer)
    return paths


def input_group(path: str) -> tuple[str, str]:
    """Which input a layer reads: layers of one module reading the same tensor (q/k/v; w1/w3) share a group."""
    parent, _, name = path.rpartition(".")
    return parent, SHARED_INPUT.get(name, name)


def set_dropout_seed(model: nn.Module, seed: int):
    """The seed of the model's LoRA dropout masks, for the next forward (and its recomputation/backward). In
    place, no host sync: a captured graph reads the new value on its next replay."""
    seeds = {id(m.seed): m.seed for m in lora_layers(model).values()}
    for s in seeds.values():
        s.tensor.fill_(seed & 0x7FFFFFFF)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def mark_only_lora_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every base weight; the LoRA matrices are the only parameters that get gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for path, m in lora_layers(model).items():
        out[f"{path}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{path}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the base layers back, dropping the adapters."""
    for path, m in lora_layers(model).items():
        _set_module(model, path, m.base)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its dense base weight (W += scaling * B @ A) and unwrap: the plain model
    runs at full speed. An int8 base cannot absorb a float update exactly: keep those unmerged."""
    for path, m in lora_layers(model).items():
        w = getattr(m.base, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError(f"cannot merge LoRA into {path}: its base ({type(m.base).__name__}) has no float "
                             f"weight (an int8 base keeps adapters unmerged; see apply_loras)")
        with torch.no_grad():
            w.copy_((w.float() + m.delta_weight().to(w.device)).to(w.dtype))
        _set_module(model, path, m.base)
    return model


# ---------------------------------------------------------------- files
def _metadata(rank: int, alpha: float, targets: list[str], extra: dict | None) -> dict[str, str]:
    meta = {"format": "pt", "lora_rank": str(rank), "lora_alpha": repr(float(alpha)),
            "lora_target_modules": json.dumps(targets), "model_family": "heartmula",
            # the PEFT config as diffusers stores it, so other tools read rank/alpha too
            "lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": alpha, "target_modules": targets})}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def save_lora(model: nn.Module, path: str | Path, targets=None, metadata: dict | None = None) -> Path:
    """Write the adapters (float32) atomically. `path` may be a folder: then pytorch_lora_weights.safetensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_WEIGHTS_NAME
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    ranks = {m.rank for m in layers.values()}
    alphas = {m.alpha for m in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError("save_lora expects one rank and alpha for every layer")
    rank, alpha = ranks.pop(), alphas.pop()
    state = {k: v.float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if targets is None:  # the layer names actually adapted (the keys list every module exactly)
        leaves = {p.rsplit(".", 1)[-1] for p in layers}
        targets = [t for t in DEFAULT_TARGETS if t in leaves] + sorted(leaves - set(DEFAULT_TARGETS))
    meta = _metadata(rank, alpha, normalize_targets(targets), metadata)
    atomic_write(path, lambda p: save_file(state, str(p), metadata=meta))
    return path


@dataclass
class LoRAWeights:
    """A LoRA file read into memory: per module path (our names) A [r,in], B [out,r] and scaling alpha/r."""
    path: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int
    alpha: float
    targets: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _our_module_path(key_module: str) -> str:
    stripped = True
    while stripped:  # e.g. 'transformer.base_model.model.backbone...': none of our paths starts with these
        stripped = False
        for prefix in FILE_PREFIXES:
            if key_module.startswith(prefix):
                key_module, stripped = key_module[len(prefix):], True
    parts = key_module.split(".")
    parts = ["attn" if p == "self_attn" else HF_NAMES.get(p, p) for p in parts]
    return ".".join(parts)


def _meta_number(meta: dict, name: str) -> float | None:
    if name in meta:
        return float(meta[name])
    packed = meta.get("lora_adapter_metadata")
    if packed:
        try:
            d = json.loads(packed)
        except json.JSONDecodeError:
            return None
        for k, v in d.items():  # diffusers packs the PEFT config under 'transformer.' keys
            if (k == name or k.endswith("." + name)) and isinstance(v, (int, float)):
                return float(v)
    return None


def split_lora_spec(spec: str) -> tuple[str, float]:
    """A command line's `PATH[:SCALE]` -> (PATH, SCALE); a path that exists as given keeps its colons."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def lora_file(path: str | Path) -> Path:
    """The weights file of a LoRA given as a file or a folder (PEFT's adapter_model.safetensors, else ours)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (PEFT_WEIGHTS_NAME, LORA_WEIGHTS_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"LoRA folder {path} holds neither {PEFT_WEIGHTS_NAME} (a PEFT adapter) nor "
                                f"{LORA_WEIGHTS_NAME}")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return path


def read_peft_config(weights: Path) -> dict | None:
    """adapter_config.json beside a PEFT adapter_model.safetensors, checked: only adapters that act exactly as
    W + scale * B @ A pass (scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora)."""
    path = weights.parent / PEFT_CONFIG_NAME
    if weights.name != PEFT_WEIGHTS_NAME or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"LoRA config {path} is not readable JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"LoRA config {path} must hold a JSON object")
    kind = str(cfg.get("peft_type") or "LORA").upper()
    if kind != "LORA":
        raise ValueError(f"LoRA config {path}: peft_type {kind!r} (LyCORIS-style adapter) is not supported: "
                         f"only plain LoRA applies here")
    refused = {"use_dora": "DoRA (use_dora) rescales every output by a learned magnitude, which a plain LoRA update "
                           "cannot express",
               "rank_pattern": "per-layer ranks (rank_pattern) are not supported",
               "alpha_pattern": "per-layer alphas (alpha_pattern) are not supported",
               "fan_in_fan_out": "fan_in_fan_out weights (Conv1D layers) do not fit these linear layers"}
    for key, why in refused.items():
        if cfg.get(key):
            raise ValueError(f"LoRA config {path}: {why}; retrain or convert it to a plain LoRA")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ValueError(f"LoRA config {path}: {key} must be a number > 0, got {cfg.get(key)!r}")
    return cfg


def _refuse_unknown_tensor(path: Path, key: str):
    if "magnitude" in key:
        why = "DoRA adapters (lora_magnitude_vector) are not supported"
    elif any(tag in key for tag in ("hada_", "lokr_", "oft_", "boft_", "lora_mid", ".dora_scale")):
        why = "LyCORIS adapters (LoHa, LoKr, OFT...) are not supported: only plain LoRA"
    else:
        why = "expected '<module>.lora_A.weight' / '<module>.lora_B.weight'"
    raise ValueError(f"LoRA file {path}: unexpected tensor {key!r} ({why})")


def read_lora(path: str | Path) -> LoRAWeights:
    """Load a LoRA (ours, a PEFT folder or file, SimpleTuner's) without touching any model. A folder means its
    adapter_model.safetensors + adapter_config.json, else its pytorch_lora_weights.safetensors."""
    path = lora_file(path)
    peft = read_peft_config(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"LoRA file {path} is not a readable safetensors file: {e}") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for tag, slot in ((".lora_A.", "A"), (".lora_B.", "B"), (".lora_down.", "A"), (".lora_up.", "B")):
            if tag in key:
                module = key.split(tag)[0]
                pairs.setdefault(_our_module_path(module), {})[slot] = t
                break
        else:
            if key.endswith(".alpha"):
                pairs.setdefault(_our_module_path(key[: -len(".alpha")]), {})["alpha"] = t
            else:
                _refuse_unknown_tensor(path, key)
    if not pairs:
        raise ValueError(f"LoRA file {path} holds no LoRA tensors")
    try:
        file_alpha = float(peft["lora_alpha"]) if peft else _meta_number(meta, "lora_alpha")
    except (TypeError, ValueError):
        source = f"{PEFT_CONFIG_NAME} lora_alpha {peft.get('lora_alpha')!r}" if peft else \
            f"metadata lora_alpha {meta.get('lora_alpha')!r}"
        raise ValueError(f"LoRA file {path}: {source} is not a number") from None
    rslora = bool(peft and peft.get("use_rslora"))
    modules, ranks = {}, set()
    for module, d in pairs.items():
        if "A" not in d or "B" not in d:
            raise ValueError(f"LoRA file {path}: module {module} lacks lora_{'A' if 'A' not in d else 'B'}")
        a, b = d["A"], d["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA file {path}: module {module} has inconsistent shapes A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}")
        r = a.shape[0]
        if peft and r != peft["r"]:
            raise ValueError(f"LoRA file {path}: module {module} has rank {r} but {PEFT_CONFIG_NAME} says "
                             f"r = {peft['r']}")
        ranks.add(r)
        # alpha: per-module tensor (kohya style), else the file's config/metadata, else alpha = rank (SimpleTuner's
        # default)
        alpha = float(d["alpha"]) if "alpha" in d else (file_alpha if file_alpha is not None else float(r))
        # alpha 0 would silently zero the adapter, NaN/inf would turn every generated token into garbage
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA file {path}: module {module} has alpha {alpha:g}; it must be a finite number "
                             f"> 0 (the file's lora_alpha metadata or its .alpha tensor)")
        for name, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t).all():
                raise ValueError(f"LoRA file {path}: {module}.{name} holds NaN or infinite values "
                                 f"(a diverged training run?)")
        modules[module] = (a, b, alpha / (math.sqrt(r) if rslora else r))
    rank = max(ranks)
    if peft:
        targets = peft.get("target_modules") or []
        if isinstance(targets, str):  # PEFT also takes one regular expression
            targets = [targets]
        else:
            targets = normalize_targets(targets) if targets else []
        meta = {**meta, "peft_config": json.dumps(peft)}
    else:
        targets = json.loads(meta["lora_target_modules"]) if "lora_target_modules" in meta else []
    return LoRAWeights(str(path), modules, rank, file_alpha if file_alpha is not None else float(rank), targets, meta)


def load_lora_into(model: nn.Module, lora: LoRAWeights | str | Path):
    """Copy a file's adapters into a model that already carries LoRA layers (init_lora, resume). The file must
    cover exactly the model's adapted layers with the same rank; a different alpha is folded into B."""
    if not isinstance(lora, LoRAWeights):
        lora = read_lora(lora)
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(lora.modules))
    extra = sorted(set(lora.modules) - set(layers))
    if missing or extra:
        lines = [f"LoRA file {lora.path} does not match this run's LoRA layers "
                 f"(lora_target_modules / model size):"]
        if missing:
            lines.append(f"  layers without weights in the file ({len(missing)}): {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
        if extra:
            lines.append(f"  file weights for layers this run does not adapt ({len(extra)}): {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")
        raise ValueError("\n".join(lines))
    for path, m in layers.items():
        a, b, scaling = lora.modules[path]
        if a.shape != m.lora_A.weight.shape or b.shape != m.lora_B.weight.shape:
            raise ValueError(f"LoRA file {lora.path}: {path} has rank {a.shape[0]} and shapes A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}, but this run uses lora_rank {m.rank} "
                             f"(A {tuple(m.lora_A.weight.shape)}, B {tuple(m.lora_B.weight.shape)})")
        with torch.no_grad():
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b.float() * (scaling / m.scaling))


def apply_loras(model: nn.Module, loras, merge: bool | None = None,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Apply several LoRA files to a plain model, each with a strength: `loras` = [(path or LoRAWeights, scale)].

    merge True: fold into dense base weights (fastest inference). merge False: keep one adapter per layer whose
    rank is the sum of the files' ranks (A stacked, B scaled and concatenated): exactly the sum of the scaled
    updates, and the only option for an int8 base. None: merge when every adapted layer has a float weight.
    dtype: of the unmerged adapters."""
    if lora_layers(model):
        raise ValueError("apply_loras expects a model without LoRA layers (merge or remove them first)")
    loaded = [(l if isinstance(l, LoRAWeights) else read_lora(l), float(s)) for l, s in loras]
    layers = linear_layers(model)
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lw, scale in loaded:
        unknown = sorted(set(lw.modules) - set(layers))
        if unknown:
            raise ValueError(f"LoRA file {lw.path} adapts layers this model does not have: {unknown[:8]}")
        for path, (a, b, scaling) in lw.modules.items():
            base = layers[path]
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise ValueError(f"LoRA file {lw.path}: {path} is {b.shape[0]}x{a.shape[1]} but the model's layer "
                                 f"is {base.out_features}x{base.in_features} (a LoRA for another model size?)")
            per_layer.setdefault(path, []).append((a.float(), b.float() * (scaling * scale)))
    if merge is None:
        merge = all(isinstance(getattr(layers[p], "weight", None), torch.Tensor)
                    and layers[p].weight.is_floating_point() for p in per_layer)
    for path, parts in per_layer.items():
        base = layers[path]
        a = torch.cat([p[0] for p in parts], 0)
        b = torch.cat([p[1] for p in parts], 1)
        if merge:
            w = base.weight
            with torch.no_grad():
                w.copy_((w.float() + (b @ a).to(w.device)).to(w.dtype))
        else:
            wrapped = LoRALinear(base, a.shape[0], float(a.shape[0]), dtype=dtype)  # scaling 1: folded into B
            with torch.no_grad():
                wrapped.lora_A.weight.copy_(a)
                wrapped.lora_B.weight.copy_(b)
            wrapped.requires_grad_(False)
            _set_module(model, path, wrapped)
    return model
