"""HeartCodec user API: input checks, weight-norm folding, save/load, audio files, the lost-codes fix."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from hmtiny.codec import HeartCodec, HeartCodecConfig, plan_windows, write_audio
from hmtiny.codec.flow import solve_euler
from hmtiny.codec.weights import WN_G, WN_V, fold_weight_norm

WINDOW = 93  # the smallest window (7.44 s) keeps CPU decoding fast


@pytest.fixture(scope="module")
def tiny():
    return HeartCodec.from_config(HeartCodecConfig.tiny(), seed=3)


def random_codes(t, size, seed=0, q=8):
    return torch.randint(0, size, (q, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("bad, match", [
    (torch.full((8, 5), 64), r"\[0, 64\).*special tokens"),      # == codebook_size (EOS-like ids)
    (torch.full((8, 5), -1), r"\[0, 64\)"),
    (torch.zeros(7, 5, dtype=torch.long), "8 codebooks"),
    (torch.zeros(8, 0, dtype=torch.long), "empty"),
    (torch.zeros(8, 5), "integers"),
    (torch.zeros(1, 8, 5, dtype=torch.long), "shape"),
])
def test_bad_codes_raise(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny.decode(bad)


def test_frame_major_and_numpy_input(tiny):
    codes = random_codes(20, 64)
    a = tiny.check_codes(codes)
    assert torch.equal(tiny.check_codes(codes.T.contiguous()), a)       # [T, 8]
    assert torch.equal(tiny.check_codes(codes.numpy().astype(np.int32)), a)
    assert torch.equal(tiny.check_codes(codes.tolist()), a)
    sq = random_codes(8, 64)  # [8, 8] is ambiguous: read codebook-major
    assert torch.equal(tiny.check_codes(sq), sq)


def test_decode_output_and_seed(tiny):
    codes = random_codes(30, 64, seed=1)
    wav = tiny.decode(codes, steps=2, seed=5, window=WINDOW)
    assert wav.dtype == torch.float32 and wav.device.type == "cpu"
    assert wav.shape == (2, int(30 / 12.5 * 48000)) and torch.isfinite(wav).all()
    # [T, 8] input and a caller's generator: a seed is just a fresh CPU generator, so the same audio
    same = tiny.decode(codes.T, steps=2, generator=torch.Generator().manual_seed(5), window=WINDOW)
    assert torch.equal(wav, same)
    assert not torch.equal(wav, tiny.decode(codes, steps=2, seed=6, window=WINDOW))


def test_no_guidance_branch_is_the_conditional_flow(tiny):
    """guidance <= 1 skips the CFG pair; it must integrate the conditional velocity (= CFG at g -> 1)."""
    g = torch.Generator().manual_seed(0)
    noise, ic = torch.randn(1, 20, 256, generator=g), torch.randn(1, 20, 256, generator=g)
    cond = torch.randn(1, 20, 32, generator=g)
    ic[:, 6:] = 0
    est = tiny.flow_matching.estimator
    plain = solve_euler(est, noise, ic, 6, cond, 3, 1.0)
    paired = solve_euler(est, noise, ic, 6, cond, 3, 1.0 + 1e-7)
    assert (plain - paired).abs().max().item() <= 1e-4 * paired.abs().max().item()
    assert torch.equal(plain[:, :6], ic[:, :6])  # in-context frames restored
    assert not torch.allclose(plain, solve_euler(est, noise, ic, 6, cond, 3, 2.0))


def test_decode_batch_does_not_change_audio(tiny):
    codes = random_codes(94, 64, seed=2)  # 2 windows
    a = tiny.decode(codes, steps=1, seed=0, window=WINDOW)  # one window per ScalarModel call
    b = tiny.decode(codes, steps=1, seed=0, window=WINDOW, decode_batch=2)
    assert (a - b).abs().max().item() <= 1e-6 * a.abs().max().item()


# ----------------------------------------------------------------------------- weight norm / files
@pytest.mark.parametrize("make", [lambda: nn.Conv1d(6, 4, 5), lambda: nn.ConvTranspose1d(6, 4, 8, stride=4)])
def test_weight_norm_fold_matches_pytorch(make):
    """Our fold equals torch's weight_norm parametrization (dim 0; the input channel for transposed convs)."""
    conv = nn.utils.parametrizations.weight_norm(make())
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(torch.rand_like(conv.parametrizations.weight.original0) + 0.5)
        conv.parametrizations.weight.original1.normal_()
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    assert torch.allclose(fold_weight_norm(g, v), conv.weight, rtol=1e-6, atol=1e-7)


def test_save_load_round_trip(tiny, tmp_path):
    tiny.save(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "scalar_model.decoder.0" + WN_G in keys and "scalar_model.decoder.0" + WN_V in keys
    assert "scalar_model.decoder.0.weight" not in keys                      # official layout
    assert "scalar_model.decoder.6.conv.weight" in keys                     # the one plain conv
    back = HeartCodec.load(tmp_path)
    assert back.cfg == tiny.cfg
    for (name, a), (_, b) in zip(tiny.state_dict().items(), back.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name
    with torch.no_grad():
        x, t = torch.randn(2, 10, 544), torch.rand(2)
        est = lambda codec: codec.flow_matching.estimator(x, t)
        assert torch.allclose(est(tiny), est(back), rtol=1e-5, atol=1e-6)
        latent = torch.randn(2, 128, 4) * 0.3
        assert torch.allclose(tiny.scalar_model(latent), back.scalar_model(latent), rtol=1e-4, atol=1e-6)


def test_load_folds_stored_parametrization(tiny, tmp_path):
    """A checkpoint holding arbitrary (g, v) loads as the conv torch's parametrization would compute."""
    tiny.save(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    key = "scalar_model.decoder.1.up_conv.layer"  # a transposed conv: norm over its input channel
    g = torch.rand_like(sd[key + WN_G]) + 0.5
    v = torch.randn_like(sd[key + WN_V]) * 3
    sd[key + WN_G], sd[key + WN_V] = g, v
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref = nn.utils.parametrizations.weight_norm(nn.ConvTranspose1d(v.shape[0], v.shape[1], v.shape[2]))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(g)
        ref.parametrizations.weight.original1.copy_(v)
    loaded = HeartCodec.load(tmp_path).scalar_model.decoder[1].up_conv.layer.weight
    assert torch.allclose(loaded, ref.weight, rtol=1e-6, atol=1e-7)


def test_loader_ignores_unused_but_rejects_unknown(tiny, tmp_path):
    tiny.save(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    unused = {"scalar_model.encoder.0.bias": torch.zeros(2),
              "scalar_model.encoder.0" + WN_G: torch.ones(2, 1, 1),
              "scalar_model.encoder.0" + WN_V: torch.ones(2, 1, 7),
              "flow_matching.vq_embed.project_in.weight": torch.zeros(8, 32),
              "flow_matching.vq_embed.layers.0._codebook.embed_avg": torch.zeros(1, 64, 8),
              "flow_matching.vq_embed.layers.0._codebook.cluster_size": torch.zeros(1, 64),
              "flow_matching.vq_embed.layers.0._codebook.initted": torch.tensor(True),
              "flow_matching.zero_cond_embedding1": torch.zeros(32)}
    save_file({**sd, **unused}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    HeartCodec.load(tmp_path)  # fine
    save_file({**sd, "flow_matching.bogus.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="flow_matching.bogus.weight"):
        HeartCodec.load(tmp_path)
    del sd["scalar_model.decoder.0" + WN_G]  # v without its g
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="weight-norm gain"):
        HeartCodec.load(tmp_path)


def test_heartlib_ckpt_layout_and_config_checks(tiny, tmp_path):
    tiny.save(tmp_path / "HeartCodec-oss")
    assert HeartCodec.load(tmp_path).cfg == tiny.cfg  # ckpt/ root with the codec in its subfolder
    cfg = json.loads((tmp_path / "HeartCodec-oss" / "config.json").read_text())
    cfg.update(transformers_version="4.57.0", torch_dtype="bfloat16", notes="metadata is ignored")
    assert HeartCodecConfig.from_dict(cfg) == tiny.cfg
    del cfg["num_layers_2"]
    with pytest.raises(ValueError, match="num_layers_2"):
        HeartCodecConfig.from_dict(cfg)
    with pytest.raises(ValueError, match="in_channels"):
        HeartCodecConfig(dim=32, in_channels=100)


def test_from_config_is_deterministic():
    a = HeartCodec.from_config(HeartCodecConfig.tiny(), seed=7).state_dict()
    b = HeartCodec.from_config(HeartCodecConfig.tiny(), seed=7).state_dict()
    c = HeartCodec.from_config(HeartCodecConfig.tiny(), seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_official_config_dims():
    cfg = HeartCodecConfig.official()
    assert (cfg.dim, cfg.codebook_size, cfg.codebook_dim, cfg.num_quantizers) == (512, 8192, 32, 8)
    assert (cfg.in_channels, cfg.num_layers, cfg.num_layers_2, cfg.width) == (1024, 24, 6, 1536)
    assert cfg.samples_per_latent == 1920


# ----------------------------------------------------------------------------- audio files
@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_write_audio(tmp_path, suffix):
    sf = pytest.importorskip("soundfile")
    wav = torch.sin(torch.linspace(0, 2000, 4800))[None].repeat(2, 1) * torch.tensor([[0.5], [-0.25]])
    path = write_audio(tmp_path / f"song{suffix}", wav, 48000)
    data, rate = sf.read(str(path), dtype="float32")
    assert rate == 48000 and data.shape == (4800, 2)
    assert np.abs(data.T - wav.numpy()).max() < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    with pytest.raises(ValueError, match="extension"):
        write_audio(tmp_path / "song.m4a", wav)


@pytest.mark.parametrize("suffix", [".mp3", ".ogg", ".opus"])
def test_write_lossy_audio(tmp_path, suffix, monkeypatch):
    sf = pytest.importorskip("soundfile")
    wav = torch.sin(torch.linspace(0, 2000, 9600))[None].repeat(2, 1) * 0.5
    try:
        path = write_audio(tmp_path / f"song{suffix}", wav, 48000)
    except ValueError as e:  # an old libsndfile: the error must say so
        assert "libsndfile" in str(e)
        pytest.skip(str(e))
    info = sf.info(str(path))
    assert (info.samplerate, info.channels) == (48000, 2) and abs(info.duration - 0.2) < 0.06
    fmt = {".mp3": "MP3", ".ogg": "OGG", ".opus": "OGG"}[suffix]
    monkeypatch.setattr(sf, "available_formats", lambda: {k: k for k in ("WAV", "FLAC") if k != fmt})
    with pytest.raises(ValueError, match=f"libsndfile .* has no {fmt}"):
        write_audio(tmp_path / f"again{suffix}", wav, 48000)


# ----------------------------------------------------------------------------- the lost-codes fix
def test_window_plan_fix_only_changes_the_lossy_lengths():
    for window in (93, 372):
        for t in range(1, 6 * window):
            ref = plan_windows(t, window, fix_lost_codes=False)
            fixed = plan_windows(t, window)
            assert fixed.covered_codes >= t and fixed.covered_codes * 3840 >= fixed.target_len
            if ref.covered_codes >= t:
                assert fixed == ref  # the reference everywhere it does not lose codes
            else:
                assert (t - 2 * ref.overlap) % ref.hop == 0  # exactly the documented lossy lengths
    lossy = plan_windows(424, 372, fix_lost_codes=False)
    assert lossy.covered_codes == 372 and plan_windows(424, 372).covered_codes >= 424


def test_lossy_length_decodes_every_code(tiny):
    t = 2 * 13 + 80  # len - 2*overlap a multiple of hop at the 93-code window: the reference drops codes
    codes = random_codes(t, 64, seed=9)
    changed = codes.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 64

    def run(c, fix):
        torch.manual_seed(0)
        return tiny.detokenize(c, window=WINDOW, steps=1, fix_lost_codes=fix)

    wav = run(codes, True)
    assert wav.shape == (2, int(t / 12.5 * 48000))
    tail = slice(-3840, None)  # the last code's 80 ms
    assert (wav[:, tail] - run(changed, True)[:, tail]).abs().max() > 1e-6  # the last code is heard
    ref = run(codes, False)
    assert ref.shape[1] < wav.shape[1]  # the reference comes out short ...
    assert torch.equal(ref, run(changed, False))  # ... and never used the last code


# ----------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_matches_cpu(tiny):
    """Noise is drawn on the CPU generator, so a seed gives the same latents on the GPU (fp32 and bf16)."""
    codes = random_codes(100, 64, seed=11)  # 2 windows: exercises the in-context hand-over
    torch.manual_seed(0)
    _, ref = tiny.detokenize(codes, window=WINDOW, steps=2, return_latents=True)
    ref = torch.cat(ref)
    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 5e-2)):
        gpu = copy.deepcopy(tiny).to("cuda", dtype)
        torch.manual_seed(0)
        wav, lat = gpu.detokenize(codes, window=WINDOW, steps=2, return_latents=True)
        assert wav.device.type == "cuda" and wav.dtype == torch.float32 and torch.isfinite(wav).all()
        assert wav.shape == (2, int(100 / 12.5 * 48000))
        lat = torch.cat(lat).cpu()
        assert (lat - ref).abs().max().item() <= tol * ref.abs().max().item(), dtype
        assert gpu._graph is not None  # the estimator ran as a CUDA graph ...
        gpu.cuda_graphs = False
        torch.manual_seed(0)
        _, eager = gpu.detokenize(codes, window=WINDOW, steps=2, return_latents=True)
        eager = torch.cat(eager).cpu()  # ... computing what eager mode computes
        assert (lat - eager).abs().max().item() <= 1e-5 * eager.abs().max().item(), dtype
