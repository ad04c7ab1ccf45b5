"""Writing decoded audio through soundfile (libsndfile), format by extension, atomically (temp file + rename)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write

# extension -> (libsndfile format, subtype). heartlib writes mp3 by default; Opus runs at 48 kHz, our rate.
FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".mp3": ("MP3", "MPEG_LAYER_III"),
           ".ogg": ("OGG", "VORBIS"), ".opus": ("OGG", "OPUS")}


def check_audio_format(path) -> tuple[str, str]:
    """(format, subtype) for the file's extension; ValueError when unknown or when this machine's libsndfile
    cannot write it (MP3 needs libsndfile >= 1.1, Opus >= 1.0.29)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported audio extension {suffix or '(none)'!r} in {path}: use one of "
                         f"{', '.join(FORMATS)}")
    fmt, subtype = FORMATS[suffix]
    import soundfile as sf  # lazy: only needed to write files
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        raise ValueError(f"cannot write {path}: this machine's libsndfile {sf.__libsndfile_version__} has no "
                         f"{fmt}/{subtype} encoder; use .wav or .flac, or `pip install -U soundfile` (its wheels "
                         f"bundle a libsndfile with MP3 and Opus)")
    return fmt, subtype


def write_audio(path, wav, sample_rate: int = 48000, subtype: str | None = None) -> Path:
    """wav [channels, samples] (tensor or ndarray, float in [-1, 1]; clipped) -> `path` (.wav, .flac, .mp3,
    .ogg or .opus). subtype: libsndfile's, default per format (16-bit PCM for wav/flac). Returns the path."""
    import soundfile as sf

    path = Path(path)
    fmt, default_subtype = check_audio_format(path)
    subtype = subtype or default_subtype
    data = wav.detach().float().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav, np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[0] > 16:
        raise ValueError(f"expected audio [channels, samples], got shape {data.shape}")
    frames = np.clip(data, -1.0, 1.0).T  # soundfile wants [samples, channels]
    atomic_write(path, lambda tmp: sf.write(str(tmp), frames, int(sample_rate), subtype=subtype, format=fmt))
    return path
