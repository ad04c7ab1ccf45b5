"""ScalarModel decoder: latent [B, 128, T] at 25 Hz -> waveform [B, 1, T*1920] at 48 kHz.

round(9x)/9 quantiser -> look-ahead conv (not causal) -> 5 up-sampling blocks (causal transposed conv, then
5 dilated residual units with PReLU) -> post-processor (each step repeated num_samples times, causal conv,
PReLU) -> final causal conv to one band. The checkpoint stores most convs weight-normed; they are folded
into plain weights once at load time (see weights.py), so the forward pass is plain convolutions.
Attribute names equal the checkpoint's keys (`decoder.N...`); the encoder is not built.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def weight_normed(module: nn.Module) -> nn.Module:
    """Mark a conv whose checkpoint weight is stored as (g, v) parametrizations."""
    module.weight_normed = True
    return module


class CausalConv1d(nn.Conv1d):
    """Left padding dilation*(k-1): output t sees inputs <= t."""

    def __init__(self, cin: int, cout: int, kernel_size: int, dilation: int = 1):
        super().__init__(cin, cout, kernel_size, dilation=dilation)
        self.left = dilation * (kernel_size - 1)

    def forward(self, x):
        return super().forward(F.pad(x, (self.left, 0)) if self.left else x)


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Kernel 2*stride; the last `stride` outputs (which would need the future) are dropped."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, 2 * stride, stride=stride)

    def forward(self, x):
        return super().forward(x)[..., : -self.stride[0]]


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int, kernel_size: int):
        super().__init__()
        self.conv1 = weight_normed(CausalConv1d(channels, channels, kernel_size, dilation))
        self.conv2 = weight_normed(CausalConv1d(channels, channels, 1))
        self.activation1 = nn.PReLU()
        self.activation2 = nn.PReLU()

    def forward(self, x):
        return x + self.activation2(self.conv2(self.activation1(self.conv1(x))))


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = weight_normed(CausalConvTranspose1d(cin, cout, stride))

    def forward(self, x):
        return self.layer(x)  # no activation in the decoder's up-sampling


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, res_kernel_size: int):
        super().__init__()
        self.up_conv = Upsample(cin, cout, stride)
        self.convs = nn.ModuleList(ResidualUnit(cout, d, res_kernel_size) for d in (1, 3, 5, 7, 9))

    def forward(self, x):
        x = self.up_conv(x)
        for unit in self.convs:
            x = unit(x)
        return x


class PostProcessor(nn.Module):
    def __init__(self, channels: int, num_samples: int, kernel_size: int):
        super().__init__()
        self.num_samples = num_samples
        self.conv = CausalConv1d(channels, channels, kernel_size)  # plain weight in the checkpoint
        self.activation = nn.PReLU()

    def forward(self, x):
        return self.activation(self.conv(x.repeat_interleave(self.num_samples, dim=-1)))


def quantise(x: torch.Tensor) -> torch.Tensor:
    """The latent quantiser: round(9x)/9, round half to even."""
    return torch.round(9 * x) / 9


def decoder_channels(cfg) -> list[int]:
    """Channels into the first up-sampling block, then out of each: 2048, 1024, ..., 64 for the release."""
    n = len(cfg.upsample_factors)
    return [cfg.init_channel * 2 ** (n - i) for i in range(n + 1)]


class ScalarDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch = decoder_channels(cfg)
        k = cfg.delay_kernel_size
        layers: list[nn.Module] = [weight_normed(nn.Conv1d(cfg.latent_hidden_dim, ch[0], k, padding=(k - 1) // 2))]
        layers += [DecoderBlock(ch[i], ch[i + 1], s, cfg.res_kernel_size) for i, s in enumerate(cfg.upsample_factors)]
        if cfg.num_samples > 1:
            layers.append(PostProcessor(ch[-1], cfg.num_samples, cfg.default_kernel_size))
        layers.append(weight_normed(CausalConv1d(ch[-1], cfg.num_bands, cfg.default_kernel_size)))
        self.decoder = nn.ModuleList(layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, latent_hidden_dim, T] (any float dtype) -> [B, 1, T * samples_per_latent]."""
        x = quantise(latent.float()).to(self.decoder[0].weight.dtype)
        for layer in self.decoder:
            x = layer(x)
        return x
