"""HeartCodec, vendored: audio codes [8, T] at 12.5 Hz -> stereo 48 kHz audio.

    codec = HeartCodec.load("ckpt/HeartCodec-oss", device="cuda", dtype=torch.bfloat16)
    wav = codec.decode(codes, steps=10, guidance=1.25, seed=0)   # float32 [2, samples], CPU
    write_audio("song.flac", wav, codec.sample_rate)
"""
from .audio import write_audio
from .codec import HeartCodec, WindowPlan, plan_windows
from .config import HeartCodecConfig
from .precision import CODEC_DTYPES, load_codec

__all__ = ["CODEC_DTYPES", "HeartCodec", "HeartCodecConfig", "WindowPlan", "load_codec", "plan_windows",
           "write_audio"]
