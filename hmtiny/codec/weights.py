"""HeartCodec checkpoint layout: which stored keys we use, weight-norm folding both ways, random init.

The official checkpoint stores weight-normed convs as PyTorch parametrizations
(`<conv>.parametrizations.weight.original0` = g [dim0, 1, 1], `original1` = v; weight = g * v / ||v||,
norm over every dim but 0, which for a transposed conv is its INPUT channel). We fold them into plain
`<conv>.weight` once when loading, and unfold (g = ||w||, v = w) when saving, so our files keep the
official layout.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import open_safetensors, weight_files

WN_G = ".parametrizations.weight.original0"
WN_V = ".parametrizations.weight.original1"

# Stored but not needed to decode: the ScalarModel encoder, the RVQ's training state and input projection,
# and the "no condition" vector (used only for latent frames past the window, which our windows never have).
UNUSED = re.compile(r"^scalar_model\.encoder\."
                    r"|^flow_matching\.vq_embed\.project_in\."
                    r"|^flow_matching\.vq_embed\.layers\.\d+\._codebook\.(embed_avg|cluster_size|initted)$"
                    r"|^flow_matching\.zero_cond_embedding1$")


def is_unused(key: str) -> bool:
    return UNUSED.search(key) is not None


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v|| (float32, as the reference evaluates it every forward)."""
    v = v.float()
    return v * (g.float() / _norm_except_dim0(v))


def unfold_weight_norm(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, v) with g * v / ||v|| == w: g = ||w||, v = w."""
    return _norm_except_dim0(w.float()).to(w.dtype), w


def weight_norm_gains(folder: Path) -> dict[str, torch.Tensor]:
    """First pass: the small g tensors, keyed by the plain weight name they fold into."""
    gains = {}
    for f in weight_files(folder):
        with open_safetensors(f) as sf:
            for key in sf.keys():
                if key.endswith(WN_G) and not is_unused(key):
                    gains[key[: -len(WN_G)] + ".weight"] = sf.get_tensor(key)
    return gains


def loader_hooks(folder: Path):
    """(rename, transform, ignore) for hmtiny.checkpoint.load_weights."""
    gains = weight_norm_gains(folder)

    def rename(key: str) -> str | None:
        if key.endswith(WN_G):
            return None  # read in the first pass
        if key.endswith(WN_V):
            name = key[: -len(WN_V)] + ".weight"
            if name not in gains:
                raise ValueError(f"{key} has no matching {key[: -len(WN_V)] + WN_G} (weight-norm gain) in {folder}")
            return name
        return key

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        g = gains.get(name)  # read on the CPU; v may have been read onto the GPU
        return fold_weight_norm(g.to(tensor.device), tensor) if g is not None else tensor

    return rename, transform, is_unused


def weight_normed_names(module: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in module.named_modules() if getattr(m, "weight_normed", False)}


def official_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights with weight-normed convs written back as parametrizations."""
    wn = weight_normed_names(module)
    out = {}
    for name, tensor in module.state_dict().items():
        if name in wn:
            g, v = unfold_weight_norm(tensor)
            base = name[: -len(".weight")]
            out[base + WN_G], out[base + WN_V] = g, v
        else:
            out[name] = tensor
    return out


@torch.no_grad()
def init_random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations O(1) (the scheme the fixtures use); deterministic per seed.

    Weight-normed convs get w = g * v/||v|| with g = 0.6 + 0.15 N, v = N; linear/conv weights N/sqrt(fan_in),
    biases 0.1 N, RMSNorm gains 1 + 0.1 N, scale-shift tables N/sqrt(width), PReLU slopes 0.25 + 0.05 N,
    codebooks N.
    """
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    wn = weight_normed_names(module)

    def normal(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name in wn:
            g = 0.6 + 0.15 * normal((p.shape[0],) + (1,) * (p.dim() - 1))
            value = fold_weight_norm(g, normal(p.shape))
        elif leaf == "embed":
            value = normal(p.shape)
        elif "scale_shift_table" in leaf:
            value = normal(p.shape) / p.shape[-1] ** 0.5
        elif "activation" in name:  # PReLU slope
            value = 0.25 + 0.05 * normal(p.shape)
        elif name.endswith("norm.weight"):
            value = 1 + 0.1 * normal(p.shape)
        elif leaf == "bias":
            value = 0.1 * normal(p.shape)
        else:
            fan_in = p.shape[1] * (p.shape[2] if p.dim() == 3 else 1)
            value = normal(p.shape) / fan_in ** 0.5
        p.copy_(value.to(p.dtype))
    return module
