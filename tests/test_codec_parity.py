"""HeartCodec parity with the official implementation (fixture reference outputs, float32, CPU).

Every size is read from the fixture set (cases.json / tensor shapes), so another set of the same format
with other dimensions runs unchanged.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from hmtiny.codec import HeartCodec, plan_windows
from hmtiny.codec.codec import draw_noise

TOL = 1e-4  # relative to max |reference|; float32 noise measured by the fixtures is 100-1000x smaller


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def codec_set(fixtures):
    folder = fixtures / "heartcodec"
    codec = HeartCodec.load(folder, dtype=torch.float32)
    cases = load_file(str(folder / "cases.safetensors"))
    meta = json.loads((folder / "cases.json").read_text())
    return codec, cases, meta


@pytest.fixture(scope="module")
def detok(codec_set):
    """One run of detokenize exactly as the fixture was made: torch.manual_seed(seed), global CPU generator."""
    codec, cases, meta = codec_set
    d = meta["cases"]["detokenize"]
    window = int(d["duration"] * 12.5)
    torch.manual_seed(d["seed"])
    wav, latents = codec.detokenize(cases["detokenize.codes"], window=window, steps=d["num_steps"],
                                    guidance=d["guidance_scale"], return_latents=True)
    return wav, torch.stack(latents), d, window


def test_vq_lookup_and_condition(codec_set):
    codec, cases, _ = codec_set
    fm = codec.flow_matching
    with torch.no_grad():
        quantized = fm.vq_embed(cases["vq.codes"])
        cond = fm.cond_feature_emb(quantized)
    assert quantized.shape == cases["vq.quantized"].shape
    assert rel_err(quantized, cases["vq.quantized"]) <= TOL
    assert rel_err(cond, cases["vq.cond"]) <= TOL


def test_estimator(codec_set):
    codec, cases, _ = codec_set
    with torch.no_grad():
        out = codec.flow_matching.estimator(cases["estimator.x"], cases["estimator.timestep"])
    assert out.shape == cases["estimator.out"].shape
    assert rel_err(out, cases["estimator.out"]) <= TOL


def test_scalar_decoder(codec_set):
    codec, cases, _ = codec_set
    with torch.no_grad():
        out = codec.scalar_model(cases["scalar_decode.latent"])
    assert out.shape == cases["scalar_decode.out"].shape
    assert rel_err(out, cases["scalar_decode.out"]) <= TOL


def test_window_plan_matches_reference(codec_set):
    codec, cases, meta = codec_set
    d = meta["cases"]["detokenize"]
    w = d["windowing"]
    plan = plan_windows(d["T"], int(d["duration"] * 12.5), codec.sample_rate)
    assert (plan.window, plan.hop, plan.overlap, plan.overlap_frames) == (
        w["min_codes_per_window"], w["hop_codes"], w["overlap_codes"], w["overlap_latent_frames"])
    assert plan.padded_len == w["tiled_code_length"]
    assert list(plan.starts) == w["window_starts_codes"]
    assert (plan.window_samples, plan.hop_samples, plan.overlap_samples, plan.target_len) == (
        w["samples_per_window"], w["hop_samples"], w["overlap_samples"], w["target_len"])


def test_noise_draw_order(codec_set):
    """Re-seeding and drawing our way makes the same randn calls as the reference (shapes, sums, values)."""
    codec, _, meta = codec_set
    d = meta["cases"]["detokenize"]
    plan = plan_windows(d["T"], int(d["duration"] * 12.5), codec.sample_rate)
    recorded = []
    real_randn = torch.randn

    def spy(*shape, **kw):
        out = real_randn(*shape, **kw)
        recorded.append(out)
        return out

    torch.manual_seed(d["seed"])
    torch.randn = spy
    try:
        noise = draw_noise(plan, codec.cfg.out_channels)
    finally:
        torch.randn = real_randn
    draws = d["randn_draws"]
    assert [list(r.shape) for r in recorded] == [x["shape"] for x in draws]
    for r, x in zip(recorded, draws):
        assert r.double().sum().item() == pytest.approx(x["sum"], rel=1e-9, abs=1e-9)
        assert r.flatten()[:4].tolist() == pytest.approx(x["first4"], rel=0, abs=0)
    # the initial noise of window 0 is the 2nd draw, of window i > 0 the (2i+2)-th
    assert len(noise) == len(plan.starts)
    for i, n in enumerate(noise):
        assert n is recorded[1 + 2 * i]


def test_detokenize_latents(detok, codec_set):
    _, cases, _ = codec_set
    _, latents, _, _ = detok
    ref = cases["detokenize.latents"]
    assert latents.shape == ref.shape
    assert rel_err(latents, ref) <= TOL


def test_detokenize_waveform(detok, codec_set):
    _, cases, _ = codec_set
    wav, latents, d, _ = detok
    ref = cases["detokenize.wav"]
    assert wav.dtype == torch.float32
    assert wav.shape == ref.shape == (2, d["windowing"]["target_len"])
    assert wav.shape[1] == int(d["T"] / 12.5 * 48000)
    if rel_err(wav, ref) <= TOL:
        return
    # Otherwise (fixtures README advice): every latent that rounds differently in round(9x)/9 must sit
    # within ~1e-5 of a rounding boundary in the reference, i.e. the difference is float32 noise.
    ref_lat = cases["detokenize.latents"]
    flips = torch.round(9 * latents) != torch.round(9 * ref_lat)
    margin = ((9 * ref_lat - torch.floor(9 * ref_lat) - 0.5).abs() / 9)[flips]
    assert flips.any(), f"waveform off by {rel_err(wav, ref):.2e} with no rounding flip"
    assert margin.max().item() < 1e-5, f"a rounding flip at margin {margin.max().item():.2e}"
