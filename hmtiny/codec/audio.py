"""Writing decoded audio: wav or flac (by extension) through soundfile, atomically (temp file + rename)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write

FORMATS = {".wav": "WAV", ".flac": "FLAC"}


def write_audio(path, wav, sample_rate: int = 48000, subtype: str = "PCM_16") -> Path:
    """wav [channels, samples] (tensor or ndarray, float in [-1, 1]; clipped) -> `path`. Returns the path."""
    import soundfile as sf  # lazy: only needed to write files

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported audio extension {path.suffix!r}: use one of {sorted(FORMATS)}")
    data = wav.detach().float().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav, np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[0] > 16:
        raise ValueError(f"expected audio [channels, samples], got shape {data.shape}")
    frames = np.clip(data, -1.0, 1.0).T  # soundfile wants [samples, channels]
    atomic_write(path, lambda tmp: sf.write(str(tmp), frames, int(sample_rate), subtype=subtype, format=fmt))
    return path
