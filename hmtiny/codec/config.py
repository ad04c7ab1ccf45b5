"""HeartCodec configuration: the fields of the official `config.json` (a Hugging Face PretrainedConfig dump)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Fields that shape the decoder. The VQ training knobs (decay, commitment_weight, ...) and the encoder's
# down-sampling lists are kept so a saved config.json looks like the official one, but nothing reads them.
REQUIRED = ("dim", "codebook_size", "codebook_dim", "num_quantizers", "attention_head_dim", "in_channels",
            "num_attention_heads", "num_layers", "num_layers_2", "out_channels", "sample_rate", "num_samples",
            "upsample_factors", "upsample_kernel_sizes", "latent_hidden_dim", "default_kernel_size",
            "delay_kernel_size", "init_channel", "res_kernel_size")

FRAME_RATE = 12.5  # one code frame per 80 ms; latents run at twice that


@dataclass
class HeartCodecConfig:
    # residual VQ
    dim: int = 512
    codebook_size: int = 8192
    codebook_dim: int = 32
    num_quantizers: int = 8
    # flow-matching DiT (estimator)
    attention_head_dim: int = 64
    in_channels: int = 1024
    num_attention_heads: int = 24
    num_layers: int = 24
    num_layers_2: int = 6
    out_channels: int = 256
    norm_type: str = "ada_norm_single"
    # ScalarModel (waveform decoder)
    num_bands: int = 1
    sample_rate: int = 48000
    causal: bool = True
    num_samples: int = 2
    upsample_factors: list[int] = field(default_factory=lambda: [5, 4, 4, 4, 3])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [10, 8, 8, 8, 6])
    latent_hidden_dim: int = 128
    default_kernel_size: int = 7
    delay_kernel_size: int = 5
    init_channel: int = 64
    res_kernel_size: int = 7
    # unused by decoding (training / encoder side), carried through to config.json
    decay: float = 0.9
    commitment_weight: float = 1.0
    threshold_ema_dead_code: int = 2
    use_cosine_sim: bool = False
    downsample_factors: list[int] = field(default_factory=lambda: [3, 4, 4, 4, 5])
    downsample_kernel_sizes: list[int] = field(default_factory=lambda: [6, 8, 8, 8, 10])

    def __post_init__(self):
        checks = [
            (self.in_channels == 2 * self.out_channels + self.dim,
             f"in_channels {self.in_channels} != 2*out_channels + dim = {2 * self.out_channels + self.dim}"),
            (self.out_channels == 2 * self.latent_hidden_dim,
             f"out_channels {self.out_channels} must be 2*latent_hidden_dim (one half per stereo channel)"),
            (self.num_bands == 1, "only num_bands 1 is supported (as released)"),
            (self.causal, "only the causal ScalarModel is supported (as released)"),
            (self.norm_type == "ada_norm_single", f"norm_type {self.norm_type!r}: only 'ada_norm_single'"),
            (len(self.upsample_factors) == len(self.upsample_kernel_sizes), "upsample lists differ in length"),
            (all(k == 2 * s for s, k in zip(self.upsample_factors, self.upsample_kernel_sizes)),
             "causal up-sampling needs kernel = 2*stride"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("invalid HeartCodec config: " + "; ".join(bad))

    # ------------------------------------------------------------- derived sizes
    @property
    def width(self) -> int:  # estimator stack 1
        return self.num_attention_heads * self.attention_head_dim

    @property
    def samples_per_latent(self) -> int:  # ScalarModel up-sampling (1920 for the release)
        return math.prod(self.upsample_factors) * self.num_samples

    # ------------------------------------------------------------- io
    @classmethod
    def from_dict(cls, d: dict) -> "HeartCodecConfig":
        """Known fields are read; metadata (architectures, torch_dtype, notes, ...) is ignored."""
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ValueError(f"HeartCodec config.json is missing required field(s) {missing}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> "HeartCodecConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return {"model_type": "heartcodec", "architectures": ["HeartCodec"], **asdict(self)}

    @classmethod
    def official(cls) -> "HeartCodecConfig":
        """HeartCodec-oss dims (heartlib's HeartCodecConfig defaults): 24+6 DiT layers, 8x8192 codes."""
        return cls()

    @classmethod
    def tiny(cls) -> "HeartCodecConfig":
        """The fixture codec's tiny dims (64-entry codebooks): for tests and the built-in tiny default."""
        return cls(dim=32, codebook_size=64, codebook_dim=8, attention_head_dim=8, in_channels=544,
                   num_attention_heads=2, num_layers=2, num_layers_2=1, init_channel=2)
