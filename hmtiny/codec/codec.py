"""HeartCodec (decoder side): audio codes [8, T] at 12.5 Hz -> stereo 48 kHz waveform.

codes -> residual-VQ lookup -> cond_feature_emb -> x2 nearest up-sampling (25 Hz) -> flow matching
(Euler + CFG over the DiT estimator) per window -> latent [L, 256] = 2 x 128 channels -> ScalarModel ->
overlap-added windows.

`detokenize` reproduces the reference's windowing, noise-draw order and cross-fade exactly, with one
deliberate difference: the reference decides whether to pad the codes by testing (len - 2*overlap) % hop
but pads to a multiple of hop plus ONE overlap, so lengths where len - 2*overlap is a multiple of hop
(e.g. 424 codes at the default window) silently lose their last `overlap` codes. We test
(len - overlap) % hop instead: identical for every other length, and for those lengths one more window is
decoded so every code reaches the output.

Speed (vs the reference): weight norm folded once, CFG pair in one estimator call (as the reference),
SDPA attention, the estimator replayed as a CUDA graph, optional bf16 weights with float32
norms/ODE state, cross-fade on the device, one host copy at the end.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import device as device_rules
from ..checkpoint import (CODEC_SUBFOLDERS, build_empty, find_model_folder, load_weights, resolve_folder, save_json,
                          save_weights)
from .config import FRAME_RATE, HeartCodecConfig
from .estimator import Estimator
from .flow import solve_euler
from .graph import GraphedEstimator
from .precision import tf32_math
from .scalar import ScalarDecoder
from .vq import ResidualLookup
from .weights import init_random_, loader_hooks, official_state_dict

DEFAULT_WINDOW_CODES = 372  # 29.76 s windows, as the reference's default duration


@dataclass(frozen=True)
class WindowPlan:
    """How detokenize cuts T codes into windows (all in codes unless named *_frames / *_samples)."""
    num_codes: int           # T, the caller's codes
    window: int              # codes per window (372)
    hop: int                 # window // 93 * 80 (320)
    overlap: int             # window - hop (52)
    padded_len: int          # codes after tiling (code i comes from i % T)
    starts: tuple[int, ...]  # first code of every window
    window_samples: int      # audio samples kept per window
    hop_samples: int
    overlap_samples: int
    target_len: int          # output samples: int(T / 12.5 * sample_rate)

    @property
    def latent_frames(self) -> int:
        return 2 * self.window

    @property
    def overlap_frames(self) -> int:
        return 2 * self.overlap

    @property
    def covered_codes(self) -> int:
        return self.starts[-1] + self.window


def plan_windows(num_codes: int, window: int = DEFAULT_WINDOW_CODES, sample_rate: int = 48000,
                 fix_lost_codes: bool = True) -> WindowPlan:
    """The reference's window arithmetic (fix_lost_codes=False reproduces its lost-codes bug)."""
    if window < 93 or window % 93:
        raise ValueError(f"window must be a positive multiple of 93 codes (7.44 s), got {window}")
    hop = window // 93 * 80
    overlap = window - hop
    length = max(num_codes, window)  # short inputs are tiled up to one window
    test = length - overlap if fix_lost_codes else length - 2 * overlap
    if test % hop > 0:
        length = math.ceil((length - overlap) / hop) * hop + overlap
    starts = tuple(range(0, length - hop + 1, hop))
    window_samples = int(window / FRAME_RATE * sample_rate)
    hop_samples = window_samples // 93 * 80
    return WindowPlan(num_codes, window, hop, overlap, length, starts, window_samples, hop_samples,
                      window_samples - hop_samples, int(num_codes / FRAME_RATE * sample_rate))


def draw_noise(plan: WindowPlan, channels: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Every randn the reference makes, in its order (float32, on the generator's device or the CPU
    default generator); returns the initial noise of each window, the other draws are discarded."""
    device = generator.device if generator is not None else "cpu"

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)

    frames = plan.latent_frames
    randn(1, frames, 256)  # the reference's "first latent": hard-coded 256 channels, multiplied by 0
    noise = [randn(1, frames, channels)]
    for _ in plan.starts[1:]:
        randn(1, frames - plan.overlap_frames, channels)  # pads the in-context latents; masked out
        noise.append(randn(1, frames, channels))
    return noise


def crossfade_windows(windows: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """windows [n, channels, window_samples] -> [channels, target_len]: each window's first overlap blends
    linearly into the previous output (old*(1-w) + new*w, w = linspace(0, 1) in float64, stored float32; float32
    on MPS, which has no float64)."""
    n, channels, _ = windows.shape
    hop, ov = plan.hop_samples, plan.overlap_samples
    out = torch.empty(channels, hop * (n - 1) + plan.window_samples, dtype=torch.float32, device=windows.device)
    out[:, : plan.window_samples] = windows[0]
    exact = device_rules.supports_float64(windows.device)  # numpy's float64 values, float32 on MPS
    w = torch.from_numpy(np.linspace(0, 1, ov, dtype=np.float64 if exact else np.float32)).to(windows.device)
    for i in range(1, n):
        s = i * hop
        out[:, s: s + ov] = out[:, s: s + ov] * (1 - w) + windows[i, :, :ov] * w
        out[:, s + ov: s + plan.window_samples] = windows[i, :, ov:]
    return out[:, : plan.target_len]  # shorter than target_len only in the reference's lossy plan


class FlowMatching(nn.Module):
    """Codes -> condition, and the estimator (names as in the checkpoint's `flow_matching.`)."""

    def __init__(self, cfg: HeartCodecConfig):
        super().__init__()
        self.vq_embed = ResidualLookup(cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim, cfg.dim)
        self.cond_feature_emb = nn.Linear(cfg.dim, cfg.dim)
        self.estimator = Estimator(cfg.in_channels, cfg.out_channels, cfg.num_attention_heads,
                                   cfg.attention_head_dim, cfg.num_layers, cfg.num_layers_2)

    def condition(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, T] -> float32 condition [B, 2T, dim] at 25 Hz (each frame repeated twice)."""
        return self.cond_feature_emb(self.vq_embed(codes)).float().repeat_interleave(2, dim=1)


class HeartCodec(nn.Module):
    def __init__(self, cfg: HeartCodecConfig):
        super().__init__()
        self.cfg = cfg
        self.flow_matching = FlowMatching(cfg)
        self.scalar_model = ScalarDecoder(cfg)
        self.cuda_graphs = True  # on CUDA, replay the estimator as a CUDA graph (see graph.py)
        self.tf32: bool | None = None  # TF32 allowed (True) / refused (False) while decoding; precision.py
        self._graph = None

    def __getstate__(self):  # copies (deepcopy, pickle) capture their own graph
        return {**self.__dict__, "_graph": None}

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def device(self) -> torch.device:
        return self.scalar_model.decoder[0].weight.device

    # ------------------------------------------------------------------ construction / files
    @classmethod
    def from_config(cls, cfg: HeartCodecConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> "HeartCodec":
        """Random weights (deterministic per seed and device)."""
        with torch.device(device):
            codec = cls(cfg)
        return init_random_(codec, seed).to(dtype).eval()

    @classmethod
    def load(cls, name_or_path, device="cpu", dtype: torch.dtype = torch.float32) -> "HeartCodec":
        """A HeartCodec-oss folder, heartlib's ckpt/ folder holding it, or a Hugging Face repo id.
        Weight norm is folded once here; encoder and VQ training tensors are skipped."""
        folder = find_model_folder(resolve_folder(name_or_path), CODEC_SUBFOLDERS)
        codec = build_empty(cls, HeartCodecConfig.from_file(folder / "config.json"))
        rename, transform, ignore = loader_hooks(folder)
        load_weights(codec, folder, dtype=dtype, device=device, rename=rename, transform=transform,
                     ignore=ignore, what="HeartCodec checkpoint", direct=True)
        return codec.eval()

    def save(self, folder) -> None:
        """config.json + model.safetensors in the official key layout (weight norm as parametrizations).
        Holds the decoding weights only: it loads back here, not in heartlib (no encoder)."""
        folder = Path(folder)
        save_weights(official_state_dict(self), folder)
        save_json(self.cfg.to_dict(), folder / "config.json")

    # ------------------------------------------------------------------ decoding
    def estimator_fn(self, shape: tuple[int, ...], device: torch.device | None = None):
        """The estimator, as a CUDA graph where possible (CUDA, not under autocast, cuda_graphs on)."""
        est = self.flow_matching.estimator
        device = device or self.device
        if not (self.cuda_graphs and device.type == "cuda") or torch.is_autocast_enabled("cuda"):
            return est
        weight = est.proj_in.ffn_2.weight
        key = (tuple(shape), weight.dtype, weight.data_ptr())  # a .to() moves the weights: capture again
        if self._graph is None or self._graph[0] != key:
            self._graph = None  # free the old graph's memory pool first
            self._graph = (key, GraphedEstimator(est, shape, device))
        return self._graph[1]

    def check_codes(self, tokens) -> torch.Tensor:
        """[Q, T] (or unambiguous [T, Q]) integer codes -> int64 [Q, T]; ValueError for anything else."""
        q, size = self.cfg.num_quantizers, self.cfg.codebook_size
        codes = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.dim() != 2:
            raise ValueError(f"codes must be [{q}, T] (codebook-major), got shape {tuple(codes.shape)}")
        if codes.shape[0] != q and codes.shape[1] == q:
            codes = codes.T  # [T, Q] frame-major
        if codes.shape[0] != q:
            raise ValueError(f"codes must have {q} codebooks: expected [{q}, T] or [T, {q}], got {tuple(codes.shape)}")
        if codes.shape[1] == 0:
            raise ValueError("codes are empty (T = 0): nothing to decode")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"code ids must lie in [0, {size}), got min {lo} max {hi}"
                             + (" (ids >= codebook size are HeartMuLa's special tokens such as EOS: strip those "
                                "frames before decoding)" if hi >= size else ""))
        return codes.long()

    def pin_memory_(self) -> "HeartCodec":
        """Pin the (CPU) weights: a codec kept on the CPU between decodes copies them to the GPU at full speed."""
        for t in _weights(self):
            t.data = t.data.pin_memory()
        return self

    def release_graph(self):
        """Free the estimator's captured graph and its memory pool (it is captured again on the next decode)."""
        self._graph = None

    @torch.inference_mode()
    def detokenize(self, codes: torch.Tensor, window: int = DEFAULT_WINDOW_CODES, steps: int = 10,
                   guidance: float = 1.25, generator: torch.Generator | None = None, fix_lost_codes: bool = True,
                   decode_batch: int = 1, return_latents: bool = False, device: torch.device | str | None = None):
        """codes [Q, T] int64 -> [2, int(T/12.5*sr)] float32 on the codec's device.

        Noise comes from `generator` (or torch's global CPU generator) in the reference's order, so after
        torch.manual_seed(s) this equals heartlib's detokenize(codes) with the same seed.
        decode_batch: windows per ScalarModel call. 1 (default) is as fast as 4 with a quarter of the working
        memory (bench/NOTES.md).
        device: where to compute, when the weights live elsewhere (a codec kept on the CPU beside training):
        each stage's weights are copied there for that stage only, so the device holds the flow stage's
        estimator (1.49 B parameters) or the ScalarModel and its working memory, never both. Same result.
        """
        device = torch.device(device) if device is not None else self.device
        staged = device != self.device
        plan = plan_windows(codes.shape[1], window, self.sample_rate, fix_lost_codes)
        noise = draw_noise(plan, self.cfg.out_channels, generator)
        with weights_on(self.flow_matching, device) if staged else contextlib.nullcontext():
            tiled = codes.to(device)[:, torch.arange(plan.padded_len, device=device) % plan.num_codes]
            cond = self.flow_matching.condition(tiled[None])  # [1, 2*padded_len, dim], all windows at once
            frames, ov = plan.latent_frames, plan.overlap_frames
            estimator = self.estimator_fn((2 if guidance > 1.0 else 1, frames, self.cfg.in_channels), device)
            latents: list[torch.Tensor] = []
            for i, start in enumerate(plan.starts):
                incontext = torch.zeros(1, frames, self.cfg.out_channels, device=device)
                n_incontext = ov if i > 0 else 0  # later windows continue from the previous window's tail
                if n_incontext:
                    incontext[:, :ov] = latents[-1][:, -ov:]
                latents.append(solve_euler(estimator, noise[i].to(device), incontext, n_incontext,
                                           cond[:, 2 * start: 2 * start + frames], steps, guidance))
            del estimator, cond
        if staged:  # the graph read the stage's weight copies, now gone: free it, and on CUDA give the copies and the
            self.release_graph()  # graph's pool back for the ScalarModel's working memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with weights_on(self.scalar_model, device) if staged else contextlib.nullcontext():
            wav = crossfade_windows(self.latents_to_windows(torch.cat(latents), plan, decode_batch), plan)
        return (wav, latents) if return_latents else wav

    def latents_to_windows(self, latents: torch.Tensor, plan: WindowPlan, decode_batch: int = 1):
        """latents [n, L, 256] -> [n, 2, window_samples]: features c*128..c*128+127 make stereo channel c."""
        n, frames, channels = latents.shape
        x = latents.view(n, frames, 2, channels // 2).permute(0, 2, 3, 1).reshape(2 * n, channels // 2, frames)
        step = 2 * decode_batch
        wav = torch.cat([self.scalar_model(x[i: i + step]) for i in range(0, 2 * n, step)])
        return wav.float().view(n, 2, -1)[:, :, : plan.window_samples]

    def decode(self, tokens, steps: int = 10, guidance: float = 1.25, seed: int | None = None,
               generator: torch.Generator | None = None, window: int = DEFAULT_WINDOW_CODES,
               decode_batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        """Audio codes [8, T] (tensor, ndarray or nested lists) -> float32 CPU tensor [2, samples] at 48 kHz.

        seed: draws the noise from a fresh CPU generator (same audio on any device). generator: use yours.
        Neither: torch's global generator. device: compute there, stage by stage (see detokenize).
        """
        codes = self.check_codes(tokens)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        with tf32_math(self.tf32):
            wav = self.detokenize(codes, window=window, steps=steps, guidance=guidance, generator=generator,
                                  decode_batch=decode_batch, device=device)
        return wav.float().cpu()


def _weights(module: nn.Module):
    yield from module.parameters()
    yield from (b for b in module.buffers() if b is not None)


@contextlib.contextmanager
def weights_on(module: nn.Module, device: torch.device):
    """Give the module's parameters and buffers copies on `device` for the duration; the originals (kept where
    they are, e.g. pinned on the CPU) are put back after, so leaving the stage frees the device copies."""
    originals = [(t, t.data) for t in _weights(module)]
    try:
        for t, data in originals:
            t.data = data.to(device, non_blocking=True)
        yield module
    finally:
        for t, data in originals:
            t.data = data
