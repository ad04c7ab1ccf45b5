"""int8 weight-only quantisation of the frozen base model (W8A16).

Each target nn.Linear becomes an Int8Linear: int8 weight [N, K] + fp32 scale, symmetric, one scale per output
channel (or per group of `group_size` inputs). Activations stay bf16/fp16/fp32; on CUDA the matmul runs in the
Triton kernels of kernels/int8_matmul.py (the weight is dequantised in registers), elsewhere in plain torch.
Weights are frozen buffers; backward flows to the input only (dx = dy @ W), which is what LoRA training needs.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from kernels import int8_matmul as K

# Every linear of both transformer stacks. Embeddings, codebook0_head, audio_head, projection and muq_linear stay
# in high precision (they are small next to the stacks, and the heads feed the logits directly).
DEFAULT_TARGETS = tuple(f"{stack}.layers.*.{leaf}" for stack in ("backbone", "decoder")
                        for leaf in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj",
                                     "mlp.w1", "mlp.w2", "mlp.w3"))

def quantize_weight(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: w [N, K] -> (q int8 [N, K], scale fp32 [N] or [N, K // group_size]), w ~= q * scale."""
    n, k = w.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"group_size {g} does not divide in_features {k}")
    wf = w.detach().float().view(n, k // g, g)
    scale = wf.abs().amax(dim=-1) / 127.0
    q = torch.round(wf / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(n, k), (scale[:, 0] if group_size is None else scale)


def use_triton(x: torch.Tensor, group_size: int | None) -> bool:
    """Triton on CUDA for bf16/fp16 per-channel weights; HMTINY_INT8_TRITON=1 forces it (tests, TRITON_INTERPRET=1)."""
    if K.triton is None or group_size is not None or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return x.is_cuda or K.switches.int8_triton_off_cuda()


def dense_weight(layer: "Int8Linear", dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's weight dequantised to `dtype` (into `out` when given), one pass over the int8 weight: what its
    product multiplies by for training's row counts (kernels/int8_matmul.py's dequantise regime), and on the CPU
    for any."""
    return K.dequantize(layer.weight, layer.scale, dtype, out)


class Int8Matmul(torch.autograd.Function):
    """y = x @ W.T with W = q * scale frozen: backward returns dx only, and saves no activation."""

    @staticmethod
    def forward(ctx, x, weight, scale, group_size):
        ctx.save_for_backward(weight, scale)  # buffers: references, no copy
        ctx.group_size = group_size
        if use_triton(x, group_size):
            return K.int8_matmul(x, weight, scale)
        return K.int8_matmul_ref(x, weight, scale)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight, scale = ctx.saved_tensors
        if use_triton(dy, ctx.group_size):
            dx = K.int8_matmul_dx(dy, weight, scale)
        else:
            dx = K.int8_matmul_dx_ref(dy, weight, scale)
        return dx, None, None, None


class Int8Linear(nn.Module):
    """A frozen linear layer with an int8 weight [out, in] and fp32 scales [out] (or [out, in // group_size])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "Int8Linear":
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, device=w.device)
        if not w.is_meta:
            mod.weight, mod.scale = quantize_weight(w, group_size)
            if linear.bias is not None:
                mod.bias = linear.bias.detach().clone()
        return mod

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The dense weight q * scale [out, in] (for merging LoRA, references, export)."""
        return K.dequantize_ref(self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # behave like nn.Linear under autocast: compute in the autocast dtype
            with torch.autocast(dev, enabled=False):
                return self._product(x.to(torch.get_autocast_dtype(dev)))
        return self._product(x)  # (no autocast context to enter: a LoRA step makes hundreds of these calls)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        y = Int8Matmul.apply(x, self.weight, self.scale, self.group_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {g}"


def _matching(model: nn.Module, targets) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))]
    unmatched = [t for t in targets if not any(fnmatch.fnmatchcase(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"quantisation targets match no linear layer: {unmatched}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, t) for t in targets)]


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def quantize_model(model: nn.Module, targets=DEFAULT_TARGETS, group_size: int | None = None) -> nn.Module:
    """Replace, in place, every nn.Linear whose module name matches a pattern of `targets` (fnmatch, e.g.
    "backbone.layers.*.mlp.w1") by an Int8Linear. One layer at a time, so peak memory grows by one layer only."""
    for name in _matching(model, targets):
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear):
            _replace(model, name, Int8Linear.from_linear(linear, group_size))
    return model


def quantize_on_load(model: nn.Module, device, targets=DEFAULT_TARGETS, group_size: int | None = None):
    """A `transform(name, tensor)` for checkpoint.load_weights that quantises target weights as they are read.

    `model` is built on the meta device. When a target's weight arrives it is quantised on `device`, the meta
    nn.Linear is swapped for an Int8Linear holding the scale, and the int8 tensor is returned for assignment:
    neither host nor GPU ever holds more than one dense weight."""
    weight_keys = {f"{n}.weight": n for n in _matching(model, targets)}

    def transform(key: str, tensor: torch.Tensor) -> torch.Tensor:
        name = weight_keys.get(key)
        if name is None:
            return tensor
        linear = model.get_submodule(name)
        if tuple(tensor.shape) != (linear.out_features, linear.in_features):
            return tensor  # load_weights reports the mismatch
        q, scale = quantize_weight(tensor.to(device), group_size)
        mod = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, group_size, device="meta")
        mod.scale = scale
        if linear.bias is not None and not linear.bias.is_meta:  # the bias may have been read first
            mod.bias = linear.bias.detach()
        _replace(model, name, mod)
        return q

    return transform


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace, in place, every Int8Linear by an nn.Linear holding q * scale in `dtype` (the inverse of
    quantize_model, up to the int8 rounding): a float update such as a merged LoRA needs a float weight."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int8Linear):
            dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              device=mod.weight.device, dtype=dtype)
            dense.weight.copy_(mod.dequantize(dtype))
            if mod.bias is not None:
                dense.bias.copy_(mod.bias)
            _replace(model, name, dense)
    return model
