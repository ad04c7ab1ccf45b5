"""Outputs people expect: mp3/ogg/opus files, the validation audio format, and the codec's precision."""
import pytest
import torch

import sample
import train
from hmtiny.codec import HeartCodec, load_codec
from hmtiny.codec.precision import tf32_math
from hmtiny.train_config import ConfigError, load_config
from test_train import TINY, make_run


@pytest.fixture
def fast_codec(monkeypatch):
    """Records load_codec's codec_dtype and makes decode return 0.2 s of noise at once (the tiny codec decodes a
    whole 30 s window on CPU, and decoding has tests of its own); yields the list of dtypes asked for."""
    chosen = []

    def spy(where, device, codec_dtype=None):
        chosen.append(codec_dtype)
        return load_codec(where, device, codec_dtype)

    monkeypatch.setattr("hmtiny.codec.load_codec", spy)
    monkeypatch.setattr(HeartCodec, "decode", lambda self, tokens, **kw: torch.rand(2, 9600) - 0.5)
    yield chosen


def test_sample_demo_writes_mp3_with_a_chosen_codec_dtype(tmp_path, capsys, fast_codec):
    sf = pytest.importorskip("soundfile")
    out = tmp_path / "demo.mp3"
    assert sample.main(["--demo", "--duration", "0.8", "--seed", "1", "--codec-dtype", "tf32", "--out", str(out)]) == 0
    info = sf.info(str(out))
    assert (info.format, info.samplerate, info.channels) == ("MP3", 48000, 2)
    assert fast_codec == ["tf32"]
    capsys.readouterr()


def test_sample_refuses_an_unwritable_format_before_generating(tmp_path, capsys, monkeypatch):
    sf = pytest.importorskip("soundfile")
    assert sample.main(["--demo", "--out", str(tmp_path / "song.m4a")]) == 1
    assert "unsupported audio extension '.m4a'" in capsys.readouterr().err
    monkeypatch.setattr(sf, "available_formats", lambda: {"WAV": "WAV", "FLAC": "FLAC"})
    assert sample.main(["--demo", "--out", str(tmp_path / "song.opus")]) == 1
    err = capsys.readouterr().err
    assert "libsndfile" in err and "OGG/OPUS" in err and "generating" not in err


def config_with(tmp_path, **keys):
    return load_config(make_run(tmp_path, **keys))


def test_validation_format_and_codec_dtype_keys(tmp_path, monkeypatch):
    cfg = config_with(tmp_path)
    assert (cfg.validation_audio_format, cfg.validation_codec_dtype) == ("wav", None)
    cfg = config_with(tmp_path, validation_audio_format="opus", validation_codec_dtype="tf32")
    assert (cfg.validation_audio_format, cfg.validation_codec_dtype) == ("opus", "tf32")
    with pytest.raises(ConfigError, match="validation_audio_format 'm4a'"):
        config_with(tmp_path, validation_audio_format="m4a")
    with pytest.raises(ConfigError, match="validation_codec_dtype 'fp16'"):
        config_with(tmp_path, validation_codec_dtype="fp16")
    sf = pytest.importorskip("soundfile")
    monkeypatch.setattr(sf, "available_formats", lambda: {"WAV": "WAV", "FLAC": "FLAC"})
    with pytest.raises(ConfigError, match="validation_audio_format 'mp3'.*libsndfile"):
        config_with(tmp_path, validation_audio_format="mp3")


def test_validation_clip_in_the_chosen_format(tmp_path, fast_codec):
    pytest.importorskip("soundfile")
    if not (TINY / "codec" / "config.json").is_file():
        pytest.skip("the tiny codec is not built")
    cfg = make_run(tmp_path, max_train_steps=1, checkpointing_steps=0, validation_prompt="pop, piano",
                   validation_audio_duration=0.4, validation_guidance=1.0, validation_audio_format="ogg",
                   validation_codec_dtype="fp32")
    assert train.main([str(cfg)]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["step-1-0.ogg"]
    assert fast_codec == ["fp32"]


def test_codec_dtype_choices(monkeypatch):
    folder = TINY / "codec"
    if not (folder / "config.json").is_file():
        pytest.skip("the tiny codec is not built")
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, None)):
        codec = load_codec(folder, torch.device("cpu"), name)
        assert next(codec.parameters()).dtype == dtype and codec.tf32 is tf32
    assert load_codec(folder, torch.device("cpu")).tf32 is False  # CPU default: fp32
    with pytest.raises(ValueError, match="codec dtype 'fp16'"):
        load_codec(folder, torch.device("cpu"), "fp16")
    # decode runs under the codec's TF32 choice and restores torch's flags
    codec = load_codec(folder, torch.device("cpu"), "tf32")
    seen = []
    monkeypatch.setattr(HeartCodec, "detokenize", lambda self, codes, **kw: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or torch.zeros(2, 10))
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    codec.decode(torch.zeros(8, 3, dtype=torch.long))
    assert seen == [(True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with tf32_math(False):
        assert not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.allow_tf32 == before[1]


def test_sample_config_brings_its_codec_dtype(tmp_path):
    cfg = make_run(tmp_path, validation_prompt="pop", validation_codec_dtype="tf32")
    assert sample.settings(sample.parse_args(["--config", str(cfg)]))["codec_dtype"] == "tf32"
    explicit = sample.parse_args(["--config", str(cfg), "--codec-dtype", "fp32"])
    assert sample.settings(explicit)["codec_dtype"] == "fp32"
