"""Reference-audio conditioning through the MuQ row: zeros = today's outputs, an embedding changes the MuQ row only,
training data carries per-sample embeddings (checked, naming the file), sample.py --ref-embedding / --ref-audio."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import hmtiny.reference as reference
from hmtiny.checkpoint import load_heartmula
from hmtiny.data import DatasetError, read_backends
from hmtiny.generate import generate
from hmtiny.text import PromptTokenizer, find_text_assets
from hmtiny.train_config import BUILTIN_CONFIG
from tests.test_data import hf_backend, local_backend, small_cfg, tokens, track, write_backends
from tests.test_sample import run

TINY = BUILTIN_CONFIG.parent
DIM = 8  # the tiny model's muq_dim


@pytest.fixture(scope="module")
def tiny():
    model = load_heartmula(TINY / "model", dtype=torch.float32)
    tok = PromptTokenizer.load(*find_text_assets(TINY))
    return model.eval(), tok.prompt("pop, happy, piano", "[verse]\nthe sun is bright")


def rows(model, prompt, ref=None, uncond=None):
    tokens, mask, muq = prompt
    return model.embed_rows(tokens[None], mask[None], torch.tensor([muq]), uncond,
                            None if ref is None else ref[None])[0]


def test_zero_embedding_is_todays_model_and_a_real_one_changes_only_the_muq_row(tiny):
    model, prompt = tiny
    muq = prompt[2]
    with torch.no_grad():
        today = rows(model, prompt)
        assert torch.equal(rows(model, prompt, torch.zeros(DIM)), today)
        ref = torch.randn(DIM)
        moved = rows(model, prompt, ref)
        assert torch.equal(moved[muq], model.muq_linear(ref))
        others = torch.arange(len(today)) != muq
        assert torch.equal(moved[others], today[others]) and not torch.equal(moved[muq], today[muq])
        # CFG's unconditional branch ignores it: the MuQ row is the unconditional embedding there, as today
        yes = torch.tensor([True])
        assert torch.equal(rows(model, prompt, ref, yes), rows(model, prompt, None, yes))

    def song(*extra):
        return generate(model, [(*prompt, *extra)], 6, cfg_scale=1.5, topk=1, stop_on_eos=False)[0]
    plain = song()
    assert torch.equal(song(torch.zeros(DIM)), plain)
    assert torch.equal(song(None), plain)
    assert not torch.equal(song(5 * torch.randn(DIM)), plain)


def test_training_samples_carry_checked_embeddings(tmp_path):
    data = tmp_path / "data"
    for name in "abcd":
        track(data, name, toks=tokens(12))
    np.save(data / "a.muq.npy", np.arange(4, dtype=np.float32))        # beside the audio
    np.save(data / "b_ref.npy", np.ones((1, 4), dtype=np.float64))     # via metadata, [1, dim]
    (data / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.wav", "muq_embedding_path": "b_ref.npy"}) + "\n"
        + json.dumps({"file_name": "c.wav", "muq_embedding": [0.5, 0, 0, 1]}) + "\n")
    cfg = write_backends(tmp_path / "multidatabackend.json", [local_backend(data)])
    got = {Path(s.source).stem: s.muq_embedding for s in read_backends(cfg, small_cfg())}
    assert got["a"].tolist() == [0, 1, 2, 3] and got["b"].tolist() == [1] * 4 and got["c"].tolist() == [0.5, 0, 0, 1]
    assert got["d"] is None  # absent: zeros in the model, exactly as without the feature
    assert got["a"].dtype == np.float32

    np.save(data / "a.muq.npy", np.zeros(512, np.float32))  # a real MuQ-MuLan size for a muq_dim-4 model
    np.save(data / "b_ref.npy", np.array([1, np.nan, 0, 0]))
    with pytest.raises(DatasetError) as err:
        read_backends(cfg, small_cfg())
    problems = err.value.problems
    assert any("a.muq.npy" in p and "shape [512]" in p and "[4]" in p for p in problems), problems
    assert any("b_ref.npy" in p and "NaN" in p for p in problems), problems

    root = tmp_path / "hf"
    root.mkdir()
    (root / "train.jsonl").write_text(json.dumps({"tags": "pop", "audio_tokens": tokens(10).tolist(),
                                                  "muq_embedding": [1, 2, 3]}) + "\n")
    with pytest.raises(DatasetError, match=r"train.jsonl:1: .*shape \[3\]"):
        read_backends([hf_backend(root)], small_cfg())


def test_batches_hold_embeddings_only_when_a_sample_has_one():
    from hmtiny.data import build_example, collate
    prompt = (torch.zeros(3, 9, dtype=torch.long), torch.ones(3, 9, dtype=torch.bool), 1)
    plain = build_example(*prompt, tokens(5))
    ref = build_example(*prompt, tokens(5), muq_embedding=np.full(4, 2, np.float32))
    assert "muq_embed" not in collate([plain, plain])
    assert collate([plain, ref])["muq_embed"].tolist() == [[0] * 4, [2] * 4]


def test_sample_ref_embedding(tmp_path, capsys):
    emb = tmp_path / "ref.npy"
    common = ["--demo", "--duration", "0.4", "--seed", "2", "--tokens-only", "--topk", "1"]
    np.save(emb, np.zeros(DIM, np.float32))
    rc, log = run(common + ["--out", str(tmp_path / "zero.wav"), "--ref-embedding", str(emb)], capsys)
    assert rc == 0 and "reference: the MuQ row is muq_linear of" in log
    assert run(common + ["--out", str(tmp_path / "none.wav")], capsys)[0] == 0
    assert np.array_equal(np.load(tmp_path / "zero.npy"), np.load(tmp_path / "none.npy"))
    np.save(emb, np.zeros((2, DIM), np.float32))
    rc, log = run(common + ["--out", str(tmp_path / "bad.wav"), "--ref-embedding", str(emb)], capsys)
    assert rc == 1 and str(emb) in log and "shape [2, 8]" in log
    rc, log = run(common + ["--ref-embedding", str(emb), "--ref-audio", "x.wav"], capsys)
    assert rc == 1 and "not both" in log


def test_sample_ref_audio_with_a_fake_encoder_and_without_muq(tmp_path, capsys, monkeypatch):
    song = tmp_path / "song.wav"
    sf.write(song, np.random.default_rng(0).uniform(-0.5, 0.5, (48000, 2)).astype(np.float32), 48000)
    common = ["--demo", "--duration", "0.8", "--seed", "2", "--tokens-only", "--ref-audio", str(song)]
    rc, log = run(common + ["--out", str(tmp_path / "a.wav")], capsys)  # `muq` is not installed here
    assert rc == 1 and 'pip install -e ".[ref]"' in log and "muq" in log, log

    seen = {}

    class FakeMuLan:
        def __call__(self, wavs):
            seen["shape"] = tuple(wavs.shape)
            return torch.linspace(-1, 1, DIM)[None]

    monkeypatch.setattr(reference, "load_mulan", lambda device="cpu": FakeMuLan())
    rc, log = run(common + ["--out", str(tmp_path / "b.wav")], capsys)
    assert rc == 0, log
    assert seen["shape"] == (1, 24000)  # 1 s of 48 kHz stereo read as 24 kHz mono, as MuQ-MuLan expects
    assert "reference" in log and (tmp_path / "b.npy").is_file()



def test_embedding_files_for_a_training_folder(tmp_path, capsys, monkeypatch):
    """python -m hmtiny.reference writes NAME.muq.npy beside each song, which the local backend then reads."""
    for name in ("a", "b"):
        sf.write(tmp_path / f"{name}.wav", np.zeros((2400, 1), np.float32), 24000)
    assert reference.main([str(tmp_path / "a.wav")]) == 2  # no `muq` here: a clear message
    assert ".[ref]" in capsys.readouterr().out
    monkeypatch.setattr(reference, "load_mulan", lambda device="cpu": lambda wavs: torch.ones(1, 4) * wavs.shape[1])
    assert reference.main([str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]) == 0
    assert np.load(tmp_path / "a.muq.npy").tolist() == [2400.0] * 4
    np.save(tmp_path / "b.muq.npy", np.zeros(4, np.float32))
    assert reference.main([str(tmp_path / "b.wav")]) == 0 and "skipped" in capsys.readouterr().out
    assert np.load(tmp_path / "b.muq.npy").tolist() == [0.0] * 4


def test_resample_keeps_what_fits_and_drops_what_does_not():
    """48 kHz -> 24 kHz (MuQ's rate): a 440 Hz tone comes through exactly, a 15 kHz one (above the new Nyquist) goes."""
    t = np.arange(48000) / 48000
    t2 = np.arange(24000) / 24000
    low = reference.resample(np.sin(2 * np.pi * 440 * t), 48000, 24000)
    assert low.shape == (24000,) and np.abs(low - np.sin(2 * np.pi * 440 * t2)).max() < 1e-5
    high = reference.resample(np.sin(2 * np.pi * 15000 * t), 48000, 24000)
    assert np.abs(high).max() < 1e-5
    assert reference.resample(np.sin(2 * np.pi * 440 * t), 48000, 44100).shape == (44100,)
