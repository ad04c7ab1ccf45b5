"""Reference-audio conditioning: a MuQ-MuLan embedding of a song (512 numbers) that `muq_linear` turns into the
prompt's MuQ row. The official release always feeds zeros there; an embedding lets a song steer the style.

Embeddings come from a .npy file (a [512] or [1, 512] float array), a training dataset's metadata, or are
computed from audio with MuQ-MuLan (`pip install -e ".[ref]"`: the `muq` package, imported only when asked for).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MULAN_REPO = "OpenMuQ/MuQ-MuLan-large"
MULAN_SAMPLE_RATE = 24000  # MuQ-MuLan reads mono audio at 24 kHz
MISSING_MUQ = ("computing a reference embedding from audio needs MuQ-MuLan: pip install -e \".[ref]\" (the `muq` "
               "package; its weights download from the Hugging Face hub on first use), or pass a precomputed "
               "512-d embedding as a .npy file instead")


def check_muq_embedding(value, dim: int, where: str) -> np.ndarray:
    """A [dim] float32 vector from a [dim] or [1, dim] array of finite numbers; ValueError naming `where`."""
    try:
        arr = np.asarray(value)
    except ValueError as e:  # ragged lists
        raise ValueError(f"{where}: MuQ embedding is not a rectangular array ({e})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{where}: MuQ embedding must hold numbers, got dtype {arr.dtype}")
    if arr.shape not in ((dim,), (1, dim)):
        raise ValueError(f"{where}: MuQ embedding has shape {list(arr.shape)}; expected [{dim}] or [1, {dim}] "
                         f"(a MuQ-MuLan embedding, the model's muq_dim)")
    arr = arr.reshape(dim).astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: MuQ embedding holds NaN or infinite values")
    return arr


def load_npy(path: str | Path) -> np.ndarray:
    """One plain .npy array (never unpickled); ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"MuQ embedding file {path} does not exist")
    try:
        value = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"cannot read MuQ embedding {path} as a plain .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(value, np.ndarray):
        raise ValueError(f"MuQ embedding {path} must be one .npy array, not an .npz archive")
    return value


def read_muq_embedding(path: str | Path, dim: int) -> np.ndarray:
    """A checked [dim] embedding from a .npy file."""
    return check_muq_embedding(load_npy(path), dim, str(path))


def load_mulan(device="cpu"):
    """MuQ-MuLan, the encoder HeartMuLa's MuQ row was made for (ImportError with what to install when absent)."""
    try:
        from muq import MuQMuLan
    except ImportError:
        raise ImportError(MISSING_MUQ) from None
    return MuQMuLan.from_pretrained(MULAN_REPO).to(device).eval()


def resample(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
    """A 1-D signal from `rate` to `target` Hz by the Fourier method (an ideal low-pass: the spectrum is cut or
    zero-padded), numpy only; exact for band-limited signals, and a whole song is one FFT."""
    n = wav.shape[-1]
    m = max(1, round(n * target / rate))
    spectrum = np.fft.rfft(wav.astype(np.float64))
    kept = np.zeros(m // 2 + 1, dtype=spectrum.dtype)
    k = min(len(kept), len(spectrum))
    kept[:k] = spectrum[:k]
    return (np.fft.irfft(kept, n=m) * (m / n)).astype(np.float32)


def read_mono(path: str | Path, sample_rate: int) -> np.ndarray:
    """The audio file as float32 mono at `sample_rate` (channels averaged; Fourier resampling)."""
    import soundfile as sf
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read reference audio {path} ({type(e).__name__}: {e})") from None
    wav = wav.mean(axis=1)
    return resample(wav, sr, sample_rate) if sr != sample_rate else wav


def embed_audio(path: str | Path, encoder=None, device="cpu") -> np.ndarray:
    """MuQ-MuLan's embedding of an audio file, squeezed to a vector (check it with check_muq_embedding).
    encoder(wavs=[1, samples] tensor at 24 kHz) -> [1, 512] is MuQ-MuLan's call; loaded here when not given."""
    import torch
    if not Path(path).is_file():
        raise ValueError(f"reference audio {path} does not exist")
    encoder = encoder if encoder is not None else load_mulan(device)
    wav = torch.from_numpy(read_mono(path, MULAN_SAMPLE_RATE))[None].to(device)
    with torch.no_grad():
        emb = encoder(wavs=wav)
    return emb.float().cpu().numpy().squeeze(0)


def main(argv=None) -> int:
    """`python -m hmtiny.reference SONG.wav ...`: write SONG.muq.npy beside each file, the embedding training reads
    for that track (hmtiny/data.py)."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("audio", nargs="+", help="audio files (any format soundfile reads)")
    ap.add_argument("--device", default="cpu", help="where MuQ-MuLan runs (default cpu)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing .muq.npy files")
    args = ap.parse_args(argv)
    try:
        encoder = load_mulan(args.device)
    except ImportError as e:
        print(f"error: {e}")
        return 2
    for name in args.audio:
        out = Path(name).with_suffix(".muq.npy")
        if out.exists() and not args.overwrite:
            print(f"{out} exists: skipped (--overwrite replaces it)")
            continue
        try:
            emb = embed_audio(name, encoder, args.device)
        except ValueError as e:
            print(f"error: {e}")
            return 2
        np.save(out, emb.astype(np.float32))
        print(f"{out}: {emb.shape[0]} numbers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
