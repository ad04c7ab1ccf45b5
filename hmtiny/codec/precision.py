"""The codec's precision, chosen by name: `fp32`, `tf32` (fp32 weights; matmuls and convolutions on TF32 tensor
cores) or `bf16`. One home for sample.py's --codec-dtype and training's validation_codec_dtype.

heartlib keeps its codec in fp32 and warns that bf16 degrades audio; bench/bench_codec_dtype.py measures each
choice's error against fp32 and its time for 3 minutes of audio.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

CODEC_DTYPES = ("fp32", "tf32", "bf16")


def default_codec_dtype(device, validation: bool = False) -> str:
    """On CUDA tf32: the most accurate choice that decodes minutes of audio in a few seconds (speed and error of
    each choice: bench/NOTES.md). Validation during training keeps bf16 on CUDA: half the weights' memory beside
    the training state, which is what lets an int8 run fit a 12 GB card. fp32 elsewhere (CPU bf16 convolutions
    are slow)."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if validation else "tf32"


def codec_torch_dtype(name: str) -> torch.dtype:
    if name not in CODEC_DTYPES:
        raise ValueError(f"codec dtype {name!r} is not one of {list(CODEC_DTYPES)}")
    return torch.bfloat16 if name == "bf16" else torch.float32


@contextmanager
def tf32_math(allow: bool | None):
    """Inside the block CUDA matmuls and cuDNN convolutions may use TF32 (True) or must not (False: torch lets
    cuDNN use TF32 by default, so fp32 has to say no). None leaves torch's flags alone. Restored after."""
    if allow is None:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def load_codec(name_or_path, device, codec_dtype: str | None = None):
    """HeartCodec at `codec_dtype` (None: default_codec_dtype(device))."""
    from .codec import HeartCodec
    name = codec_dtype or default_codec_dtype(device)
    codec = HeartCodec.load(name_or_path, device=device, dtype=codec_torch_dtype(name))
    codec.tf32 = {"fp32": False, "tf32": True, "bf16": None}[name]
    return codec
